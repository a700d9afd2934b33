"""`diki-edge demo -q` prints only its summary: the accuracy table and where the outputs are, none of the sections
before it. Run on two DCIL tasks cut down to a few images (the full demo takes half a minute)."""

from __future__ import annotations

import dataclasses

import pytest
from support import cli_in_process  # tests/support.py

SECTIONS = ("1/5 DCIL tasks", "2/5 diki-edge train", "3/5 reload the bank", "4/5 diki-edge predict",
            "5/5 accuracy", "learned 'textures'", "true task")


@pytest.fixture()
def small_demo(monkeypatch):
    import diki_edge.datasets as datasets
    from diki_edge.datasets.dcil import TASK_ORDERS, make_task

    def few(pairs, per_class):  # every class keeps some images: a class folder may not be empty
        kept, seen = [], {}
        for image, label in pairs:
            if seen.setdefault(label, 0) < per_class:
                kept.append((image, label))
                seen[label] += 1
        return kept

    def two_small_tasks(order: str = "A", seed: int = 0):
        return [dataclasses.replace(t, train=few(t.train, 3), test=few(t.test, 1))
                for t in (make_task(name, seed) for name in TASK_ORDERS[order][:2])]

    monkeypatch.setattr(datasets, "dcil_benchmark", two_small_tasks)
    return TASK_ORDERS["A"][:2]


def test_demo_quiet_prints_the_summary_and_no_section(small_demo, tmp_path):
    loud = cli_in_process("demo", "--out", tmp_path / "loud", "--epochs", "1")
    assert loud.exit_code == 0, loud.stderr[-2000:]
    for section in SECTIONS:  # what -q must leave out is there without it
        assert section in loud.stdout + loud.stderr, section

    quiet = cli_in_process("demo", "--out", tmp_path / "quiet", "--epochs", "1", "-q")
    assert quiet.exit_code == 0, quiet.stderr[-2000:]
    both = quiet.stdout + quiet.stderr
    for section in SECTIONS:
        assert section not in both, section
    for header in ("zero-shot backbone", "DIKI (exported, ONNX Runtime)", "task selected", *small_demo):
        assert header in quiet.stdout, header
    assert f"outputs in {tmp_path / 'quiet'}" in " ".join(quiet.stderr.split())
    assert "statistics" not in both and "epochs" not in both  # no progress bars either
