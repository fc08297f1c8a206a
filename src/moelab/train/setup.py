"""What a run needs before its first step: the dataset, the device, the λ controller, RNG state.

Kept out of the trainer so that ``trainer.py`` shows the training step and the loop. Every check
here raises a :class:`~moelab.config.ConfigError` naming the field, before any training.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from moelab.config import ConfigError
from moelab.data import TokenDataset, check_vocab_compatible, default_dataset_dir
from moelab.layers.base import RoutedLayer
from moelab.layers.sparsity_controller import SparsityController
from moelab.model import TransformerLM
from moelab.train.config import RunConfig

__all__ = [
    "build_controller",
    "open_dataset",
    "resolve_device",
    "rng_state",
    "routed_by_block",
    "set_rng_state",
    "use_bf16",
]


def open_dataset(config: RunConfig) -> TokenDataset:
    """The run's dataset (embedded corpus when ``data.path`` is null), checked against the model."""
    if config.data.path is None:
        path = default_dataset_dir()
    else:
        path = Path(config.data.path).expanduser()
        if not path.exists():
            raise ConfigError(
                "data.path",
                f"{str(path)!r} does not exist; expected a directory made by `moelab data "
                "prepare`, or null for the embedded corpus",
            )
    try:
        ds = TokenDataset(path)
    except ValueError as err:
        raise ConfigError("data.path", str(err)) from None
    check_vocab_compatible(ds, config.model.vocab_size)
    for split in ("train", "val"):
        n = ds.num_tokens(split)
        if n < config.data.seq_len + 1:
            raise ConfigError(
                "data.seq_len",
                f"{config.data.seq_len} needs at least {config.data.seq_len + 1} tokens, split "
                f"{split!r} of {ds.path} has {n}",
            )
    return ds


def resolve_device(config: RunConfig) -> torch.device:
    want = config.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "'cuda' requested but CUDA is not available; use cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def use_bf16(config: RunConfig, device: torch.device) -> bool:
    p = config.train.precision
    if p == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision", "'bf16' autocast needs CUDA here; use fp32 or auto")
    return p == "bf16" or (p == "auto" and device.type == "cuda")


def build_controller(model: TransformerLM, config: RunConfig) -> SparsityController | None:
    """ReMoE's λ controller when any routed layer has a sparsity target (router="relu")."""
    targets = [t for layer in model.routed_layers() if (t := layer.sparsity_target) is not None]
    if not targets:
        return None
    t = config.train
    return SparsityController(
        targets[0],
        lambda0=t.lambda0,
        alpha=t.lambda_alpha,
        per_layer=t.lambda_per_layer,
        lambda_min=t.lambda_min,
        lambda_max=t.lambda_max,
    )


def routed_by_block(model: TransformerLM) -> dict[str, RoutedLayer]:
    """Routed layers keyed by their block index (the ``layers`` keys of metrics lines)."""
    return {
        str(i): block.ffn
        for i, block in enumerate(model.blocks)
        if isinstance(block.ffn, RoutedLayer)
    }


def rng_state() -> dict[str, Any]:
    """Every random stream training draws from (saved in checkpoints for an exact resume)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    """``random.setstate`` wants tuples; a state read back from a checkpoint may hold lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
