"""What a run needs before its first step: the dataset, the device, the λ controller.

Kept out of the trainer so that ``trainer.py`` shows the training step and the loop. Every check
here raises a :class:`~moelab.config.ConfigError` naming the field, before any training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moelab.config import ConfigError
from moelab.data import TokenDataset, check_vocab_compatible, default_dataset_dir
from moelab.layers.base import RoutedLayer
from moelab.layers.sparsity_controller import SparsityController
from moelab.model import ModelConfig, TransformerLM
from moelab.train.config import RunConfig

__all__ = [
    "build_controller",
    "check_resume_config",
    "check_trainable",
    "open_dataset",
    "resolve_device",
    "routed_by_block",
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


FIXED_ON_RESUME = ("seq_len", "batch_size")
"""``data`` fields a resumed run keeps: its token counts are ``step × batch_size × seq_len``."""
HEAD_LAYOUT = ("n_heads", "n_kv_heads")
"""Model fields that change how the attention weights are split into heads without changing their
shapes: a checkpoint would load, and mean something else."""


def check_trainable(config: RunConfig) -> None:
    """Refuse a model that cannot train (quantized experts), naming the field, before a run
    directory is touched (``moelab train`` and :func:`~moelab.train.train`; laying out a
    compressed run at step 0 builds a Trainer without training)."""
    untrainable = config.model.ffn.untrainable()
    if untrainable is not None:
        raise ConfigError(f"model.ffn.{untrainable[0]}", untrainable[1])


def check_resume_config(saved: RunConfig, new: RunConfig) -> None:
    """Refuse what a checkpoint of ``saved`` cannot continue as ``new``: a model change that
    alters a parameter's shape or the model's structure (``model.ffn.num_experts``, ``d_model``,
    the FFN kind or router, ...), a new head layout, a new ``data.seq_len`` / ``batch_size``, or a
    new ``data.seed`` (the sampler resumes its stream from the checkpoint, so a new seed would be
    silently ignored).

    Called on resume before anything is read from or written to the run directory, so a refused
    override leaves the run as it was. Other model fields (aux-loss coefficients, capacity factor,
    ``top_k``, backend, ...) may change. One line names each offending field (old → new).
    """
    if saved.data.seed != new.data.seed:
        raise ConfigError(
            "data.seed",
            f"cannot change on resume ({saved.data.seed} → {new.data.seed}): the window stream "
            "continues from the checkpoint's sampler state; train a new run (--run-dir) instead",
        )
    for name in FIXED_ON_RESUME:
        old, cur = getattr(saved.data, name), getattr(new.data, name)
        if old != cur:
            raise ConfigError(
                f"data.{name}",
                f"cannot change on resume ({old} → {cur}): the run counts its tokens as steps × "
                "batch_size × seq_len; train a new run (--run-dir) instead",
            )
    changed = _changed_fields(saved.model.to_dict(), new.model.to_dict())
    if not changed:
        return
    base = _structure(saved.model.to_dict())
    if _structure(new.model.to_dict()) == base and not set(changed) & set(HEAD_LAYOUT):
        return
    blamed = {
        name: values
        for name, values in changed.items()
        if name in HEAD_LAYOUT
        or _structure(_with(saved.model.to_dict(), name, values[1])) not in (None, base)
    } or changed  # no field does it alone (or not validly alone): name them all
    fields = ", ".join(f"model.{name} ({old} → {cur})" for name, (old, cur) in blamed.items())
    raise ConfigError(
        "",
        f"{fields}: cannot change on resume: the checkpoint's weights are for another model "
        "shape or structure; train a new run (--run-dir) instead",
    )


def _changed_fields(old: Any, new: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted paths whose values differ between two config dicts; a changed ``kind`` is reported
    alone (the other fields of another kind are not comparable)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if old.get("kind") != new.get("kind"):
            return {_join(path, "kind"): (old.get("kind"), new.get("kind"))}
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(old.keys() | new.keys()):
            out.update(_changed_fields(old.get(key), new.get(key), _join(path, key)))
        return out
    return {} if old == new else {path: (old, new)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _with(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of the nested dict ``raw`` with one dotted field replaced."""
    out = dict(raw)
    head, _, rest = dotted.partition(".")
    out[head] = _with(out.get(head) or {}, rest, value) if rest else value
    return out


def _structure(raw_model: dict[str, Any]) -> Any:
    """What a checkpoint must match: every module's type and every tensor's name, shape and dtype,
    from a model built on the meta device (no memory, no RNG draws); None for an invalid config."""
    try:
        model_config = ModelConfig.from_dict(raw_model)
    except ConfigError:
        return None
    with torch.device("meta"):
        model = TransformerLM(model_config)
    modules = [(name, type(m).__qualname__) for name, m in model.named_modules()]
    tensors = [(name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]
    return modules, tensors


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
