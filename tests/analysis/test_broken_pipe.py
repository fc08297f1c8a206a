"""`moelab analyze --json | head`: a reader leaving early must not cause a traceback (#9, 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import moelab


def test_closed_pipe_exits_quietly(fake_runs):
    env = dict(os.environ, PYTHONPATH=str(Path(moelab.__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moelab",
            "analyze",
            str(fake_runs["remoe"]),
            "--what",
            "dynamics",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # the reader is gone before the first byte: every write hits EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
