"""Hostile model folders and runtime setup: what ``Predictor`` and ``diki-edge predict`` refuse before any image is
read, and the CLI's output streams under a terminal. Torch-free (copies of the golden model folder)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from hostile import IMAGES, MODEL, REPO, strict_json

PHOTO = IMAGES / "chelsea_0.png"


def test_json_lines_reach_stdout_when_stderr_is_a_terminal(tmp_path):
    # the progress bar (more than one batch) draws on the terminal; the JSON lines must still go to stdout
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", "diki_edge_runtime", "predict", str(PHOTO),
                               str(IMAGES / "rocket_0.png"), "--model", str(MODEL), "--json", "-b", "1"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=follower, timeout=120,
                              env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    finally:
        os.close(follower)
        os.close(leader)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and len(lines) == 2
    assert [strict_json(line)["ok"] for line in lines] == [True, True]
