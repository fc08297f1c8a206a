"""Shared helpers of the training and evaluation tests: a tiny two-domain dataset, tiny configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moelab.data import prepare
from moelab.train import RunConfig

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "cat",
    "sleeps",
    "near",
    "the",
    "warm",
    "fire",
    "and",
    "birds",
    "sing",
    "in",
    "the",
    "tall",
    "green",
    "trees",
    "of",
    "the",
    "quiet",
    "old",
    "garden",
    "behind",
    "the",
    "house",
]


def make_dataset(root: Path) -> Path:
    """Two domains (prose, code), a few thousand tokens each, shipped tokenizer."""
    src = root / "docs.jsonl"
    lines = []
    for i in range(60):
        prose = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(60))
        code = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}" for j in range(12))
        lines.append(json.dumps({"text": prose, "domain": "prose"}))
        lines.append(json.dumps({"text": code, "domain": "code"}))
    src.write_text("\n".join(lines) + "\n")
    out = root / "data"
    prepare(src, out, format="jsonl", val_fraction=0.2, seed=0, progress=False)
    return out


def tiny_config(data_dir: Path, ffn: dict[str, Any] | None = None, **sections: Any) -> RunConfig:
    """A 2-block d_model=32 model on ``data_dir``; ``sections`` update the config sections."""
    raw: dict[str, Any] = {
        "model": {
            "vocab_size": 8192,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "max_seq_len": 32,
            "ffn": ffn or {"kind": "dense", "d_hidden": 64},
        },
        "data": {
            "path": str(data_dir),
            "seq_len": 16,
            "batch_size": 4,
            "eval_batch_size": 4,
            "eval_max_batches": 2,
        },
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": 4, "eval_every": 0},
        "logging": {"log_every": 1, "progress": False},
        "checkpoint": {"every": 0, "keep_last": 2},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return RunConfig.from_dict(raw)


# Command-line overrides that shrink any preset to a one-block d_model=32 model (CLI tests).
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.ffn.d_hidden=32",
    "data.seq_len=16",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.eval_max_batches=1",
    "logging.progress=false",
    "logging.log_every=1",
]

REMOE = {"kind": "moe", "router": "relu", "num_experts": 4, "top_k": 1, "d_hidden": 32}
TOPK = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": 2, "d_hidden": 32}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny two-domain dataset, prepared once per test session."""
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest single-threaded (and do not fight other processes for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
