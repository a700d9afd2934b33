"""The three distributions' metadata against their code: every import is declared, nothing declared is unused
(or it says why), the runtime never reaches for torch/open_clip/onnx or the other two, package data exists, and
smoke-benchmark results stay out of git.

Imports are read with ``ast`` from the source tree (every ``import`` statement, including those inside functions);
import names map to distributions through the installed environment (``importlib.metadata``).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
from support import NOT_RUNTIME, REPO  # tests/support.py

DISTRIBUTIONS = {  # name -> (pyproject.toml, package folder)
    "diki-edge-runtime": (REPO / "runtime" / "pyproject.toml", REPO / "runtime" / "diki_edge_runtime"),
    "diki-edge-export": (REPO / "export" / "pyproject.toml", REPO / "export" / "diki_edge_export"),
    "diki-edge": (REPO / "pyproject.toml", REPO / "diki_edge"),
}
FIRST_PARTY = {"diki_edge_runtime": "diki-edge-runtime", "diki_edge_export": "diki-edge-export",
               "diki_edge": "diki-edge"}
# Import names one of several distributions provides (the other may not be installed here).
ALTERNATIVES = {"onnxruntime": {"onnxruntime", "onnxruntime-gpu"}}
# Declared on purpose although no module imports them: name -> why.
NOT_IMPORTED = {
    "torchvision": "open_clip's image transforms import it; pinned beside torch by the Makefile",
    "onnxscript": "torch.onnx's dynamo exporter (export_model(dynamo=True)) imports it",
    "pytest": "the test runner (the runtime's test extra)",
    "pytest-timeout": "the test runner's plugin (the runtime's test extra)",
    "hypothesis": "the property-based tests (tests/runtime/test_fuzz.py; the runtime's test extra)",
    "diki-edge-export": "the training core's `export` extra: one install line for a training machine "
                        "(pip install 'diki-edge[export,cpu]'); the core itself never imports the exporter",
    "ruff": "the linter `make lint` runs (the dev extra)",
    "mkdocs": "builds the documentation site (`make docs`; the docs extra)",
    "mkdocs-material": "the documentation site's theme (the docs extra)",
    "mkdocstrings": "the API reference pages from the docstrings (the docs extra)",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1))


def declared(pyproject: Path, through_extras: bool = True) -> set[str]:
    """Distributions named in ``dependencies`` and every optional extra, plus what the extras of a first-party
    requirement bring (``diki-edge-runtime[cpu]`` declares onnxruntime; a first-party requirement's own
    dependencies do not count: a distribution declares what it imports)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    names = {requirement_name(s) for s in specs}
    for spec in specs if through_extras else []:
        extras = re.search(r"\[([^\]]+)\]", spec)
        if extras and requirement_name(spec) in DISTRIBUTIONS:
            other = tomllib.loads(DISTRIBUTIONS[requirement_name(spec)][0].read_text())["project"]
            for extra in extras.group(1).split(","):
                names |= {requirement_name(s) for s in other.get("optional-dependencies", {})[extra.strip()]}
    return names


def imports(package: Path) -> dict[str, list[str]]:
    """Top-level module name -> ``file:line`` of every absolute import of it in ``package``."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def providers(module: str, installed: dict[str, list[str]]) -> set[str]:
    """The distributions that provide import name ``module``."""
    if module in FIRST_PARTY:
        return {FIRST_PARTY[module]}
    return {canonical(d) for d in installed.get(module, [])} | ALTERNATIVES.get(module, set())


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_every_import_is_declared_and_every_declaration_imported(dist):
    pyproject, package = DISTRIBUTIONS[dist]
    deps = declared(pyproject)
    installed = packages_distributions()
    used: set[str] = set()
    undeclared, unknown = [], []
    for module, where in sorted(imports(package).items()):
        if module in sys.stdlib_module_names or FIRST_PARTY.get(module) == dist:
            continue
        dists = providers(module, installed)
        if not dists:
            unknown.append(f"{module} ({where[0]})")
        elif not dists & deps:
            undeclared.append(f"{module} from {sorted(dists)} ({', '.join(where[:3])})")
        used |= dists
    assert not unknown, f"{dist}: imports no installed distribution provides: {unknown}"
    assert not undeclared, f"{dist}: imports missing from {pyproject.relative_to(REPO)}: {undeclared}"
    unused = sorted(declared(pyproject, through_extras=False) - used - set(NOT_IMPORTED))
    assert not unused, f"{dist}: declared in {pyproject.relative_to(REPO)} but never imported: {unused}"


def test_the_runtime_neither_imports_nor_depends_on_torch_onnx_or_the_other_distributions():
    pyproject, package = DISTRIBUTIONS["diki-edge-runtime"]
    forbidden = {m: w for m, w in imports(package).items() if m in NOT_RUNTIME}
    assert not forbidden, f"the runtime imports {forbidden}"
    heavy = {"torch", "torchvision", "open-clip-torch", "onnx", "onnxscript", "diki-edge", "diki-edge-export"}
    assert not declared(pyproject) & heavy


def test_the_training_core_never_imports_the_exporter():
    """Arrows point one way: the exporter imports the training core, never the reverse (the demo and the ONNX
    evaluation method live in the exporter; the evaluator finds the latter through an entry point)."""
    core = imports(DISTRIBUTIONS["diki-edge"][1])
    assert "diki_edge_export" not in core, f"the training core imports the exporter at {core['diki_edge_export']}"
    assert "diki_edge" in imports(DISTRIBUTIONS["diki-edge-export"][1])


def test_the_checks_see_real_imports_and_declarations():
    """Guards against a parser that finds nothing (which would make the tests above pass vacuously)."""
    runtime = imports(DISTRIBUTIONS["diki-edge-runtime"][1])
    assert {"numpy", "PIL", "onnxruntime", "safetensors", "typer", "rich"} <= set(runtime)
    assert "torch" in imports(DISTRIBUTIONS["diki-edge"][1])
    assert {"numpy", "onnxruntime-gpu", "onnxruntime"} <= declared(DISTRIBUTIONS["diki-edge-runtime"][0])
    assert providers("PIL", packages_distributions()) == {"pillow"}
    assert providers("sklearn", packages_distributions()) == {"scikit-learn"}


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_package_data_lists_only_files_that_exist(dist):
    pyproject, _ = DISTRIBUTIONS[dist]
    setuptools = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    for package, patterns in setuptools.get("package-data", {}).items():
        folder = pyproject.parent / Path(*package.split("."))
        for pattern in patterns:
            matches = [p for p in folder.glob(pattern) if p.is_file()]
            assert matches, f"{pyproject}: {package}: {pattern!r} matches nothing"


def test_smoke_benchmark_results_are_ignored_by_git():
    """``python -m benchmarks --quick`` / ``--tiny`` write to benchmarks/results/quick|tiny; they must not show up
    as untracked files (the full run's results in benchmarks/results/ are committed)."""
    for rel in ("benchmarks/results/quick/summary.json", "benchmarks/results/tiny/latency.json"):
        res = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO)
        assert res.returncode == 0, f"{rel} is not ignored by git"
    assert subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/summary.json"], cwd=REPO).returncode == 1
