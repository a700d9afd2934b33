"""Helpers shared by several test folders (``tests`` is on pytest's ``pythonpath``). Torch-free."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The committed exported model folder the runtime's tests run on (scripts/make_golden_model.py writes it).
GOLDEN = REPO / "tests" / "runtime" / "golden"

# What the runtime must never import.
TORCH_MODULES = ("torch", "torchvision", "open_clip")
NOT_RUNTIME = TORCH_MODULES + ("onnx", "onnxscript", "diki_edge", "diki_edge_export")


def block(*modules: str) -> str:
    """Source of a meta-path hook that makes importing ``modules`` (and their submodules) fail with an
    ImportError, to put before anything else runs."""
    return textwrap.dedent(f"""
        import sys
        class _Block:
            BLOCKED = {tuple(modules)!r}
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in self.BLOCKED:
                    raise ImportError(f"blocked import of {{name}} (the runtime must not need it)", name=name)
                return None
        sys.meta_path.insert(0, _Block())
    """)


BLOCK_TORCH = block(*TORCH_MODULES)


def run_blocked(code: str, *args: str, block: str = BLOCK_TORCH, timeout: float = 120) -> subprocess.CompletedProcess:
    script = block + "\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def golden_script():
    """``scripts/make_golden_model.py`` as a module (torch-free at import; only ``make_golden`` needs torch)."""
    spec = importlib.util.spec_from_file_location("make_golden_model", REPO / "scripts" / "make_golden_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graph_output_errors(got: dict, want: dict, inputs: dict) -> dict[str, float]:
    """Each fp32 output difference of two implementations of the image graph as a fraction of its bound from
    ``diki_edge_runtime.tolerances`` (1.0 = at the bound), for ``got``/``want`` outputs fed the same bank ``inputs``."""
    import numpy as np

    from diki_edge_runtime import tolerances as tol

    gauss = [inputs[k] for k in ("gauss_mean", "gauss_whiten", "gauss_const")]
    score_bound = tol.score_error_bound(want["frozen_embeds"], got["frozen_embeds"], *gauss)
    rows = np.arange(len(want["task"]))
    chosen = want["task_scores"][rows, want["task"]]
    weight_bound = tol.weight_error_bound(score_bound[rows, want["task"]], chosen, inputs["calib_slope"][want["task"]],
                                          inputs["calib_bias"][want["task"]])
    embeds = max(float(np.abs(got[k] - want[k]).max(initial=0.0)) for k in ("image_embeds", "frozen_embeds"))
    d_scores = np.abs(got["task_scores"].astype(np.float64) - want["task_scores"])
    return {"embeds": embeds / tol.EMBED_MAX_ABS,
            "scores": float((d_scores / score_bound).max(initial=0.0)),
            "weight": float((np.abs(got["weight"].astype(np.float64) - want["weight"]) / weight_bound)
                            .max(initial=0.0)),
            "task_disagreements": float(np.sum(~tol.tasks_agree(got["task"], want["task_scores"].astype(np.float64),
                                                                 want["task"], score_bound)))}


def assert_graph_outputs_close(got: dict, want: dict, inputs: dict, what: str) -> None:
    """The export validation's fp32 bounds (``diki_edge_runtime.tolerances``) plus identical top-1 classes and
    masked (-inf) logits: the top-1 is compared only where the task agrees (a tied task legitimately changes it)."""
    import numpy as np

    errors = graph_output_errors(got, want, inputs)
    assert errors["embeds"] <= 1 and errors["scores"] <= 1 and errors["weight"] <= 1, (what, errors)
    assert errors["task_disagreements"] == 0, (what, errors)
    same = got["task"] == want["task"]
    np.testing.assert_array_equal(got["logits"][same].argmax(1), want["logits"][same].argmax(1), err_msg=what)
    np.testing.assert_array_equal(np.isinf(got["logits"][same]), np.isinf(want["logits"][same]), err_msg=what)


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def cli_in_process(*args: str) -> CliResult:
    """``diki-edge ARGS`` through ``diki_edge_runtime.cli.main`` (the one place that prints errors), in this process:
    the exit status and what it wrote to stdout and stderr."""
    from diki_edge_runtime.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())
