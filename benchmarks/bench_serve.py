"""``diki-edge serve`` under load (loopback only, bounded in count and time), on diki-tiny (the five photo tasks of
bench_throughput) and ViT-B/32 with random weights (the suite's 11-task bank; ``--tiny``: the tiny random backbone
only).

* throughput: 8 concurrent clients x single-image requests against the server (batch 8, 5 ms batching wait) vs
  ``Predictor.predict`` over the same images in batches of 8 in-process, rounds interleaved side by side;
  target >= 0.8x; p50 / p99 request latency;
* overload: 64 clients against a queue limit of 16 for 20 s (5 s with --quick / --tiny): every answer is 200 or
  503, no 200 carries another request's image, the server's RSS stays bounded; a bank reload halfway through:
  every result's task belongs to the old bank or the new one (its tasks renamed), none lost;
* idle unload: the server's RSS with the model loaded and after ``--idle-unload``, and the first request's latency
  after the unload (the model reopened) next to a warm one.

The server is a child process on 127.0.0.1 and a free port; its RSS is read from /proc/PID/status.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Config, make_result, ratio, time_side_by_side, under_load_watch
from benchmarks.world import get_world

NAME = "serve"
TITLE = "diki-edge serve: dynamic batching, overload, reload under load, idle unload"
TARGET = "server throughput with 8 clients >= 0.8x in-process batches of 8; overload: only 200/503, no mixed images"
COLUMNS = ["measurement", "figure", "detail"]
LOOPBACK = "127.0.0.1"
CLIENTS, BATCH = 8, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, model: Path, threads: int, *args: str, log: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "diki_edge_runtime", "serve", "--model", str(model), "--host", LOOPBACK,
               "--port", str(self.port), "--threads", str(threads), "--batch-size", str(BATCH), "--quiet", *args]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"diki-edge serve exited {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("diki-edge serve did not become ready in 120 s")

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection(LOOPBACK, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": ctype} if ctype else {})
            res = conn.getresponse()
            return res.status, res.read()
        finally:
            if own:
                conn.close()

    def metric(self, name: str) -> float:
        for line in self.request("GET", "/metrics")[1].decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return float("nan")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def clients_round(server: Server, images: list[tuple[str, bytes]], per_client: int) -> dict[str, Any]:
    """CLIENTS threads, each with its own keep-alive connection, sending single-image requests."""
    latencies: list[float] = []
    wrong = [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=60)
        try:
            for i in range(per_client):
                name, data = images[(c * per_client + i) % len(images)]
                body, ctype = multipart(name, data)
                t0 = time.perf_counter()
                status, raw = server.request("POST", "/v1/predict", body, ctype, conn)
                dt = time.perf_counter() - t0
                ok = status == 200 and [r["input"] for r in json.loads(raw)["results"]] == [name]
                with lock:
                    latencies.append(dt)
                    wrong[0] += not ok
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "wrong": wrong[0]}


def overload(server: Server, images: list[tuple[str, bytes]], seconds: float, bank_file: Path, new_bank: Path,
             old_tasks: set[str], new_tasks: set[str]) -> dict[str, Any]:
    """64 clients for ``seconds``; a reload to ``new_bank`` halfway."""
    stop = time.monotonic() + seconds
    counts: dict[str, int] = {"200": 0, "503": 0, "other": 0, "mixed": 0, "tasks_outside": 0, "results": 0}
    lock = threading.Lock()
    rss: list[float] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=60)
        i = 0
        while time.monotonic() < stop:
            base, data = images[(c + i) % len(images)]
            name = f"c{c}-{i}-{base}"  # unique: a result under any other name is another request's image
            i += 1
            body, ctype = multipart(name, data)
            try:
                status, raw = server.request("POST", "/v1/predict", body, ctype, conn)
            except OSError:
                conn.close()
                conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=60)
                status, raw = -1, b""
            with lock:
                if status == 200:
                    results = json.loads(raw)["results"]
                    counts["200"] += 1
                    counts["results"] += len(results)
                    counts["mixed"] += [r["input"] for r in results] != [name]
                    counts["tasks_outside"] += sum(r["task"] not in old_tasks | new_tasks for r in results)
                elif status == 503:
                    counts["503"] += 1
                    time.sleep(0.05)  # the Retry-After is 1 s; a short back-off keeps the pressure on
                else:
                    counts["other"] += 1
        conn.close()

    def sample() -> None:
        while time.monotonic() < stop:
            rss.append(rss_mib(server.proc.pid))
            time.sleep(0.25)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(64)] + [threading.Thread(target=sample)]
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    shutil.copy(new_bank, bank_file)
    t0 = time.perf_counter()
    status, _ = server.request("POST", "/v1/admin/reload")
    reload_s = time.perf_counter() - t0
    for t in threads:
        t.join()
    alive = server.request("GET", "/healthz")[0] == 200
    return {**counts, "reload_status": status, "reload_s": reload_s, "alive_after": alive,
            "rss_mib_max": max(rss), "rss_mib_first": rss[0], "seconds": seconds}


def idle_unload(model: Path, threads: int, image: tuple[str, bytes], log: Path) -> dict[str, Any]:
    server = Server(model, threads, "--idle-unload", "2", log=log)
    try:
        body, ctype = multipart(*image)
        for _ in range(5):
            server.request("POST", "/v1/predict", body, ctype)
        t0 = time.perf_counter()
        server.request("POST", "/v1/predict", body, ctype)
        warm = time.perf_counter() - t0
        loaded = rss_mib(server.proc.pid)
        deadline = time.monotonic() + 30
        while server.metric("diki_edge_model_loaded") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        unloaded = rss_mib(server.proc.pid)
        t0 = time.perf_counter()
        status, _ = server.request("POST", "/v1/predict", body, ctype)
        first = time.perf_counter() - t0
        return {"rss_loaded_mib": loaded, "rss_unloaded_mib": unloaded, "warm_request_s": warm,
                "first_request_after_unload_s": first, "status": status}
    finally:
        server.stop()


def models_and_photos(cfg: Config) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The model folders the throughput rounds run on (diki-tiny, then ViT-B/32 with random weights outside
    --tiny) and the photos; the behaviour rounds (overload, reload, idle unload) use the first."""
    from benchmarks.bench_throughput import bundled_model, photo_folder

    cache = cfg.cache_dir / "throughput"
    photos = photo_folder(cache, 16 if cfg.tiny else 64)
    if cfg.tiny:
        return [(get_world(cfg, cfg.reference_model).exported("fp32"), "tiny test backbone")], photos
    return [(bundled_model(cache), "diki-tiny"), (get_world(cfg, "ViT-B-32").exported("fp32"), "ViT-B/32")], photos


