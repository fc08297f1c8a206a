"""Fixtures of the training tests (helpers live in train_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_fixtures import make_dataset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
