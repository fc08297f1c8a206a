"""Fixtures of the compression tests (the tiny dataset and one-thread torch of run_fixtures)."""

from run_fixtures import data_dir, one_torch_thread  # noqa: F401