def throughput_rows(model: Path, backbone: str, images: list[tuple[str, bytes]], paths: list[str], cfg: Config,
                    work: Path) -> list[dict[str, Any]]:
    """8 clients x single-image requests against the server vs in-process batches of 8, side by side."""
    from diki_edge_runtime import Predictor

    per_client = max(1, len(images) // CLIENTS)
    local = Predictor(model, threads=cfg.n_threads)
    server = Server(model, cfg.n_threads, log=work / "throughput.log")
    try:
        last: dict[str, Any] = {}

        def served() -> None:
            last.update(clients_round(server, images, per_client))

        repeats = 1 if cfg.tiny else 3 if cfg.quick else 5
        t = time_side_by_side({"in_process": lambda: local.predict(paths[:per_client * CLIENTS], batch_size=BATCH),
                               "server": served}, warmup=1, repeats=repeats)
        batches = server.metric("diki_edge_batch_images_sum") / max(server.metric("diki_edge_batch_images_count"), 1)
    finally:
        server.stop()
    r = ratio(t["server"], t["in_process"])  # server time / in-process time: throughput ratio is its inverse
    throughput = 1 / r["of_medians"]
    lat = np.array(last["latencies"]) * 1000
    n = per_client * CLIENTS
    return [
        {"measurement": f"{backbone}: throughput, {CLIENTS} clients x 1 image vs in-process batches of {BATCH}",
         "figure": f"{throughput:.2f}x", "met": throughput >= 0.8,
         "detail": (f"{n} images/round: server {t['server'].fmt(1, 's')}, in-process {t['in_process'].fmt(1, 's')};"
                    f" mean batch {batches:.1f} images"),
         "data": {"server": t["server"].to_json(), "in_process": t["in_process"].to_json(), "ratio": r,
                  "throughput_ratio": throughput, "mean_batch": batches}},
        {"measurement": f"{backbone}: request latency under {CLIENTS} clients (last round)",
         "figure": f"p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms", "met": None,
         "detail": f"{len(lat)} requests, {last['wrong']} wrong answers",
         "data": {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                  "wrong": last["wrong"]}},
    ]


def measure(cfg: Config) -> dict[str, Any]:
    from diki_edge_runtime.bank import TaskBank

    models, photos = models_and_photos(cfg)
    work = cfg.cache_dir / "serve"
    work.mkdir(parents=True, exist_ok=True)
    threads = cfg.n_threads
    images = [(p.name, p.read_bytes()) for p in photos]
    paths = [str(p) for p in photos]
    rows = [row for model, backbone in models for row in throughput_rows(model, backbone, images, paths, cfg, work)]
    model, backbone = models[0]

    bank_file = work / "bank.safetensors"
    shutil.copy(model / "bank.safetensors", bank_file)
    old = TaskBank.load(bank_file)
    renamed = old
    for name in old.task_names:
        renamed = renamed.renamed(name, f"{name}-v2")
    new_bank = renamed.save(work / "bank-v2.safetensors")
    seconds = 5.0 if (cfg.tiny or cfg.quick) else 20.0
    server = Server(model, threads, "--bank", str(bank_file), "--queue-limit", "16", log=work / "overload.log")
    try:
        (ov, window) = under_load_watch(lambda: overload(server, images, seconds, bank_file, new_bank,
                                                         set(old.task_names), set(renamed.task_names)))
        ov["exit_code"] = server.stop()
    finally:
        server.stop()
    ov["load"] = window.to_json()
    ov_ok = (ov["other"] == 0 and ov["mixed"] == 0 and ov["tasks_outside"] == 0 and ov["alive_after"]
             and ov["reload_status"] == 200 and ov["exit_code"] == 0)
    idle, idle_window = under_load_watch(lambda: idle_unload(model, threads, images[0], work / "idle.log"))
    idle["load"] = idle_window.to_json()

    rows += [
        {"measurement": f"overload: 64 clients, queue limit 16, {seconds:.0f} s, reload halfway",
         "figure": f"{ov['200']} x 200, {ov['503']} x 503, {ov['other']} other", "met": ov_ok,
         "detail": (f"mixed answers {ov['mixed']}, tasks outside old/new bank {ov['tasks_outside']}, reload "
                    f"{ov['reload_status']} in {ov['reload_s'] * 1000:.0f} ms; RSS {ov['rss_mib_first']:.0f} -> max "
                    f"{ov['rss_mib_max']:.0f} MiB; SIGTERM exit {ov['exit_code']}"),
         "data": ov},
        {"measurement": "idle unload (--idle-unload 2)",
         "figure": f"RSS {idle['rss_loaded_mib']:.0f} -> {idle['rss_unloaded_mib']:.0f} MiB", "met": None,
         "detail": (f"first request after unload {idle['first_request_after_unload_s'] * 1000:.0f} ms vs warm "
                    f"{idle['warm_request_s'] * 1000:.0f} ms"),
         "data": idle},
    ]
    notes = [f"{', '.join(b for _, b in models)}; overload, reload and idle unload on {backbone}; {len(images)} JPEG "
             f"photos; ONNX Runtime {threads} threads; server --batch-size {BATCH} "
             "--max-wait-ms 5; loopback only; clients are threads of this process (they share its cores)",
             "this machine is shared: rounds marked contended claim nothing"]
    return make_result(NAME, TITLE, TARGET, COLUMNS, rows, notes,
                       extra={"backbone": backbone, "backbones": [b for _, b in models]})
