"""Helpers of the server tests: the real ``diki-edge serve`` as a subprocess on a free loopback port, and a real
HTTP client (the standard library's ``http.client``). Every address used is 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from support import GOLDEN

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60  # the golden model opens in ~1 s; a contended machine can take many times that


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class Server:
    """``python -m diki_edge_runtime serve --model GOLDEN ARGS`` on 127.0.0.1, stopped by :meth:`stop`."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None, key: str | None = None):
        self.port = free_port()
        self.key = key
        self.log = cwd / f"serve-{self.port}.log"
        command = [sys.executable, "-m", "diki_edge_runtime", "serve", "--model", str(GOLDEN / "model"),
                   "--host", LOOPBACK, "--port", str(self.port), "--threads", "1", "--workers", "1", *args]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if self.get("/healthz").status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server did not answer within {START_TIMEOUT_S} s: {self.log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: bool = True, timeout: float = 60) -> Response:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            sent = dict(headers or {})
            if auth and self.key:
                sent.setdefault("Authorization", f"Bearer {self.key}")
            conn.request(method, path, body=body, headers=sent)
            res = conn.getresponse()
            return Response(res.status, {k.lower(): v for k, v in res.getheaders()}, res.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Response:
        return self.request("GET", path, **kw)

    def predict(self, files: list[tuple[str, bytes]], fields: list[tuple[str, str]] = (), **kw) -> Response:
        body, content_type = multipart([("image", f) for f in files] + list(fields))
        return self.request("POST", "/v1/predict", body, {"Content-Type": content_type}, **kw)

    def post_json(self, path: str, payload: Any, **kw) -> Response:
        return self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"}, **kw)

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def wait_metric(self, name: str, value: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value} (now {self.metric(name)})"
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def multipart(fields: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """A multipart/form-data body: text fields, and files as ``(filename, bytes)``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        if isinstance(value, tuple):
            filename, data = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            parts.append(f"--{boundary}\r\n{head}".encode() + data + b"\r\n")
        else:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
