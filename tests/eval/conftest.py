"""Fixtures of the evaluation tests (defined in tests/train/train_fixtures.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))

from train_fixtures import data_dir, one_torch_thread  # noqa: E402, F401
