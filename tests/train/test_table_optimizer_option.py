"""``optim.table_optimizer``: the config option behind ``build_optimizer(table_optimizer=...)``."""

from __future__ import annotations

from typing import get_args, get_type_hints

import pytest

from moelab.config import ConfigError
from moelab.train.config import OptimConfig, resolve_run_config
from moelab.train.optim import SPARSE_MODES


def test_default_is_lazy_and_dense_parses() -> None:
    assert OptimConfig().table_optimizer == "lazy"
    cfg = resolve_run_config("peer-tiny", overrides=["optim.table_optimizer=dense"])
    assert cfg.optim.table_optimizer == "dense"
    assert get_args(get_type_hints(OptimConfig)["table_optimizer"]) == SPARSE_MODES


def test_unknown_mode_names_the_field() -> None:
    with pytest.raises(ConfigError, match="optim.table_optimizer: must be one of 'lazy', 'dense'"):
        resolve_run_config("peer-tiny", overrides=["optim.table_optimizer=eager"])
