"""Run directories that start from given weights (a converted or upcycled model), so that
``moelab train --resume RUN_DIR`` continues training them with everything a moelab run has: the
optimizer, schedule, λ controller, metrics, evaluation and checkpoints.

The run is laid out by the :class:`~moelab.train.Trainer` itself (config, tokenizer, accounting,
provenance), the weights are loaded into its model, and a step-0 checkpoint is written with the
trainer's fresh optimizer, scheduler, controller, sampler and RNG state. Resuming at step 0 is
then exactly training those weights from the start.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moelab.data import TokenDataset
from moelab.data.tokenizer import file_sha256
from moelab.hf.convert import convert
from moelab.hf.upcycle import upcycle
from moelab.provenance import source_fields
from moelab.rundir import RunDir
from moelab.train import load_run, run_config_for, start_run

__all__ = ["convert_checkpoint", "start_run", "upcycle_run"]


def convert_checkpoint(
    hf_dir: str | Path,
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    router: str | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
) -> Path:
    """A local ``transformers`` checkpoint directory (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, or a
    dense Llama/Mistral/Qwen2) converted into a moelab run (ReLU-routed with ``router="relu"``) on
    the prepared dataset ``data``, which must be tokenised with the checkpoint's tokenizer."""
    try:
        import transformers  # the `hf` extra; only this entry point needs it
    except ImportError:
        raise ValueError(
            "convert-hf: needs transformers (pip install 'moelab[hf]' or 'transformers>=4.44')"
        ) from None

    path = Path(hf_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"HF_DIR: {str(path)!r} is not a transformers checkpoint (no config.json)")
    if data is not None:
        _check_tokenizer(path, Path(data).expanduser())
    major = int(transformers.__version__.split(".")[0])
    dtype_arg = "dtype" if major >= 5 else "torch_dtype"  # renamed in transformers 5
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, **{dtype_arg: torch.float32}
    )
    model = convert(hf_model, router=router)
    base: dict[str, Any] = {"data": {"path": None if data is None else str(data)}}
    weights = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    origin = {"command": "convert-hf", **source_fields(path, run_dir, weights), "router": router}
    config = run_config_for(model, base, overrides)
    return start_run(model, config, run_dir, overwrite=overwrite, origin=origin)


def _check_tokenizer(hf_dir: Path, data: Path) -> None:
    """The dataset must hold the checkpoint's token ids (else every loss is meaningless)."""
    tok = hf_dir / "tokenizer.json"
    if not data.is_dir():
        raise ValueError(f"--data: {str(data)!r} is not a prepared dataset directory")
    theirs = TokenDataset(data).meta.get("tokenizer_sha256")
    if tok.is_file() and theirs and file_sha256(tok) != theirs:
        raise ValueError(
            f"--data: {data} was tokenised with another tokenizer than {hf_dir}'s; prepare it "
            f"with `moelab data prepare INPUT -o DIR --tokenizer {hf_dir}`"
        )


def upcycle_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    noise_std: float = 0.0,
    router: str = "topk",
    renormalize: bool = True,
    checkpoint: str | int | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
) -> Path:
    """A dense run's checkpoint upcycled (:func:`moelab.hf.upcycle`) into a new run in
    ``out_dir`` with the source run's data, optimizer, training and logging settings (changed by
    ``overrides``), ready for ``moelab train --resume OUT_DIR``."""
    source = RunDir(run_dir).find_checkpoint(checkpoint)
    dense, config = load_run(run_dir, source)
    model = upcycle(
        dense,
        num_experts,
        top_k,
        granularity,
        noise_std,
        router,
        renormalize=renormalize,
        seed=config.train.seed,
    )
    origin = {
        "command": "upcycle",
        **source_fields(run_dir, out_dir, [source / RunDir.WEIGHTS]),
        "checkpoint": source.name,
        "num_experts": num_experts,
        "top_k": top_k,
        "granularity": granularity,
        "noise_std": noise_std,
        "router": router,
    }
    new_config = run_config_for(model, config.to_dict(), overrides)
    return start_run(model, new_config, out_dir, overwrite=overwrite, origin=origin)
