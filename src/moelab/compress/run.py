"""The ``moelab compress`` driver: a run's checkpoint compressed by a method into a new run.

:func:`compress_run` validates everything it can before any work (the method and its options,
the ratio, the model's layers, the router's declared capability, the calibration data, the
overrides, the output directory), loads the source run, builds the :class:`Calibration` from the
run's training split (or a prepared dataset given as ``calib_data``), calls the method's
``check`` then ``apply``, and writes the compressed model as a new run at step 0 through
:func:`~moelab.train.start_run` (the source's optimizer state is dropped; a ReLU router's trained
λ is carried, its sparsity target ``1 − k/E`` follows from the new model). The run's provenance
``origin`` records the method, ratio, options, each layer's :class:`LayerChange`, the weights
file's bytes on disk (the source's and the new one's), the calibration source (its dataset named
as the source run is) and seed, and the source run (relative to the new run where both are inside
the working directory, :func:`moelab.provenance.source_reference`) and checkpoint with its
weights' sha256 (:func:`moelab.provenance.source_fields`). The source run is only read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moelab.checkpoint_io import load_state
from moelab.compress.methods import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    SourceRun,
    get_method,
    method_names,
)
from moelab.data import TokenDataset, check_vocab_compatible, dataset_checksum
from moelab.eval.perplexity import eval_batches
from moelab.layers.routers import require
from moelab.model.moe_config import MoEConfig
from moelab.provenance import source_fields, source_reference
from moelab.rundir import RunDir
from moelab.train import load_run, load_run_config, open_dataset, run_config_for, start_run
from moelab.train.config import RunConfig

__all__ = ["compress_run", "prune_run"]


def compress_run(
    source: str | Path,
    output: str | Path,
    method: str,
    ratio: float | None = None,
    options: dict[str, Any] | None = None,
    *,
    calib_batches: int = 16,
    calib_data: str | Path | None = None,
    checkpoint: str | int | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
    seed: int = 0,
    command: str = "compress",
) -> tuple[Path, CompressOutcome]:
    """Compress run ``source``'s ``checkpoint`` (default: the latest) with ``method`` into a new
    run ``output``; returns its step-0 checkpoint and the method's outcome. ``ratio``: the
    fraction of expert parameters kept, in (0, 1); ``options``: the method's own (by ``dest``,
    defaults filled in); ``calib_batches`` validation batches of the run's data (or of
    ``calib_data``) calibrate; ``overrides`` change data/optim/train/... fields of the new run;
    ``seed`` seeds the method's random numbers."""
    cls = get_method(method)
    options = cls.resolve_options(options)
    _check_ratio(cls, ratio)
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise ValueError(f"--calib-batches: must be a positive integer, got {calib_batches!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"--seed: must be an integer, got {seed!r}")
    RunDir(output).check_new_run_from(
        source, overwrite=overwrite, field="output", source_field="source"
    )
    run = RunDir(source)
    ckpt = run.find_checkpoint(checkpoint)  # resolved once: weights, λ, origin
    config = load_run_config(source)
    _check_layers(cls, config)
    ffn = config.model.ffn
    if cls.capability is not None and isinstance(ffn, MoEConfig):
        try:
            require(ffn.router, cls.capability, ffn.router_kwargs())
        except ValueError as err:
            raise ValueError(f"model.ffn.router: {err}") from None
    dataset = _calibration_dataset(cls, config, run, calib_data)
    compressor = cls(ratio, options)
    compressor.source = SourceRun(Path(source), ckpt, config)
    model, _ = load_run(source, ckpt)
    # before work: model.* overrides are refused, and the new run must find its data (the run's,
    # or data.path=... in overrides) as the trainer that writes it will
    open_dataset(run_config_for(model, config.to_dict(), overrides))
    compressor.check(model)

    calib = _calibration(dataset, config, calib_batches, seed, output)
    threads = torch.get_num_threads()
    if config.train.threads is not None:  # the run's choice (tiny presets: 1, see training.md)
        torch.set_num_threads(config.train.threads)
    try:
        torch.manual_seed(seed)
        outcome = compressor.apply(model, calib)
    finally:
        torch.set_num_threads(threads)
    run_config = run_config_for(outcome.model, config.to_dict(), overrides)
    origin = {
        "command": command,
        **source_fields(source, output, [ckpt / RunDir.WEIGHTS]),
        "checkpoint": ckpt.name,
        "method": cls.name,
        "ratio": ratio,
        "options": options,
        "calibration": calib.source,
        "seed": seed,
        "layers": [change.to_dict() for change in outcome.layers],
        "details": outcome.details,
    }
    new = start_run(
        outcome.model,
        run_config,
        output,
        overwrite=overwrite,
        origin=origin,
        hook_states=_controller_state(ckpt),
    )
    origin["weights_bytes"] = {
        "source": _file_bytes(ckpt / RunDir.WEIGHTS),
        "compressed": _file_bytes(new / RunDir.WEIGHTS),
    }
    RunDir(output).set_origin(origin)
    return new, outcome


def prune_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    keep: int,
    batches: int | None = 16,
    checkpoint: str | int | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
) -> tuple[Path, dict[int, list[int]], dict[int, torch.Tensor]]:
    """``moelab prune``: :func:`compress_run` with method ``frequency`` and ``keep`` experts per
    MoE block, counting usage on ``batches`` validation batches; the origin also carries the
    command's own fields (``keep``, ``usage_batches``, ``kept_experts``). Returns the new
    checkpoint, the kept expert ids and the usage counts per block."""
    ckpt, outcome = compress_run(
        run_dir,
        out_dir,
        "frequency",
        options={"keep": keep},
        calib_batches=batches,
        checkpoint=checkpoint,
        overrides=overrides,
        overwrite=overwrite,
        command="prune",
    )
    kept = {int(i): ids for i, ids in outcome.details["kept_experts"].items()}
    usage = {int(i): torch.tensor(u) for i, u in outcome.details["usage"].items()}
    rundir = RunDir(out_dir)
    origin = rundir.provenance()[0]["origin"]
    rundir.set_origin(
        origin | {"keep": keep, "usage_batches": batches, "kept_experts": _keys(kept)}
    )
    return ckpt, kept, usage


