"""The allocator setting the command line applies at start-up."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc only")
def test_keep_freed_memory_applies_once_and_can_be_disabled():
    code = (
        "from moelab import runtime; "
        "print(runtime.keep_freed_memory(), runtime.keep_freed_memory(), runtime.allocator_mode())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["True", "True"] and "heap kept" in out.stdout
    env_off = {"MOELAB_SYSTEM_MALLOC": "1", "PATH": ""}
    off = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env_off
    )
    assert off.stdout.split()[:2] == ["False", "False"] and "system default" in off.stdout
