#!/usr/bin/env python
"""The DCIL benchmark: every method side by side on both task orders, on the bundled diki-tiny.

    HF_HUB_OFFLINE=1 python benchmarks/dcil.py              # the full benchmark (<= 20 min on 2 CPU cores)
    HF_HUB_OFFLINE=1 python benchmarks/dcil.py --quick      # the reduced version (a few minutes)

Writes ``benchmarks/results/dcil.{json,md,png}`` (``--quick``: ``dcil-quick.*``). Same options as
``diki-edge eval`` (``--help``); this script only changes the default report name for ``--quick``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import typer  # noqa: E402

from diki_edge.evaluation.command import eval_command  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(RESULTS)]
    if "--name" not in argv and "--quick" in argv:
        argv += ["--name", "dcil-quick"]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(eval_command)
    typer.main.get_command(app).main(args=argv, prog_name="benchmarks/dcil.py")


if __name__ == "__main__":
    main()
