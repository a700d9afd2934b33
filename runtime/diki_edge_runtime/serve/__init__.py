"""``diki-edge serve``: the calibrated DIKI predictor as a local HTTP service (extra ``serve``: starlette, uvicorn,
python-multipart).

* :mod:`.settings` — :class:`ServeSettings`, the server's own options (frozen; checked before anything opens);
* :mod:`.engine` — the model holder: one :class:`~diki_edge_runtime.predictor.Predictor`, the dynamic batching
  queue in front of it, bank reloads and idle unloading;
* :mod:`.metrics` — the counters and histograms behind ``GET /metrics`` (Prometheus text format);
* :mod:`.app` — the ASGI application (endpoints, authentication, body limits, request log);
* :mod:`.openapi` — the OpenAPI schema served at ``GET /openapi.json``;
* :mod:`.command` — the ``serve`` command itself (options shared with ``predict``; uvicorn; signals).

Nothing here imports the server libraries at import time except :mod:`.app`, so ``diki-edge`` without the extra
still starts (and answers ``serve`` with the install line).
"""

# import names of what the `serve` extra brings (cli.py lists the command only when all of them import)
SERVE_MODULES = ("starlette", "uvicorn", "python_multipart")
INSTALL_LINE = "pip install 'diki-edge-runtime[cpu,serve]'"
