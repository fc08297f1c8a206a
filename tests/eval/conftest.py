"""Fixtures of the evaluation tests (shared with the training tests, from tests/run_fixtures.py)."""

from run_fixtures import data_dir, one_torch_thread  # noqa: F401
