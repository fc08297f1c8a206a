"""A new run directory whose step-0 checkpoint holds given weights: what every command that makes a
model from another one writes (``convert-hf``, ``upcycle``, ``prune``), ready for
``moelab train --resume``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moelab.model import TransformerLM
from moelab.provenance import source_path
from moelab.rundir import RunDir
from moelab.train.config import RunConfig
from moelab.train.trainer import Trainer

__all__ = ["run_config_for", "start_run"]


def start_run(
    model: TransformerLM,
    config: RunConfig,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    origin: dict[str, Any] | None = None,
    hook_states: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Lay out a run of ``config`` in ``run_dir`` whose step-0 checkpoint holds ``model``'s
    weights; returns the checkpoint. ``config.model`` must describe ``model``. ``origin`` (where
    the weights came from: ``command``, ``source``, ``checkpoint`` and the command's settings) is
    kept in the run's provenance, and reports show it. ``hook_states`` (checkpoint name → state,
    e.g. ``"controller"``: ReMoE's λ) seed the new run's between-step hooks of those names, so a
    run made from a trained one continues with its λ instead of λ0."""
    if config.model.to_dict() != model.cfg.to_dict():
        raise ValueError(
            "model: the run config's model section does not describe the given model; "
            "overrides may change data/optim/train/logging/checkpoint settings, not the model"
        )
    source = (origin or {}).get("source")
    if source is not None:  # a run written over its own source would lose it
        RunDir(run_dir).check_new_run_from(
            source_path(run_dir, source),
            overwrite=overwrite,
            field="run_dir",
            source_field="the source of its weights",
        )
    trainer = Trainer(config, run_dir, overwrite=overwrite)
    try:
        if origin is not None:
            trainer.rundir.set_origin(origin)
        for name, state in (hook_states or {}).items():
            if name in trainer.step_hooks:
                trainer.step_hooks[name].load_state_dict(state)
        trainer.model.load_state_dict(model.state_dict())
        return trainer.save()
    finally:
        trainer.release_run_dir()


def run_config_for(
    model: TransformerLM, base: dict[str, Any], overrides: Iterable[str]
) -> RunConfig:
    """``base`` (a run config as a dict) with ``model``'s model section and ``overrides`` of
    everything but the model (the weights fix it)."""
    overrides = list(overrides)
    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if bad:
        raise ValueError(
            f"{bad[0].split('=', 1)[0]}: the model comes from the weights it starts from and "
            "cannot be overridden here; change it with moelab train --resume where resumable"
        )
    return RunConfig.from_dict(base | {"model": model.cfg.to_dict()}, overrides)
