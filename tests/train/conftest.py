"""Fixtures of the training tests (shared with the evaluation tests, from tests/run_fixtures.py)."""

from run_fixtures import data_dir, one_torch_thread  # noqa: F401