def _check_ratio(cls: type[CompressMethod], ratio: float | None) -> None:
    if ratio is None:
        return
    if not cls.takes_ratio:
        raise ValueError(f"--ratio: method {cls.name!r} takes no ratio (see its own options)")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise ValueError(
            f"--ratio: the fraction of expert parameters kept must be a number in (0, 1), "
            f"got {ratio!r}"
        )


def _check_layers(cls: type[CompressMethod], config: RunConfig) -> None:
    """A method for routed MoE layers refuses a model that has none (dense, PEER, PKM)."""
    ffn = config.model.ffn
    if not cls.needs_moe or isinstance(ffn, MoEConfig):
        return
    routed = ", ".join(n for n in method_names() if get_method(n).needs_moe)
    others = [n for n in method_names() if not get_method(n).needs_moe]
    also = (
        f"; --method {', '.join(others)} also take{'s' * (len(others) == 1)} it" if others else ""
    )
    raise ValueError(
        f"model.ffn.kind: this run's FFN layers are {ffn.kind!r}, without routed experts: "
        f"moelab compress --method {routed} compress routed MoE layers (kind 'moe'){also}"
    )


CALIBRATION_SPLIT = "train"  # never the split the compressed run is evaluated on


def _calibration_dataset(
    cls: type[CompressMethod], config: RunConfig, run: RunDir, calib_data: str | Path | None
) -> TokenDataset | None:
    """The dataset whose training split calibrates: ``calib_data`` or the run's own."""
    if not cls.needs_calibration:
        return None
    if calib_data is None:
        try:
            return open_dataset(config)
        except ValueError as err:
            raise ValueError(
                f"--calib-data: method {cls.name!r} needs calibration tokens and the run's "
                f"dataset cannot be read ({err}); give a prepared dataset with --calib-data PATH"
            ) from None
    path = Path(calib_data).expanduser()
    if not path.exists():
        raise ValueError(f"--calib-data: {str(path)!r} does not exist")
    try:
        dataset = TokenDataset(path)
        check_vocab_compatible(dataset, config.model.vocab_size)
    except ValueError as err:
        raise ValueError(f"--calib-data: {err}") from None
    run.check_same_tokenizer(dataset, field="--calib-data")
    if dataset.num_tokens(CALIBRATION_SPLIT) < config.data.seq_len + 1:
        raise ValueError(
            f"--calib-data: split '{CALIBRATION_SPLIT}' of {path} has fewer than "
            f"{config.data.seq_len + 1} tokens"
        )
    return dataset


def _calibration(
    dataset: TokenDataset | None, config: RunConfig, batches: int, seed: int, output: str | Path
) -> Calibration:
    """The calibration batches, and their source as the new run ``output``'s provenance names
    it: the dataset as :func:`~moelab.provenance.source_reference` names a source (relative to
    ``output`` inside the working directory, so a results tree moved as a whole still finds it),
    its checksum (which identifies the tokens wherever they are), the split and the batches."""
    if dataset is None:
        return Calibration([], "none", seed)
    d = config.data
    # the training split: the compressed run is evaluated on the validation split, and a method
    # fitted on the tokens it is scored on would look better than it is
    windows = [
        b["input_ids"]
        for b in eval_batches(dataset, CALIBRATION_SPLIT, d.seq_len, d.eval_batch_size, batches)
    ]
    shape = f"{len(windows)} batches of {d.eval_batch_size}x{d.seq_len} tokens"
    checksum = dataset_checksum(dataset.path)
    where = source_reference(dataset.path, output)
    source = f"{where} (sha256 {checksum}), split '{CALIBRATION_SPLIT}', {shape}"
    return Calibration(windows, source, seed)


def _controller_state(checkpoint: Path) -> dict:
    """The checkpoint's ReMoE λ controller state (``{}`` when it has none): the new run continues
    with the trained λ (its target becomes 1 − k/E' for the new expert count)."""
    try:
        state = load_state(checkpoint / RunDir.STATE)
    except (OSError, ValueError):
        return {}
    return {"controller": state["controller"]} if "controller" in state else {}


def _file_bytes(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def _keys(kept: dict[int, list[int]]) -> dict[str, list[int]]:
    return {str(block): ids for block, ids in kept.items()}
