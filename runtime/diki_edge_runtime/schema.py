"""The bank metadata's schema: every field checked for type and range before anything uses it.

A bank's JSON metadata (``__metadata__["diki_edge"]`` of its safetensors file, see
:mod:`diki_edge_runtime.bank`) comes from a file that may be damaged or hostile. :func:`bank_metadata` checks it
field by field and raises :class:`MetadataError` — one line naming the file, the field (``tasks[2].classes[0]``)
and what was expected — so that no command meets a string where an object should be deep inside its own code.

Schema (format version 1)::

    {"format_version": int >= 1,
     "layout": {"backbone": object, "image_layers": int >= 1, "text_layers": int >= 0,
                "residual_length": int >= 1, "image_width": int >= 1, "text_width": int >= 1,
                "embed_dim": int >= 1, "calibration_levels": [finite numbers in [0, 1], at least 2, increasing],
                "ridge": finite number >= 0, "logit_scale": finite number > 0},
     "tasks": [{"name": non-empty string, "classes": [non-empty strings, at least 1],
                "template": string (optional), "num_samples": int >= 0 (optional), "extra": object (optional)}]}
"""

from __future__ import annotations

import math
from typing import Any

from diki_edge_runtime.calibration import Calibration
from diki_edge_runtime.errors import BankError

LAYOUT_INTS = {"image_layers": 1, "text_layers": 0, "residual_length": 1, "image_width": 1, "text_width": 1,
               "embed_dim": 1}  # field -> minimum


class MetadataError(BankError):
    """A metadata field has the wrong type or value; ``source``, ``field`` and ``expected`` say which and why."""

    def __init__(self, source: str, field: str, expected: str, value: Any):
        self.source, self.field, self.expected = source, field, expected
        super().__init__(f"{source}: metadata field {field} must be {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    kind = type(value).__name__
    return f"{kind} {text[:60]}{'…' if len(text) > 60 else ''}"


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, expected: str, value: Any) -> MetadataError:
        return MetadataError(self.source, field, expected, value)

    def obj(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "a JSON object", value)
        return value

    def key(self, parent: dict[str, Any], key: str, field: str) -> Any:
        if key not in parent:
            raise MetadataError(self.source, f"{field}.{key}" if field else key, "present", "nothing")
        return parent[key]

    def int_(self, value: Any, field: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(field, f"an integer >= {minimum}", value)
        return value

    def number(self, value: Any, field: str, minimum: float, strict: bool = False, maximum: float | None = None
               ) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > minimum if strict else value >= minimum) and (maximum is None or value <= maximum)
        if not ok:
            bound = f"> {minimum}" if strict else f">= {minimum}"
            bound += f" and <= {maximum}" if maximum is not None else ""
            raise self.fail(field, f"a finite number {bound}", value)
        return float(value)

    def string(self, value: Any, field: str, nonempty: bool = True) -> str:
        if not isinstance(value, str) or (nonempty and not value.strip()):
            raise self.fail(field, "a non-empty string" if nonempty else "a string", value)
        return value

    def list_(self, value: Any, field: str, min_len: int) -> list[Any]:
        if not isinstance(value, list) or len(value) < min_len:
            raise self.fail(field, f"a list of at least {min_len} item{'s' * (min_len != 1)}", value)
        return value


def bank_layout(data: Any, source: str, field: str = "layout") -> dict[str, Any]:
    """The checked ``layout`` object (the fields of ``bank.BankLayout``); raises :class:`MetadataError`."""
    c = _Checker(source)
    lay = c.obj(data, field)
    out: dict[str, Any] = {"backbone": c.obj(c.key(lay, "backbone", field), f"{field}.backbone")}
    for key, minimum in LAYOUT_INTS.items():
        out[key] = c.int_(c.key(lay, key, field), f"{field}.{key}", minimum)
    levels = c.list_(c.key(lay, "calibration_levels", field), f"{field}.calibration_levels", 2)
    out["calibration_levels"] = [c.number(v, f"{field}.calibration_levels[{i}]", 0.0, maximum=1.0)
                                 for i, v in enumerate(levels)]
    if any(b <= a for a, b in zip(out["calibration_levels"], out["calibration_levels"][1:])):
        raise c.fail(f"{field}.calibration_levels", "strictly increasing", levels)
    out["ridge"] = c.number(c.key(lay, "ridge", field), f"{field}.ridge", 0.0)
    out["logit_scale"] = c.number(c.key(lay, "logit_scale", field), f"{field}.logit_scale", 0.0, strict=True)
    return out


def task_info(data: Any, source: str, field: str, repair: bool = False) -> dict[str, Any]:
    """One checked task entry (the fields of ``bank.TaskInfo``); raises :class:`MetadataError`. ``repair`` accepts
    empty class names (older versions wrote them) so that the repair commands can still reach every task."""
    c = _Checker(source)
    t = c.obj(data, field)
    classes = c.list_(c.key(t, "classes", field), f"{field}.classes", 1)
    out = {
        "name": c.string(c.key(t, "name", field), f"{field}.name"),
        "classes": [c.string(v, f"{field}.classes[{i}]", nonempty=not repair) for i, v in enumerate(classes)],
    }
    if "template" in t:
        out["template"] = c.string(t["template"], f"{field}.template")
    if "num_samples" in t:
        out["num_samples"] = c.int_(t["num_samples"], f"{field}.num_samples", 0)
    if "extra" in t:
        out["extra"] = c.obj(t["extra"], f"{field}.extra")
    if "calibration" in t:
        try:
            out["calibration"] = Calibration.from_json(t["calibration"], f"{source}: {field}").to_json()
        except ValueError as exc:
            raise BankError(str(exc)) from None
    return out


def bank_metadata(data: Any, source: str, newest_version: int,
                  repair: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The checked ``(layout, tasks)`` of a bank's metadata; refuses a newer format than ``newest_version``
    (``repair``: see :func:`task_info`)."""
    c = _Checker(source)
    meta = c.obj(data, "(top level)")
    version = c.int_(c.key(meta, "format_version", ""), "format_version", 1)
    if version > newest_version:
        raise BankError(f"{source}: bank format version {version} is newer than this diki-edge supports "
                        f"({newest_version}); upgrade diki-edge")
    layout = bank_layout(c.key(meta, "layout", ""), source)
    tasks = c.list_(c.key(meta, "tasks", ""), "tasks", 0)
    return layout, [task_info(t, source, f"tasks[{i}]", repair) for i, t in enumerate(tasks)]
