"""The ``diki-edge serve`` command: the model-opening options of ``diki-edge predict`` (the same
``RuntimeOptions`` and ``PredictorSettings``) plus :class:`ServeSettings`, then uvicorn on the application.

Signals: SIGTERM and SIGINT stop accepting connections, let the requests in flight finish (at most
``--drain-seconds``) and exit 0; SIGHUP re-reads the bank file like ``POST /v1/admin/reload``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Annotated

import typer

from diki_edge_runtime.cli_predict import (
    BankOption,
    BatchSizeOption,
    FastDecodeOption,
    LowMemoryOption,
    ModelOption,
    PrecisionOption,
    ProviderOption,
    ProviderOptionArgs,
    ProviderOptionsFile,
    QuietOption,
    RuntimeOptions,
    ThreadsOption,
    TopKOption,
    VerboseOption,
    WorkersOption,
)
from diki_edge_runtime.errors import RuntimeSetupError
from diki_edge_runtime.serve.settings import ServeSettings


def serve_command(
    model: ModelOption,
    bank: BankOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        envvar="DIKI_EDGE_API_KEY", show_default=False, show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /healthz.")] = None,
    provider: ProviderOption = "cpu",
    provider_option: ProviderOptionArgs = None,
    provider_options: ProviderOptionsFile = None,
    threads: ThreadsOption = None,
    workers: WorkersOption = None,
    fast_decode: FastDecodeOption = False,
    low_memory: LowMemoryOption = False,
    batch_size: BatchSizeOption = 8,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to share its batch.")]
    = 5.0,
    top_k: TopKOption = 5,
    max_body_mb: Annotated[float, typer.Option(help="Request body limit in MiB (413 above).")] = 64.0,
    max_images: Annotated[int, typer.Option(help="Image files per predict request.")] = 64,
    queue_limit: Annotated[int, typer.Option(help="Predict requests waiting for the model; past it 503.")] = 64,
    idle_unload: Annotated[float | None, typer.Option(
        help="Release the ONNX Runtime sessions after this many idle seconds (reopened on the next request).",
        show_default=False)] = None,
    drain_seconds: Annotated[float, typer.Option(help="SIGTERM: time requests in flight get to finish.")] = 10.0,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="Allow browser requests from this origin (repeatable); none by default.",
        show_default=False)] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="One JSON line per request on stderr.")] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
    precision: PrecisionOption = "fp32",
) -> None:
    """Serve calibrated predictions over HTTP (local by default; see docs/serve.md)."""
    runtime = RuntimeOptions(model, bank, provider, tuple(provider_option or ()), provider_options, threads, workers,
                             fast_decode, low_memory, quiet, verbose, precision)
    serve = ServeSettings(host, port, api_key, batch_size, max_wait_ms, max_body_mb, max_images, queue_limit,
                          idle_unload, drain_seconds, tuple(cors_origin or ()), log_json, top_k)
    run_server(runtime, serve)


def run_server(runtime: RuntimeOptions, serve: ServeSettings) -> None:
    """Check everything, open the model, serve until a stop signal. Errors are ``DikiEdgeError``s (cli.main)."""
    serve.check()
    runtime.check()
    settings = runtime.settings()
    import uvicorn

    from diki_edge_runtime.serve.app import build_app
    from diki_edge_runtime.serve.engine import Engine
    from diki_edge_runtime.serve.metrics import Metrics

    engine = Engine(runtime.model, runtime.bank, settings, serve, Metrics())
    engine.open()
    config = uvicorn.Config(build_app(engine), host=serve.host, port=serve.port, access_log=False,
                            log_level="warning" if runtime.quiet else "info", server_header=False,
                            timeout_graceful_shutdown=serve.drain_seconds, lifespan="on")
    server = DrainingServer(config, engine)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise RuntimeSetupError(f"cannot listen on {serve.host}:{serve.port} (see the message above)") from None
    if not server.started:
        raise RuntimeSetupError(f"cannot listen on {serve.host}:{serve.port} (see the message above)")


class DrainingServer:
    """uvicorn's server with the stop signals of this command: a stop drains and returns (exit 0) instead of
    re-raising the signal as uvicorn does, and SIGHUP reloads the bank in a thread."""

    def __new__(cls, config, engine):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                stop = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
                hup = signal.signal(signal.SIGHUP, self.hangup) if hasattr(signal, "SIGHUP") else None
                try:
                    yield
                finally:
                    for sig, handler in stop.items():
                        signal.signal(sig, handler)
                    if hup is not None:
                        signal.signal(signal.SIGHUP, hup)

            def stop(self, sig, frame):
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            def hangup(self, sig, frame):
                threading.Thread(target=reload_logged, args=(engine,), daemon=True).start()

        return Server(config)


def reload_logged(engine) -> None:
    """SIGHUP: reload the bank; the outcome goes to stderr (a refused bank keeps the old one)."""
    from diki_edge_runtime.errors import BankError

    try:
        answer = engine.reload()
    except BankError as exc:
        engine.metrics.error("bank_refused")
        sys.stderr.write(f"reload refused: {exc}; the previous bank is still in use\n")
    else:
        sys.stderr.write(f"reloaded {answer['bank']}: {len(answer['tasks'])} tasks, bank version "
                         f"{answer['bank_version']}\n")
    sys.stderr.flush()
