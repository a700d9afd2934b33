"""The ``diki-edge`` command line: one typer app, owned by the runtime.

The runtime registers ``predict`` and ``bank``, and ``serve`` when its extra is installed (``serve``: the HTTP
service, diki_edge_runtime/serve/); the other distributions add their commands through the entry-point
group :data:`COMMAND_GROUP` (``diki-edge`` adds ``train``, ``eval``, ``demo``; ``diki-edge-export`` adds
``export``). An edge install therefore lists only what works there, and a command that belongs to a distribution
that is not installed is answered with the ``pip install`` line that brings it, not "no such command".

Errors that are the user's (a bad file, an incompatible bank) print one clear line and exit with status 1 (2 for
usage and setup errors); they never show a traceback.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
import threading
from importlib.metadata import entry_points

import typer
from rich.console import Console
from rich.markup import escape

from diki_edge_runtime.cli_bank import bank_app
from diki_edge_runtime.cli_predict import predict_command
from diki_edge_runtime.errors import DikiEdgeError
from diki_edge_runtime.serve import INSTALL_LINE, SERVE_MODULES

# Each entry point names a callable ``register(app: typer.Typer) -> None`` that adds its commands.
COMMAND_GROUP = "diki_edge.commands"
# Commands other distributions provide: the install line to print when one is asked for but missing.
PLUGIN_COMMANDS = {
    "train": "pip install diki-edge",
    "eval": "pip install 'diki-edge[data]'",
    "demo": "pip install 'diki-edge[data,export]'",
    "export": "pip install diki-edge-export",
    "serve": INSTALL_LINE,
}

err = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the terminal width


def build_app() -> typer.Typer:
    """The app with the runtime's commands and every installed distribution's."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="DIKI continual-learning adapters for CLIP: train, export to ONNX, predict torch-free.")
    app.command("predict")(predict_command)
    app.add_typer(bank_app, name="bank")
    if serve_available():
        from diki_edge_runtime.serve.command import serve_command

        app.command("serve")(serve_command)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # installed, but a dependency of it is not: its commands answer with why
            _BROKEN_PLUGINS[ep.name] = f"{ep.value} cannot be imported ({exc})"
            continue
        register(app)
    return app


_BROKEN_PLUGINS: dict[str, str] = {}


def serve_available() -> bool:
    """Whether the ``serve`` extra's packages are installed (``diki-edge serve`` is listed only then)."""
    for name in SERVE_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


def _missing_command(argv: list[str], app: typer.Typer) -> str | None:
    """The install line for a plugin command that is asked for but not installed, or None."""
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] not in PLUGIN_COMMANDS:
        return None
    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    if words[0] in registered:
        return None
    why = "; ".join(_BROKEN_PLUGINS.values())
    return PLUGIN_COMMANDS[words[0]] + (f" (installed commands failed to load: {why})" if why else "")


def _exit_on_sigterm() -> bool:
    """Turn SIGTERM into ``SystemExit(143)`` so every ``finally`` runs (staging folders, temporaries, locks), as
    SIGINT's KeyboardInterrupt does; the default action would kill the process and leave them behind. A second
    SIGTERM kills at once. Only where nobody installed a handler of their own (``serve`` installs its own)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return False

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        err.print("[bold red]error:[/] terminated (SIGTERM)", highlight=False)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return True


def main(argv: list[str] | None = None) -> None:
    installed = _exit_on_sigterm()
    try:
        _main(argv)
    finally:  # an in-process caller (tests, an embedding program) gets the default SIGTERM action back
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    app = build_app()
    install = _missing_command(argv, app)
    if install:
        err.print(f"[bold red]error:[/] `diki-edge {argv[0]}` is not part of this install (the runtime only has "
                  f"`predict` and `bank`): {escape(install)}", highlight=False)
        sys.exit(2)
    try:
        app(args=argv, prog_name="diki-edge")
    except DikiEdgeError as exc:  # the one place that prints a user error; its class says the exit status
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:  # a plugin command whose heavy dependency is missing from this install
        root = (exc.name or "").split(".")[0]
        if not root or root.startswith("diki_edge_runtime"):
            raise
        err.print(f"[bold red]error:[/] `diki-edge {argv[0]}` needs {root!r}, which is not installed here "
                  f"({PLUGIN_COMMANDS.get(argv[0], 'pip install diki-edge')} brings it; `diki-edge predict` and "
                  f"`diki-edge bank` do not need it)", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
