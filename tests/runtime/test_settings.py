"""The frozen settings objects: one ``PredictorSettings`` (with its ``SessionSettings``) opens the image and the
text graph alike, is equivalent to ``Predictor``'s keyword options, and is what ``diki-edge predict`` builds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from diki_edge_runtime import Predictor, PredictorSettings, SessionSettings
from diki_edge_runtime.cli_predict import RuntimeOptions


def test_settings_and_keyword_options_open_the_same_predictor(golden):
    settings = PredictorSettings(SessionSettings(threads=1, low_memory=True, log_severity=4), workers=0,
                                 max_pixels=1_000_000)
    by_settings = Predictor(golden.model_dir, settings=settings)
    by_keywords = Predictor(golden.model_dir, threads=1, low_memory=True, log_severity=4, workers=0,
                            max_pixels=1_000_000)
    assert by_settings.settings == by_keywords.settings == settings
    assert by_settings.workers == 0 and by_settings.max_pixels == 1_000_000
    assert by_settings.session.memory_settings["low_memory"] is True
    # the text graph is opened from the very same settings (not a hand-copied subset of them)
    assert by_settings.text_encoder().session.low_memory is True
    files = [str(f) for f in golden.files]
    a, b = by_settings.predict(files), by_keywords.predict(files)
    # same graph, same threads, same inputs: the runs are the same computation, bit for bit
    assert [r.top_k for r in a] == [r.top_k for r in b]
    assert all(np.array_equal(x.image_embeds, y.image_embeds) for x, y in zip(a, b))


def test_settings_are_frozen_and_exclusive_with_keywords(golden):
    settings = PredictorSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.workers = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="not both"):
        Predictor(golden.model_dir, threads=1, settings=settings)
    with pytest.raises(TypeError, match="not both"):
        Predictor(golden.model_dir, "cpu,cpu", settings=settings)


def test_cli_options_build_one_settings_object(tmp_path):
    options_file = tmp_path / "options.json"
    options_file.write_text(json.dumps({"cpu": {"a": 1, "b": 2}}))
    runtime = RuntimeOptions(tmp_path, provider="cpu", provider_option=("cpu:a=3",), provider_options=options_file,
                             threads=2, workers=1, fast_decode=True, low_memory=True, quiet=True)
    settings = runtime.settings()  # the file first, then --provider-option over it
    assert settings.session == SessionSettings("cpu", 2, provider_options={"cpu": {"a": "3", "b": 2}},
                                               low_memory=True, log_severity=4)
    assert (settings.workers, settings.fast_decode) == (1, True)
    assert RuntimeOptions(tmp_path, verbose=True).settings().session.log_severity == 1
