"""Fixtures of the distributed tests (the tiny dataset of tests/run_fixtures.py)."""

from run_fixtures import data_dir, one_torch_thread  # noqa: F401
