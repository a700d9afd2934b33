"""The documentation stays true to the code: every contract tensor has a row in the architecture page's table of
where tensors are made and consumed, and no tracked text file refers to work items (a hash sign or the word
"issue" before a number) or to notes kept outside the repository. The examples below are assembled from pieces so
that this file passes its own check."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from diki_edge_runtime import contract

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# A hash sign before a number as a reference, but not an input label such as "<PIL RGB 640x480 #N>", an HTML
# entity, a URL fragment or a hex colour with letters; the word issue(s) before a number; the design notes' file.
WORK_ITEM = re.compile(r"(?<![\w&/#])#\d{1,3}(?![\w>])|\bissues? \d+\b|\bDESIGN\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".json", ".txt", ".cfg", ".ini", ""}


def tensor_rows() -> set[str]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Where tensors are made and consumed", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


def test_every_contract_tensor_has_a_row():
    declared = (set(contract.BANK_ARRAY_NAMES) | set(contract.INPUT_NAMES) | set(contract.OUTPUT_NAMES)
                | set(contract.TEXT_INPUT_NAMES) | set(contract.TEXT_OUTPUT_NAMES))
    rows = tensor_rows()
    assert declared - rows == set(), f"{ARCHITECTURE}: no row for {sorted(declared - rows)}"
    assert rows - declared == set(), f"{ARCHITECTURE}: rows for names the contract lacks: {sorted(rows - declared)}"


def test_pattern_catches_work_items_and_spares_labels():
    hash_sign, issue, notes = "#", "issue", "DESIGN" + ".md"
    assert WORK_ITEM.search(f"measured in {hash_sign}13's run") and WORK_ITEM.search(f"({issue} 10)")
    assert WORK_ITEM.search(f"for {hash_sign}1-{hash_sign}10") and WORK_ITEM.search(f"see {notes}")
    for fine in ("<PIL RGB 640x480 #3>", "&#39;", "colour #1e90ff", "# comment", "x #\n", "page.html#section-2"):
        assert not WORK_ITEM.search(fine), fine


def test_no_work_item_references_in_tracked_text():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    hits = []
    for name in tracked.decode().split("\0"):
        path = ROOT / name
        if not name or Path(name).suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{name}:{n}: {line.strip()[:100]}" for n, line in enumerate(text.splitlines(), 1)
                 if WORK_ITEM.search(line)]
    assert not hits, "work-item references:\n" + "\n".join(hits)
