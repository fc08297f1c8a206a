"""Generation speed of a trained run: prefill and decode tokens/s and time to first token, against
the same weights exported to ``transformers`` running its own ``generate`` in the same process.

Each configuration (batch size) is timed round-robin - one moelab call, one ``transformers`` call
per round - so that the machine's drift hits both alike; the report gives the median of the
rounds with the min–max beside it, and the ratio of the two medians. Greedy decoding of
``--tokens`` new tokens after a ``--prompt-len``-token prompt drawn from the run's vocabulary
(fixed seed, no end-of-text stop: every row makes all its tokens); the two implementations' tokens
are compared and the report says whether they are the same.

* time to first token (TTFT): a generation of one new token (prefill plus one sampling);
* prefill tokens/s: ``batch · prompt_len / TTFT``;
* decode tokens/s: ``batch · (tokens − 1) / (t(tokens) − TTFT)``, the per-token steps alone;
* total tokens/s: ``batch · tokens / t(tokens)``, what a user waiting for the whole answer sees.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# generate(prompt_ids_BL, new_tokens) -> ids [B, L + new_tokens]
GenerateFn = Callable[[Tensor, int], Tensor]


@dataclass
class Timing:
    """Median (and min / max) seconds of the rounds of one implementation at one batch size."""

    ttft_s: float
    ttft_min: float
    ttft_max: float
    full_s: float
    full_min: float
    full_max: float

    def rates(self, batch: int, prompt_len: int, tokens: int) -> dict[str, float]:
        decode_s = max(self.full_s - self.ttft_s, 1e-9)
        return {
            "ttft_ms": 1000 * self.ttft_s,
            "prefill_tok_s": batch * prompt_len / self.ttft_s,
            "decode_tok_s": batch * (tokens - 1) / decode_s,
            "total_tok_s": batch * tokens / self.full_s,
            "total_tok_s_min": batch * tokens / self.full_max,
            "total_tok_s_max": batch * tokens / self.full_min,
        }


@dataclass
class Row:
    batch: int
    prompt_len: int
    tokens: int
    impl: str
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    total_tok_s: float
    total_tok_s_min: float
    total_tok_s_max: float
    ratio: float  # total tok/s over the reference's (1.0 for the reference itself)
    same_tokens: bool


def time_rounds(fns: dict[str, GenerateFn], ids_BL: Tensor, tokens: int, repeats: int):
    """Per implementation, the :class:`Timing` of ``repeats`` interleaved rounds (after one
    warm-up of each) and its tokens of the last round."""
    out: dict[str, list[Tensor]] = {}
    for name, fn in fns.items():  # warm-up
        out[name] = fn(ids_BL, tokens)
    first: dict[str, list[float]] = {n: [] for n in fns}
    full: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(ids_BL, 1)
            first[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out[name] = fn(ids_BL, tokens)
            full[name].append(time.perf_counter() - t0)
    timings = {
        n: Timing(
            statistics.median(first[n]),
            min(first[n]),
            max(first[n]),
            statistics.median(full[n]),
            min(full[n]),
            max(full[n]),
        )
        for n in fns
    }
    return timings, out


def bench_generation(
    fns: dict[str, GenerateFn],
    vocab_size: int,
    batches: Sequence[int],
    tokens: int,
    prompt_len: int,
    repeats: int = 5,
    reference: str | None = None,
    seed: int = 0,
) -> list[Row]:
    """One :class:`Row` per implementation and batch size; ``reference`` names the
    implementation the ratios and token comparison are taken against (default: the last)."""
    reference = reference or list(fns)[-1]
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(seed + batch)
        ids_BL = torch.randint(0, vocab_size, (batch, prompt_len), generator=gen)
        timings, out = time_rounds(fns, ids_BL, tokens, repeats)
        ref_rate = timings[reference].rates(batch, prompt_len, tokens)["total_tok_s"]
        for name, timing in timings.items():
            rates = timing.rates(batch, prompt_len, tokens)
            same = torch.equal(out[name], out[reference])
            ratio = rates["total_tok_s"] / ref_rate
            rows.append(
                Row(batch, prompt_len, tokens, name, **rates, ratio=ratio, same_tokens=same)
            )
    return rows


def table(rows: list[Row]) -> str:
    head = (
        f"{'batch':>5} {'impl':<13} {'TTFT ms':>8} {'prefill tok/s':>13} {'decode tok/s':>12} "
        f"{'total tok/s':>11} {'(min-max)':>13} {'ratio':>6} same"
    )
    lines = [head]
    for r in rows:
        spread = f"{r.total_tok_s_min:.0f}-{r.total_tok_s_max:.0f}"
        lines.append(
            f"{r.batch:>5} {r.impl:<13} {r.ttft_ms:>8.1f} {r.prefill_tok_s:>13.0f} "
            f"{r.decode_tok_s:>12.0f} {r.total_tok_s:>11.0f} {spread:>13} {r.ratio:>6.2f} "
            f"{'yes' if r.same_tokens else 'NO'}"
        )
    return "\n".join(lines)


def as_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
