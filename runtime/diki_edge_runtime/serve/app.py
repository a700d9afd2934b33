"""The ASGI application of ``diki-edge serve`` (starlette): endpoints, authentication, body limits, request log.

Endpoints (request and response examples: docs/serve.md; schema: ``GET /openapi.json``)::

    POST /v1/predict        multipart: image (1..max_images files), top_k, labels, template, embeddings
    POST /v1/embed/text     JSON {"texts": [...], "task": null|name|index, "weight": 0.0}
    POST /v1/admin/reload   re-read the bank file the server was started with (422: refused, old bank kept)
    GET  /v1/info           Predictor.info() and the bank's tasks
    GET  /healthz           the process is alive (never needs the key)
    GET  /readyz            the model is loaded and a prediction ran
    GET  /metrics           Prometheus text format
    GET  /openapi.json      the OpenAPI 3.1 schema

Every error answer is JSON ``{"error": {"kind": KIND, "message": TEXT}}``. Uploads are written to the server's own
temporary folder under names the server picks; the client's file name is only echoed back as ``input``, so no
endpoint ever opens a path a client named.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import python_multipart  # noqa: F401  starlette parses forms with it; without it only the first upload would fail
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from diki_edge_runtime.errors import BankError, DikiEdgeError
from diki_edge_runtime.labels import label_prompts, parse_labels
from diki_edge_runtime.serve.engine import Engine, Job, QueueFull
from diki_edge_runtime.serve.openapi import openapi_schema
from diki_edge_runtime.serve.settings import MAX_TOP_K

PREDICT_FIELDS = {"image", "top_k", "labels", "template", "embeddings"}
MAX_TEXTS = 1024  # texts per /v1/embed/text request
MAX_FORM_FIELDS = 64  # non-file fields per predict request
ROUTES = ("/v1/predict", "/v1/embed/text", "/v1/admin/reload", "/v1/info", "/healthz", "/readyz", "/metrics",
          "/openapi.json")


class RequestError(Exception):
    """A request that is itself malformed: answered ``status`` with a JSON error of ``kind``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"kind": kind, "message": message}}, status, headers=headers)


def json_response(payload: Any, status: int = 200) -> Response:
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return Response(body, status, media_type="application/json")


class Guard:
    """Pure ASGI middleware in front of everything: the API key, the body size limit, per-request metrics and the
    JSON request log. (Pure ASGI rather than BaseHTTPMiddleware: it must count body bytes as they arrive.)"""

    def __init__(self, app, engine: Engine):
        self.app, self.engine = app, engine
        settings = engine.serve
        self.key = settings.api_key.encode("utf-8") if settings.api_key else None
        self.limit = settings.max_body_bytes
        self.log_json = settings.log_json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]
        route = path if path in ROUTES else "other"
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            problem = self._refusal(scope)
            if problem is not None:
                self.engine.metrics.error(problem.kind)
                await problem.response()(scope, receive, send_status)
            else:
                await self.app(scope, self._counting(receive), send_status)
        finally:
            seconds = time.perf_counter() - start
            self.engine.metrics.request(route, status["code"], seconds)
            if self.log_json:
                line = {"time": round(time.time(), 3), "method": scope["method"], "path": route,
                        "status": status["code"], "ms": round(seconds * 1000, 2)}
                sys.stderr.write(json.dumps(line) + "\n")
                sys.stderr.flush()

    def _refusal(self, scope) -> Refusal | None:
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/healthz" and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                return Refusal(401, "unauthorized", "missing or wrong API key (send Authorization: Bearer KEY)",
                               {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return Refusal(400, "bad_request", "malformed Content-Length header")
            if int(length) > self.limit:
                return Refusal(413, "too_large", f"request body of {int(length)} bytes is over the limit of "
                                                 f"{self.limit} bytes (--max-body-mb)")
        return None

    def _counting(self, receive):
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestError(413, "too_large", f"request body is over the limit of {self.limit} bytes "
                                                         "(--max-body-mb)")
            return message

        return counted


class Refusal:
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.kind, self.message, self.headers = status, kind, message, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.kind, self.message, self.headers)


