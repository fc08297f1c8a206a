"""Validation loss and perplexity, overall and per domain, without touching training state.

Why its own function (not the training loss): evaluation walks the split in sequential,
non-overlapping windows (``iter_eval_batches``) so every run is scored on exactly the same tokens,
and it runs in ``eval()`` mode under ``no_grad`` so routed layers record no statistics and no aux
losses (an eval forward that counted would skew the λ controller and the logged expert load,
which must describe training batches only). Per-domain losses are token-weighted
sums divided by each domain's token count, so they average back to the overall loss.

With ``max_batches`` the windows are spread evenly over the whole split (not its first batches):
prepared splits are ordered by domain, so a prefix would score one domain only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moelab.data import TokenDataset, iter_eval_batches

__all__ = ["autocast_context", "evaluate"]


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked, a no-op otherwise (CPU runs stay in fp32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_batches(
    dataset: TokenDataset, split: str, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    """All sequential windows (``iter_eval_batches``), or ``max_batches`` batches of windows
    evenly spaced over the split when that is fewer than all of them."""
    n_windows = (dataset.num_tokens(split) - 1) // seq_len
    if max_batches is None or max_batches * batch_size >= n_windows:
        yield from iter_eval_batches(dataset, split, seq_len, batch_size, max_batches)
        return
    tokens, domains = dataset.split(split), dataset.domain_ids(split)
    chosen = np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64)
    offsets = np.arange(seq_len + 1)
    for first in range(0, len(chosen), batch_size):
        idx = chosen[first : first + batch_size, None] * seq_len + offsets
        windows = torch.from_numpy(tokens[idx].astype(np.int64))
        yield {
            "input_ids": windows[:, :-1],
            "targets": windows[:, 1:],
            "domain_ids": torch.from_numpy(domains[idx[:, 1:]].astype(np.int64)),
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    split: str = "val",
    bf16: bool = False,
    shard: tuple[int, int] | None = None,
    all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Mean next-token loss (nats) and perplexity of ``split``, overall and per domain.

    Returns ``val_loss``, ``val_ppl``, ``tokens``, ``val_loss_by_domain``,
    ``tokens_by_domain`` (domains with no evaluated token are left out).

    ``shard=(index, count)`` with ``all_sum`` (under ``torchrun``: this rank and the number of
    ranks, and a sum over ranks): this process scores batches ``index, index + count, ...`` and the
    per-domain sums are added over the processes, so ``count`` ranks share the work and all get
    the one-process result. Every rank runs the same number of forwards (a rank short of a batch
    repeats one without scoring it), since expert parallelism and FSDP2 communicate inside the
    forward.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    domains = dataset.domains
    loss_sum = torch.zeros(len(domains), dtype=torch.float64)
    count = torch.zeros(len(domains), dtype=torch.float64)
    index, ranks = shard or (0, 1)
    scored = seen = 0
    spare: torch.Tensor | None = None  # a batch to repeat for the forwards this rank lacks
    try:
        for i, batch in enumerate(eval_batches(dataset, split, seq_len, batch_size, max_batches)):
            seen += 1
            if spare is None:
                spare = batch["input_ids"]
            if i % ranks != index:
                continue
            scored += 1
            ids = batch["input_ids"].to(device)
            with autocast_context(device, bf16):
                logits = model(ids)
            loss_T = (
                F.cross_entropy(
                    logits.float().flatten(0, 1),
                    batch["targets"].to(device).flatten(),
                    reduction="none",
                )
                .double()
                .cpu()
            )
            dom_T = batch["domain_ids"].flatten()
            loss_sum.index_add_(0, dom_T, loss_T)
            count.index_add_(0, dom_T, torch.ones_like(loss_T))
        for _ in range(-(-seen // ranks) - scored):  # keep the ranks' forwards in step
            if spare is not None:
                with autocast_context(device, bf16):
                    model(spare.to(device))
    finally:
        model.train(was_training)
    if all_sum is not None:
        loss_sum, count = all_sum(loss_sum), all_sum(count)
    total = float(count.sum())
    if total == 0:
        raise ValueError(f"split {split!r} of {dataset.path} gave no evaluation tokens")
    val_loss = float(loss_sum.sum()) / total
    by_domain = {
        name: float(loss_sum[i] / count[i]) for i, name in enumerate(domains) if count[i] > 0
    }
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 700.0)),
        "tokens": int(total),
        "val_loss_by_domain": by_domain,
        "tokens_by_domain": {name: int(count[i]) for i, name in enumerate(domains) if count[i] > 0},
    }
