"""Shared fixtures. Torch-free at import time: the runtime's tests run from here in a venv without torch.

The tiny open_clip backbone (random weights, written and loaded like a user's local one) is made on first use by
the fixtures below, which import the training core only then.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from diki_edge.testing import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_model_spec(tiny_model_dir) -> str:
    return f"local-dir:{tiny_model_dir}"


@pytest.fixture()
def tiny_backbone(tiny_model_spec):
    from diki_edge.backbone import load_backbone

    return load_backbone(tiny_model_spec)
