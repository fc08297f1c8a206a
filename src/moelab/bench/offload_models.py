"""The model ``moelab bench offload`` measures: the random-init preset, or a trained run.

Random init (the default) has untrained routing, and its greedy text from a random prompt soon
repeats, which favours a cache; ``--run RUN_DIR`` instead benchmarks a trained run's own experts,
read from its checkpoint's ``model.safetensors`` (never written), with a prompt taken from the
run's own validation split (the start of the split); by default (``--feed text``) the decode
steps are then fed the split's next tokens instead of the model's greedy ones, because a briefly
trained model's greedy text soon loops as a random one does (``--feed greedy`` measures that). With
``--miss-precision`` the run path also has held-out windows of that split to score the
continuation NLL of every variant (a random-init model has no meaningful one).

Everything that can be refused is checked by :func:`bench_config` before any model is built.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab.model import TransformerLM
from moelab.serve import OffloadSession
from moelab.train import RunConfig

# options that only shape the random-init model: a run's model is what it was trained as
RANDOM_ONLY = ("experts", "top_k", "d_hidden")
DEFAULT_EXPERTS = 64

Serve = Callable[[float, str, bool, dict[str, Any]], tuple[TransformerLM, OffloadSession]]


@dataclass
class BenchModel:
    """The fully loaded ``model``, the decode ``prompt`` ``[1, P]``, ``serve(budget_pct, policy,
    prefetch, low_kw)`` building a fresh offloaded copy, the table's ``label``, and ``windows``
    (``[B, P + tokens]`` validation windows for the NLL column; ``None`` for random init), and
    ``text``: the tokens to feed while decoding (``None``: the model's own greedy tokens)."""

    model: TransformerLM
    prompt: torch.Tensor
    serve: Serve
    label: str
    windows: list[torch.Tensor] | None = None
    text: list[int] | None = None


def bench_config(args: argparse.Namespace) -> RunConfig:
    """The run config the bench will build, with the options that depend on the source checked
    (one line each); nothing is allocated."""
    if args.run is None:
        if args.checkpoint is not None:
            raise ValueError("--checkpoint: needs --run RUN_DIR")
        if args.feed == "text":
            raise ValueError("--feed: text needs --run RUN_DIR (a random-init model has no text)")
        return _fits(args, _random_config(args))
    given = [
        f"--{name.replace('_', '-')}" for name in RANDOM_ONLY if getattr(args, name) is not None
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: shape the random-init model only; --run benchmarks the run's "
            "own model"
        )
    from moelab.serve import check_offloadable
    from moelab.serve.run import offload_source
    from moelab.serve.startup import build_meta
    from moelab.train import load_run_config

    config = load_run_config(args.run)
    offload_source(args.run, args.checkpoint)  # the file exists and holds every expert
    check_offloadable(build_meta(config.model))  # no storage: refused before any weight is read
    return _fits(args, config)


def _fits(args: argparse.Namespace, config: RunConfig) -> RunConfig:
    for name in ("prompt_len", "tokens", "repeats", "threads", "nll_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.prompt_len + args.tokens > config.model.max_seq_len:
        raise ValueError(
            f"--prompt-len + --tokens ({args.prompt_len + args.tokens}) exceeds the model's "
            f"max_seq_len ({config.model.max_seq_len})"
        )
    return config


def _random_config(args: argparse.Namespace) -> RunConfig:
    from moelab.train.config import resolve_run_config

    experts = DEFAULT_EXPERTS if args.experts is None else args.experts
    overrides = [f"model.ffn.num_experts={experts}"]
    if args.top_k is not None:
        if not 1 <= args.top_k <= experts:
            raise ValueError(f"--top-k: must be in [1, --experts={experts}], got {args.top_k}")
        overrides.append(f"model.ffn.top_k={args.top_k}")
    if args.d_hidden is not None:
        overrides.append(f"model.ffn.d_hidden={args.d_hidden}")
    return resolve_run_config("topk-tiny", overrides=overrides)


@contextmanager
def open_bench_model(args: argparse.Namespace, config: RunConfig) -> Iterator[BenchModel]:
    """The :class:`BenchModel` for ``args`` (``config`` from :func:`bench_config`); a random-init
    model's weights live in a temporary file for the duration."""
    if args.run is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield _random_model(args, config, Path(tmp))
    else:
        yield _trained_run(args, config)


def _random_model(args: argparse.Namespace, config: RunConfig, tmp: Path) -> BenchModel:
    from moelab.checkpoint_io import save_weights
    from moelab.serve import offload_model

    torch.manual_seed(0)
    model = TransformerLM(config.model).eval()
    weights = tmp / "model.safetensors"
    save_weights(model, weights, 0)
    prompt = torch.randint(
        0, config.model.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)
    )

    def serve(budget: float, policy: str, prefetch: bool, low_kw: dict[str, Any]):
        served = TransformerLM(config.model).eval()
        session = offload_model(
            served,
            weights,
            f"{budget}%",
            policy=policy,
            prefetch=prefetch,
            tier_name=args.tier,
            load_resident=True,
            **low_kw,
        )
        return served, session

    ffn = config.model.ffn
    k = f", k={ffn.top_k}" if args.top_k is not None else ""
    return BenchModel(
        model, prompt, serve, f"topk-tiny, {ffn.num_experts} experts/layer{k} (random init)"
    )


def _trained_run(args: argparse.Namespace, config: RunConfig) -> BenchModel:
    from moelab.data.dataset import iter_eval_batches
    from moelab.rundir import RunDir
    from moelab.serve import check_offloadable, load_offloaded
    from moelab.train import load_run
    from moelab.train.setup import open_dataset

    ckpt = RunDir(args.run).find_checkpoint(args.checkpoint)
    model, _ = load_run(args.run, checkpoint=ckpt)
    dataset = open_dataset(config)
    first = next(iter_eval_batches(dataset, "val", args.prompt_len + args.tokens, 1, 1))
    prompt = first["input_ids"][:, : args.prompt_len]
    feed_text = args.feed in (None, "text")
    text = first["input_ids"][0, args.prompt_len :].tolist() if feed_text else None
    windows = None
    if args.miss_precision is not None:  # the quality column: NLL of the true continuations
        length = args.prompt_len + args.tokens
        batches = iter_eval_batches(dataset, "val", length - 1, args.nll_windows, 1)
        windows = [torch.cat([b["input_ids"], b["targets"][:, -1:]], dim=1) for b in batches]

    def serve(budget: float, policy: str, prefetch: bool, low_kw: dict[str, Any]):
        served, _, session = load_offloaded(
            args.run,
            f"{budget}%",
            policy=policy,
            prefetch=prefetch,
            tier_name=args.tier,
            checkpoint=ckpt,
            **low_kw,
        )
        return served, session

    slot = config.model.ffn_for(next(i for i, _ in check_offloadable(model)))
    label = (
        f"run {args.run} ({ckpt.name}), {slot.num_experts} experts/layer, k={slot.top_k}, "
        f"router {slot.router}; prompt: the first {args.prompt_len} validation tokens, then "
        + ("the next validation tokens fed (teacher-forced)" if feed_text else "greedy")
    )
    return BenchModel(model, prompt, serve, label, windows, text)
