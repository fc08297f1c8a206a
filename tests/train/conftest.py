"""Fixtures of the training tests (defined in train_fixtures.py, shared with tests/eval)."""

from train_fixtures import data_dir, one_torch_thread  # noqa: F401
