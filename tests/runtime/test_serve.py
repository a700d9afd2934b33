"""``diki-edge serve`` end to end: the real server (uvicorn) as a subprocess on a free loopback port, driven by a
real HTTP client (http.client) — every endpoint, auth, limits, malformed requests, reload with a bad bank,
SIGHUP, idle unload, overload and the SIGTERM drain. Every server binds 127.0.0.1 only."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import numpy as np
import pytest
from serve_support import Server, multipart
from support import GOLDEN, block, run_blocked

from diki_edge_runtime import Predictor

pytestmark = pytest.mark.timeout(180)
KEY = "test-key-0123"
ORIGIN = "http://app.local"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve")
    srv = Server("--cors-origin", ORIGIN, "--max-body-mb", "1", "--max-images", "12", "--log-json",
                 cwd=cwd, env={"DIKI_EDGE_API_KEY": KEY}, key=KEY)
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def golden_files() -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted((GOLDEN / "images").iterdir())]


def test_predict_answers_each_image_as_predict_json_does(server):
    files = golden_files()
    bad = ("notes.txt", b"not an image at all")
    res = server.predict(files[:3] + [bad] + files[3:], [("top_k", "2"), ("embeddings", "true")])
    assert res.status == 200, res.body
    body = res.json()
    assert body["schema"] == 2
    results = body["results"]
    assert [r["input"] for r in results] == [n for n, _ in files[:3]] + ["notes.txt"] + [n for n, _ in files[3:]]
    assert results[3]["ok"] is False and results[3]["error"]["kind"] == "not_an_image"
    assert results[3]["error"]["message"].startswith("notes.txt:")  # the upload's name, never the server's file
    local = Predictor(GOLDEN / "model", threads=1).predict([str(GOLDEN / "images" / n) for n, _ in files], top_k=2)
    for mine, row in zip(local, [r for r in results if r["input"] != "notes.txt"]):
        expected = mine.to_json(embeddings=True)
        assert set(row) == set(expected)
        assert row["ok"] and row["task"] == expected["task"]
        assert [c["class"] for c in row["top_k"]] == [c["class"] for c in expected["top_k"]]
        # the server batches differently from this call; batch composition only changes GEMM rounding, bounded
        # as in test_predict.test_results_do_not_depend_on_batch_size (1e-5 on unit-norm embeddings, and M is a
        # sigmoid of a normalised score: a 1e-5 change of the embedding moves it by well under 1e-4)
        assert np.abs(np.array(row["image_embeds"]) - expected["image_embeds"]).max() <= 1e-5
        assert np.abs(np.array(row["frozen_embeds"]) - expected["frozen_embeds"]).max() <= 1e-5
        assert abs(row["weight"] - expected["weight"]) <= 1e-4
        assert len(row["top_k"]) == 2


def test_predict_with_labels_and_template(server):
    files = golden_files()[:2]
    res = server.predict(files, [("labels", "rocket,cat"), ("labels", "coffee"), ("template", "a picture of {}")])
    assert res.status == 200, res.body
    local = Predictor(GOLDEN / "model", threads=1).predict([str(GOLDEN / "images" / n) for n, _ in files],
                                                           labels=["rocket", "cat", "coffee"],
                                                           template="a picture of {}")
    for row, mine in zip(res.json()["results"], local):
        assert {c["class"] for c in row["top_k"]} <= {"rocket", "cat", "coffee"}
        assert row["top_k"][0]["class"] == mine.label
        assert row["image_embeds"] is None  # embeddings were not asked for


def test_concurrent_requests_get_only_their_own_images(server):
    files = golden_files()
    answers: dict[int, list[str]] = {}

    def client(i: int) -> None:
        mine = [files[(i + j) % len(files)] for j in range(1 + i % 3)]
        res = server.predict(mine)
        assert res.status == 200
        answers[i] = [r["input"] for r in res.json()["results"]] + ["|"] + [n for n, _ in mine]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 8
    for got in answers.values():
        cut = got.index("|")
        assert got[:cut] == got[cut + 1:]


def test_auth_is_required_everywhere_but_healthz(server):
    assert server.get("/healthz", auth=False).status == 200
    for method, path in (("GET", "/readyz"), ("GET", "/v1/info"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                         ("POST", "/v1/predict"), ("POST", "/v1/embed/text"), ("POST", "/v1/admin/reload")):
        res = server.request(method, path, auth=False)
        assert res.status == 401, (path, res.status)
        assert res.json()["error"]["kind"] == "unauthorized" and res.headers["www-authenticate"] == "Bearer"
        wrong = server.request(method, path, headers={"Authorization": "Bearer " + KEY + "x"})
        assert wrong.status == 401, path


def test_info_ready_metrics_and_openapi(server):
    assert server.get("/readyz").json()["ready"] is True
    info = server.get("/v1/info").json()
    assert info["loaded"] is True and info["providers"] == ["CPUExecutionProvider"]
    assert [t["name"] for t in info["tasks"]] == Predictor(GOLDEN / "model", threads=1).tasks
    server.predict(golden_files()[:1])
    text = server.get("/metrics").body.decode()
    for name in ("diki_edge_requests_total", "diki_edge_errors_total", "diki_edge_request_seconds_bucket",
                 "diki_edge_batch_images_bucket", "diki_edge_queue_depth", "diki_edge_bank_version"):
        assert name in text, name
    assert 'diki_edge_requests_total{route="/v1/predict",status="200"}' in text
    schema = server.get("/openapi.json").json()
    paths = {"/v1/predict", "/v1/embed/text", "/v1/admin/reload", "/v1/info", "/healthz", "/readyz", "/metrics"}
    assert schema["openapi"].startswith("3.") and paths <= set(schema["paths"])


def test_embed_text(server):
    res = server.post_json("/v1/embed/text", {"texts": ["a cat", "a rocket"], "task": None, "weight": 0.0})
    assert res.status == 200, res.body
    embeds = np.array(res.json()["embeddings"])
    local = Predictor(GOLDEN / "model", threads=1).encode_text(["a cat", "a rocket"])
    assert embeds.shape == local.shape
    # the same text graph on the same tokens: the only difference is JSON's float repr (exact for float64)
    assert np.abs(embeds - local).max() <= 1e-6
    tasks = server.get("/v1/info").json()["tasks"]
    adapted = server.post_json("/v1/embed/text", {"texts": ["a cat"], "task": tasks[0]["name"], "weight": 1.0})
    assert adapted.status == 200
    for bad in ({"texts": "a cat"}, {"texts": ["x"], "task": "no such task"}, {"texts": ["x"], "weight": 0.5},
                {"texts": ["x"], "weight": 2.0, "task": 0}, {"texts": ["x"], "extra": 1}, [1, 2]):
        res = server.post_json("/v1/embed/text", bad)
        assert res.status == 400, (bad, res.body)
        assert res.json()["error"]["message"]
    assert server.request("POST", "/v1/embed/text", b"{not json", {"Content-Type": "application/json"}).status == 400
    assert server.request("POST", "/v1/embed/text", b'{"texts": ["x"], "weight": NaN}',
                          {"Content-Type": "application/json"}).status == 400
    assert server.request("POST", "/v1/embed/text", b"texts=x", {"Content-Type": "text/plain"}).status == 415


def test_malformed_and_oversized_requests(server):
    one = golden_files()[:1]
    cases = {
        "no multipart": (server.request("POST", "/v1/predict", b"{}", {"Content-Type": "application/json"}), 415),
        "no image": (server.predict([], [("top_k", "2")]), 400),
        "bad top_k": (server.predict(one, [("top_k", "zero")]), 400),
        "top_k 0": (server.predict(one, [("top_k", "0")]), 400),
        "bad bool": (server.predict(one, [("embeddings", "maybe")]), 400),
        "unknown field": (server.predict(one, [("path", "/etc/passwd")]), 400),
        "template alone": (server.predict(one, [("template", "a {}")]), 400),
        "empty labels": (server.predict(one, [("labels", " , ")]), 400),
        "too many images": (server.predict(one * 13), 400),
        "over the body limit": (server.predict([("big.png", b"\0" * (1024 * 1024 + 1))]), 413),
    }
    body, ctype = multipart([("image", ("a.png", one[0][1]))])
    cases["broken multipart"] = (server.request("POST", "/v1/predict", body[: len(body) // 2] + b"--x--\r\n",
                                                {"Content-Type": ctype}), 400)
    cases["no boundary"] = (server.request("POST", "/v1/predict", body, {"Content-Type": "multipart/form-data"}), 400)
    cases["image as text"] = (server.request("POST", "/v1/predict", *reversed(_text_image())), 400)
    for name, (res, status) in cases.items():
        assert res.status == status, (name, res.status, res.body)
        assert res.json()["error"]["message"], name
    assert server.get("/no/such/path").status == 404
    assert server.get("/v1/predict").status == 405
    assert server.get("/healthz").status == 200  # still serving after all of them


def _text_image() -> tuple[dict[str, str], bytes]:
    body, ctype = multipart([("image", "not a file part")])
    return {"Content-Type": ctype}, body


def test_cors_only_for_the_given_origin(server):
    allowed = server.get("/healthz", headers={"Origin": ORIGIN})
    assert allowed.headers.get("access-control-allow-origin") == ORIGIN
    other = server.get("/healthz", headers={"Origin": "http://elsewhere.local"})
    assert "access-control-allow-origin" not in other.headers


def test_log_json_writes_one_line_per_request(server):
    server.get("/healthz")
    lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
    assert lines and all({"method", "path", "status", "ms"} <= set(x) for x in lines)
    assert any(x["path"] == "/healthz" and x["status"] == 200 for x in lines)


def test_reload_swaps_the_bank_and_refuses_a_bad_one(tmp_path, golden):
    bank = tmp_path / "bank.safetensors"
    shutil.copy(golden.bank_path, bank)
    srv = Server("--bank", str(bank), cwd=tmp_path)
    try:
        before = [t["name"] for t in srv.get("/v1/info").json()["tasks"]]
        other = next(p for p in sorted((GOLDEN / "banks").iterdir())
                     if len(Predictor(GOLDEN / "model", threads=1, bank=p).tasks) != len(before))
        after_tasks = Predictor(GOLDEN / "model", threads=1, bank=other).tasks
        shutil.copy(other, bank)
        res = srv.request("POST", "/v1/admin/reload")
        assert res.status == 200, res.body
        assert [t["name"] for t in res.json()["tasks"]] == after_tasks
        assert srv.metric("diki_edge_bank_version") == 2
        bank.write_bytes(b"garbage, not a bank")
        refused = srv.request("POST", "/v1/admin/reload")
        assert refused.status == 422
        assert str(bank) in refused.json()["error"]["message"]
        assert [t["name"] for t in srv.get("/v1/info").json()["tasks"]] == after_tasks
        predicted = srv.predict(golden_files()[:2]).json()["results"]
        assert all(r["ok"] and r["task"] in after_tasks for r in predicted)
        # SIGHUP: the same reload
        shutil.copy(golden.bank_path, bank)
        srv.signal(signal.SIGHUP)
        srv.wait_metric("diki_edge_bank_version", 3)
        assert [t["name"] for t in srv.get("/v1/info").json()["tasks"]] == before
    finally:
        assert srv.stop() == 0


def test_idle_unload_and_reload_on_next_request(tmp_path):
    srv = Server("--idle-unload", "0.5", cwd=tmp_path)
    try:
        assert srv.predict(golden_files()[:1]).status == 200
        srv.wait_metric("diki_edge_model_loaded", 0)  # after 0.5 s without requests
        assert srv.metric("diki_edge_model_unloads_total") >= 1
        assert srv.get("/v1/info").json()["loaded"] is False
        assert srv.get("/readyz").status == 200  # unloaded on purpose is still ready: the next request reopens
        res = srv.predict(golden_files()[:1])
        assert res.status == 200 and res.json()["results"][0]["ok"]
        assert srv.metric("diki_edge_model_loads_total") >= 2
    finally:
        assert srv.stop() == 0


def test_queue_limit_answers_503_at_once(tmp_path):
    # a long batching wait keeps the first request queued, so the second finds the queue full
    srv = Server("--queue-limit", "1", "--batch-size", "64", "--max-wait-ms", "3000", cwd=tmp_path)
    try:
        first: list = []
        t = threading.Thread(target=lambda: first.append(srv.predict(golden_files()[:1])))
        t.start()
        srv.wait_metric("diki_edge_queue_depth", 1)
        start = time.monotonic()
        second = srv.predict(golden_files()[:1])
        assert second.status == 503 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["kind"] == "queue_full"
        assert time.monotonic() - start < 2.5  # at once, not after the first request's batching wait
        t.join(30)
        assert first[0].status == 200
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path):
    srv = Server("--batch-size", "64", "--max-wait-ms", "1500", "--drain-seconds", "20", cwd=tmp_path)
    answers: list = []
    t = threading.Thread(target=lambda: answers.append(srv.predict(golden_files()[:2])))
    t.start()
    srv.wait_metric("diki_edge_queue_depth", 1)
    srv.signal(signal.SIGTERM)
    t.join(30)
    assert answers and answers[0].status == 200 and len(answers[0].json()["results"]) == 2
    assert srv.proc.wait(30) == 0
    with pytest.raises(OSError):  # no longer accepting
        srv.get("/healthz", timeout=2)


def test_refuses_beyond_loopback_without_a_key(tmp_path):
    from typer.testing import CliRunner

    from diki_edge_runtime.cli import build_app

    # 192.0.2.1 (TEST-NET-1) is assigned to no interface: even a broken check could not expose anything
    res = CliRunner().invoke(build_app(), ["serve", "--model", str(GOLDEN / "model"), "--host", "192.0.2.1"],
                             env={"DIKI_EDGE_API_KEY": ""})
    assert res.exit_code != 0
    assert "api-key" in str(res.exception) and "192.0.2.1" in str(res.exception)


def test_without_the_extra_serve_names_its_install_line():
    code = "from diki_edge_runtime.cli import main\nmain()\n"
    res = run_blocked(code, "serve", "--model", "x", block=block("starlette", "uvicorn", "python_multipart"))
    assert res.returncode == 2, res.stderr
    assert "diki-edge-runtime[cpu,serve]" in res.stderr
    listed = run_blocked(code, "--help", block=block("starlette", "uvicorn", "python_multipart"))
    assert listed.returncode == 0 and "serve" not in listed.stdout
