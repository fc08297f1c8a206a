"""Shared checks of the token-choice router tests: a per-token loop MoE reference, causality
through TransformerLM, and a short training run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from model_checks import assert_causal, tiny_lm
from moelab.layers import MoE
from moelab.train import train
from run_fixtures import tiny_config


def observed_gates(moe: MoE, x: torch.Tensor) -> list[dict[int, float]]:
    """Per token, ``{expert: gate}`` of the decision ``moe`` makes on ``x`` (seen through the
    routing observer, as analysis sees it), gates rounded to 12 digits for hand-checked tests."""
    seen = []
    moe.routing_observer = lambda layer, decision, x_TD: seen.append(decision)
    moe(x)
    (decision,) = seen
    out: list[dict[int, float]] = [{} for _ in range(x.shape[0])]
    for t, e, w in zip(decision.token_idx_N, decision.expert_idx_N, decision.weight_N, strict=True):
        out[int(t)][int(e)] = round(float(w.detach()), 12)
    return out


def expert_out(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` on one token, written out (SwiGLU)."""
    gate, up = (x_D @ moe.experts.w13_EDF2[e]).chunk(2)
    return (F.silu(gate) * up) @ moe.experts.w2_EFD[e]


def loop_moe(moe: MoE, x_TD: torch.Tensor, gates: list[dict[int, torch.Tensor]]) -> torch.Tensor:
    """``y_t = Σ_e gates[t][e] · expert_e(x_t)``, one token and one expert at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for e, w in gates[t].items():
            y_D = y_D + w * expert_out(moe, e, x_TD[t])
        rows.append(y_D)
    return torch.stack(rows)


def assert_close_with_grads(moe: MoE, x: torch.Tensor, y: torch.Tensor, y_ref: torch.Tensor):
    """Outputs and the gradients of a random projection of them agree (x and every parameter)."""
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    target = torch.randn_like(y, generator=torch.Generator().manual_seed(7))
    params = [x, *moe.parameters()]
    got = torch.autograd.grad((y * target).sum(), params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad((y_ref * target).sum(), params, allow_unused=True)
    for g, g_ref in zip(got, want, strict=True):
        if g is None or g_ref is None:
            assert (g is None or g.abs().max() == 0) and (g_ref is None or g_ref.abs().max() == 0)
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def assert_router_causal(router: str, **options) -> None:
    """Through a two-block model, a token's output does not change (to the bit) when later tokens
    of its sequence change, and the later outputs do."""
    model = tiny_lm(router, top_k=2, router_options=options).eval()
    ids = torch.randint(0, 50, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 50, (2, 4))
    assert_causal(model, ids, changed)


def train_steps(data_dir: Path, run: Path, ffn: dict, steps: int = 50, overrides=()) -> list[dict]:
    """Train a tiny model ``steps`` steps; returns the train records (finite losses checked)."""
    cfg = tiny_config(data_dir, ffn, train={"steps": steps, "eval_every": 0})
    cfg = cfg.with_overrides(list(overrides))
    train(cfg, run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    records = [r for r in lines if r["kind"] == "train"]
    assert len(records) == steps
    assert all(math.isfinite(r["loss"]) for r in records)
    return records
