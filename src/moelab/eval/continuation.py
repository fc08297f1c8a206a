"""How well a decoding mode predicts real text: teacher-forced scoring of the true continuation
of validation windows under the mode's own next-token distribution.

For each window, the first ``prompt_len`` tokens are the prompt; then, for each true next token,
the decoder's scores are turned into a distribution (softmax; SCMoE's tokens outside its
plausibility set have probability 0), the true token's negative log-probability and whether it
is the argmax are recorded, and the true token (not the predicted one) is fed to the decoder.
A true token a mode gives probability 0 is counted in ``outside`` and left out of ``nll``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from moelab.model.generate import Decoder


@torch.no_grad()
def continuation_scores(
    make: Callable[[], Decoder], windows: Iterable[Tensor], prompt_len: int
) -> dict[str, float]:
    """Mean ``nll`` (nats per continuation token), ``accuracy`` (argmax is the true token),
    ``outside`` (fraction of true tokens with probability 0) and ``tokens`` over ``windows``
    (each ``[B, L]``, ``L > prompt_len``); a fresh decoder from ``make`` per window batch."""
    nll_sum, inside, correct, total = 0.0, 0, 0, 0
    for ids_BL in windows:
        if ids_BL.shape[1] <= prompt_len:
            raise ValueError(f"prompt_len ({prompt_len}) must be below the window's length")
        decoder = make()
        try:
            scores_BV = decoder.prefill(ids_BL[:, :prompt_len], None, ids_BL.shape[1])
            for t in range(prompt_len, ids_BL.shape[1]):
                true_B = ids_BL[:, t]
                logp_BV = torch.log_softmax(scores_BV.double(), dim=-1)
                logp_B = logp_BV.gather(1, true_B[:, None])[:, 0]
                finite_B = torch.isfinite(logp_B)
                nll_sum -= float(logp_B[finite_B].sum())
                inside += int(finite_B.sum())
                correct += int((scores_BV.argmax(-1) == true_B).sum())
                total += true_B.numel()
                if t + 1 < ids_BL.shape[1]:
                    scores_BV = decoder.step(true_B)
        finally:
            decoder.remove()
    return {
        "nll": nll_sum / inside if inside else math.nan,
        "accuracy": correct / total if total else math.nan,
        "outside": 1.0 - inside / total if total else math.nan,
        "tokens": float(total),
    }