def build_app(engine: Engine) -> Starlette:
    """The application over an opened :class:`Engine`."""
    uploads = Path(tempfile.mkdtemp(prefix="diki-edge-serve-"))

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:  # after uvicorn stopped accepting and the requests in flight finished (or the drain timed out)
            await run_in_threadpool(engine.stop, engine.serve.drain_seconds)
            shutil.rmtree(uploads, ignore_errors=True)

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if engine.ready:
            return json_response({"ready": True, "loaded": engine.loaded})
        return error_response(503, "not_ready", "the model has not answered a prediction yet")

    async def info(request: Request) -> Response:
        return json_response(engine.info())

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    async def openapi(request: Request) -> Response:
        return json_response(openapi_schema(engine.serve))

    async def predict(request: Request) -> Response:
        job, embeddings = await read_predict_request(request, engine, uploads)
        try:
            try:
                future = engine.submit(job)
            except QueueFull as exc:
                engine.metrics.error("queue_full")
                return error_response(503, "queue_full", str(exc), {"Retry-After": "1"})
            try:
                results = await asyncio.wrap_future(future)
            except (DikiEdgeError, ValueError) as exc:
                raise RequestError(400, "bad_request", str(exc)) from None
        finally:
            for path in job.paths:
                Path(path).unlink(missing_ok=True)
        for res in results:
            if not res.ok:
                engine.metrics.error(res.error_kind or "unknown")
        return json_response({"schema": 2, "results": [r.to_json(embeddings=embeddings) for r in results]})

    async def embed_text(request: Request) -> Response:
        texts, task, weight = parse_embed_request(await read_json(request))
        try:
            embeds = await run_in_threadpool(engine.encode_text, texts, task, weight)
        except (DikiEdgeError, ValueError) as exc:
            raise RequestError(400, "bad_request", str(exc)) from None
        return json_response({"embeddings": [[float(x) for x in row] for row in embeds]})

    async def reload(request: Request) -> Response:
        try:
            answer = await run_in_threadpool(engine.reload)
        except BankError as exc:
            engine.metrics.error("bank_refused")
            return error_response(422, "bank_refused", f"{exc}; the previous bank is still in use")
        return json_response(answer)

    async def request_error(request: Request, exc: RequestError) -> Response:
        request.app.state.engine.metrics.error(exc.kind)
        return error_response(exc.status, exc.kind, exc.message, exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        request.app.state.engine.metrics.error(kind)
        return error_response(exc.status_code, kind, str(exc.detail), exc.headers)

    middleware = [Middleware(Guard, engine=engine)]
    if engine.serve.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(engine.serve.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    routes = [Route("/v1/predict", predict, methods=["POST"]), Route("/v1/embed/text", embed_text, methods=["POST"]),
              Route("/v1/admin/reload", reload, methods=["POST"]), Route("/v1/info", info, methods=["GET"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/openapi.json", openapi, methods=["GET"])]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={RequestError: request_error, HTTPException: http_error})
    app.state.engine = engine
    return app


async def read_predict_request(request: Request, engine: Engine, uploads: Path) -> tuple[Job, bool]:
    """The predict form checked field by field, its images written to server-named files."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(415, "unsupported_media_type", "POST /v1/predict takes multipart/form-data with one or "
                                                          f"more 'image' files, not {content_type or 'no type'}")
    limit = engine.serve.max_images
    form = await request.form(max_files=limit, max_fields=MAX_FORM_FIELDS, max_part_size=1024 * 1024)
    unknown = sorted(set(form.keys()) - PREDICT_FIELDS)
    if unknown:
        raise RequestError(400, "bad_request", f"unknown form fields {unknown} (known: {sorted(PREDICT_FIELDS)})")
    images = form.getlist("image")
    if not images:
        raise RequestError(400, "bad_request", "no 'image' file in the form")
    if not all(isinstance(im, UploadFile) for im in images):
        raise RequestError(400, "bad_request", "every 'image' field must be a file part (with a filename)")
    top_k = form_int(form.get("top_k"), "top_k", engine.serve.top_k)
    embeddings = form_bool(form.get("embeddings"), "embeddings")
    labels = None
    if form.getlist("labels"):
        try:
            labels = [lab for value in form.getlist("labels") for lab in parse_labels(text_field(value, "labels"))]
        except ValueError as exc:
            raise RequestError(400, "bad_request", f"labels: {exc}") from None
    template = None if form.get("template") is None else text_field(form.get("template"), "template")
    try:
        if labels is not None:
            label_prompts(labels, template)
        elif template is not None:
            raise ValueError("a template needs labels")
    except ValueError as exc:
        raise RequestError(400, "bad_request", str(exc)) from None
    paths, names = [], []
    batch = uuid.uuid4().hex
    for i, upload in enumerate(images):
        path = uploads / f"{batch}-{i}"
        data = await upload.read()
        await run_in_threadpool(path.write_bytes, data)
        paths.append(os.fspath(path))
        names.append(upload.filename or f"<upload #{i}>")
    return Job(paths, names, top_k, tuple(labels) if labels else None, template), embeddings


def text_field(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(400, "bad_request", f"form field {name!r} must be text, not a file")
    return value


def form_int(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    text = text_field(value, name).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_TOP_K:
        raise RequestError(400, "bad_request", f"{name} must be an integer in 1..{MAX_TOP_K}, got {text!r}")
    return int(text)


def form_bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    text = text_field(value, name).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise RequestError(400, "bad_request", f"{name} must be true or false, got {text!r}")
    return text in ("true", "1", "yes")


async def read_json(request: Request) -> Any:
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise RequestError(415, "unsupported_media_type", "this endpoint takes application/json")
    body = await request.body()
    try:
        return json.loads(body, parse_constant=reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, "bad_request", f"the body is not valid JSON ({exc})") from None


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_embed_request(payload: Any) -> tuple[list[str], str | int | None, float | list[float]]:
    if not isinstance(payload, dict):
        raise RequestError(400, "bad_request", 'the body must be a JSON object {"texts": [...]}')
    unknown = sorted(set(payload) - {"texts", "task", "weight"})
    if unknown:
        raise RequestError(400, "bad_request", f"unknown keys {unknown} (known: texts, task, weight)")
    texts = payload.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "bad_request", '"texts" must be a list of strings')
    if len(texts) > MAX_TEXTS:
        raise RequestError(413, "too_large", f"{len(texts)} texts in one request; at most {MAX_TEXTS}")
    task = payload.get("task")
    if task is not None and (isinstance(task, bool) or not isinstance(task, (str, int))):
        raise RequestError(400, "bad_request", '"task" must be null, a task name or a task index')
    weight = payload.get("weight", 0.0)
    values = weight if isinstance(weight, list) else [weight]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in values):
        raise RequestError(400, "bad_request", '"weight" must be a finite number or a list of them')
    return texts, task, weight
