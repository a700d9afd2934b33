"""Shared fixtures: a tiny open_clip backbone with random weights, written and loaded like a user's local one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from diki_edge.testing import write_tiny_model_dir  # noqa: E402  (after the offline switches)

__all__ = ["write_tiny_model_dir"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_model_spec(tiny_model_dir) -> str:
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture()
def tiny_backbone(tiny_model_spec):
    from diki_edge.backbone import load_backbone

    return load_backbone(tiny_model_spec)
