"""Adding a router is one class and one registry entry: the MoE layer, the configs (with the
router's own options), the trainer's loss and its metrics all pick it up with no other change."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from moelab.layers import MoE, fixed_aux_loss
from moelab.layers.routers import (
    ROUTERS,
    Router,
    RouterOutput,
    make_decision,
    register_router,
    router_options,
)
from moelab.train import train
from run_fixtures import tiny_config


class ArgmaxRouter(Router):
    """A toy router: each token to its best expert with weight ``sigmoid(logit / temperature)``,
    and an 'entropy' aux loss (mean router entropy) weighted by ``entropy_coef``."""

    name = "argmax-test"
    method = "argmax"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.5,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, init_std=init_std)
        self.temperature, self.entropy_coef = temperature, entropy_coef

    def forward(self, x_TD: Tensor, valid_T: Tensor | None, context=None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        best_T = logits_TE.argmax(-1)
        token_idx_N = torch.arange(x_TD.shape[0])
        if valid_T is not None:
            token_idx_N = token_idx_N[valid_T]
        expert_idx_N = best_T[token_idx_N]
        weight_N = torch.sigmoid(logits_TE[token_idx_N, expert_idx_N] / self.temperature)
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        probs_TE = logits_TE.softmax(-1)
        return RouterOutput(decision, logits_TE, probs_TE, torch.tensor(token_idx_N.numel()))

    def aux_losses(self, out: RouterOutput, valid_T: Tensor | None) -> dict[str, Tensor]:
        p = out.scores_TE
        return {"entropy": -(p * p.clamp_min(1e-9).log()).sum(-1).mean()}

    def aux_coefficients(self) -> dict[str, float]:
        return {"entropy": self.entropy_coef}


@pytest.fixture
def argmax_router():
    register_router(ArgmaxRouter)
    yield ArgmaxRouter
    del ROUTERS[ArgmaxRouter.name]


def test_the_layer_uses_a_registered_router(argmax_router):
    assert router_options("argmax-test") == {"temperature": 1.0, "entropy_coef": 0.5}
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 1, router="argmax-test", temperature=2.0)
    x = torch.randn(10, 8)
    y = moe(x)
    assert y.shape == x.shape and moe.last_stats.tokens_per_expert.sum() == 10
    want = 0.5 * moe.aux_losses["entropy"]
    torch.testing.assert_close(fixed_aux_loss([moe]), want)
    with pytest.raises(ValueError, match="no option 'temperatur' \\(did you mean 'temperature'"):
        MoE(8, 16, 4, 1, router="argmax-test", temperatur=2.0)


def test_configs_and_training_pick_it_up(argmax_router, data_dir, tmp_path):
    ffn = {"kind": "moe", "router": "argmax-test", "num_experts": 4, "d_hidden": 32}
    cfg = tiny_config(data_dir, ffn).with_overrides(["model.ffn.router_options.entropy_coef=0.1"])
    assert cfg.model.ffn.router_options == {"entropy_coef": 0.1}
    assert cfg.method == "argmax"
    with pytest.raises(ValueError, match="model.ffn.balance_coef: is not an option of router"):
        cfg.with_overrides(["model.ffn.balance_coef=0.1"])
    with pytest.raises(ValueError, match="entropy_cof"):
        cfg.with_overrides(["model.ffn.router_options.entropy_cof=0.1"])
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert len(train_lines) == 4 and all("entropy" in r["aux"] for r in train_lines)
    assert "lambda" not in train_lines[0]  # no controlled loss, no λ controller
