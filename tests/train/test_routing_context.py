"""The two paths routers from the literature need beyond ``x``: the token ids and state passed
from one routed layer to the next (RoutingContext), and a between-step update from the step's
expert loads (RouterLoadHook), which the trainer runs and checkpoints like the λ controller."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from model_checks import assert_checkpointing_keeps_grads, tiny_lm
from moelab.layers import MoE, RouterLoadHook, RoutingContext
from moelab.layers.routers import ROUTERS, Router, RouterOutput, make_decision, register_router
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.train import train
from run_fixtures import tiny_config


class ChainRouter(Router):
    """Test router: token ``t`` goes to expert ``ids[t] mod E`` with weight ``sigmoid(logit +
    carried)``, and passes its logits on; it records what reached it."""

    name = "chain-test"
    method = "chain"

    def __init__(self, d_model, num_experts, top_k, *, init_std=0.02):
        super().__init__(d_model, num_experts, top_k, init_std=init_std)
        self.seen: list[tuple[Tensor | None, Tensor | None]] = []

    def forward(self, x_TD, valid_T, context=None):
        logits_TE = self.logits(x_TD)
        ids_T = context.token_ids.reshape(-1)
        carried = context.get("chain_logits")
        self.seen.append((ids_T.clone(), None if carried is None else carried.detach().clone()))
        gate_TE = logits_TE if carried is None else logits_TE + carried
        self.passed = gate_TE.detach().clone()
        context.pass_on("chain_logits", gate_TE)
        token_idx_N = torch.arange(x_TD.shape[0])
        expert_idx_N = ids_T % self.num_experts
        weight_N = torch.sigmoid(gate_TE[token_idx_N, expert_idx_N])
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        return RouterOutput(decision, logits_TE, gate_TE, torch.tensor(x_TD.shape[0]))


class BiasRouter(Router):
    """Test router with between-step state: top-1 of ``logits + bias``; ``step_update`` stores
    the loads it was given and moves the bias against them."""

    name = "bias-test"
    method = "bias"
    updates_between_steps = True

    def __init__(self, d_model, num_experts, top_k, *, init_std=0.02):
        super().__init__(d_model, num_experts, top_k, init_std=init_std)
        self.register_buffer("bias_E", torch.zeros(num_experts))
        self.updates: list[Tensor] = []

    def forward(self, x_TD, valid_T, context=None):
        logits_TE = self.logits(x_TD)
        expert_T = (logits_TE + self.bias_E).argmax(-1)
        token_idx_N = torch.arange(x_TD.shape[0])
        if valid_T is not None:
            token_idx_N = token_idx_N[valid_T]
        expert_idx_N = expert_T[token_idx_N]
        weight_N = logits_TE.softmax(-1)[token_idx_N, expert_idx_N]
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        return RouterOutput(decision, logits_TE, logits_TE, torch.tensor(token_idx_N.numel()))

    def step_update(self, tokens_per_expert_E):
        self.updates.append(tokens_per_expert_E.clone())
        self.bias_E -= 0.01 * torch.sign(tokens_per_expert_E - tokens_per_expert_E.mean())


@pytest.fixture
def test_routers():
    for cls in (ChainRouter, BiasRouter):
        register_router(cls)
    yield
    for cls in (ChainRouter, BiasRouter):
        del ROUTERS[cls.name]


def _lm(**overrides) -> TransformerLM:
    return tiny_lm("chain-test", **{"n_layers": 3} | overrides)


def test_token_ids_and_state_reach_each_layer_in_order(test_routers):
    model = _lm()
    ids = torch.randint(0, 50, (2, 7))
    model(ids)
    routers = [block.ffn.router for block in model.blocks]
    for i, router in enumerate(routers):
        ((seen_ids, carried),) = router.seen
        assert torch.equal(seen_ids, ids.reshape(-1))
        if i == 0:
            assert carried is None
        else:  # exactly what the previous layer passed on
            assert torch.equal(carried, routers[i - 1].passed)


def test_activation_checkpointing_recomputes_with_the_same_state(test_routers):
    ids = torch.randint(0, 50, (2, 7))
    assert_checkpointing_keeps_grads(lambda ckpt: _lm(activation_checkpointing=ckpt), ids)


def test_context_keeps_read_and_written_state_apart():
    ctx = RoutingContext(token_ids=torch.arange(3), carried={"h": torch.ones(1)})
    ctx.pass_on("h", torch.zeros(1))
    assert ctx.get("h").item() == 1.0  # a recomputation still reads the input
    nxt = ctx.next_layer()
    assert nxt.get("h").item() == 0.0 and torch.equal(nxt.token_ids, torch.arange(3))
    ctx.pass_on("g", torch.ones(2))
    assert nxt.get("g") is None
    skipped = nxt.next_layer()  # a layer that passes nothing on (a dense FFN, another router)
    assert skipped.get("h").item() == 0.0


def test_a_layer_without_context_routers_runs_without_one():
    moe = MoE(8, 16, 4, 1)
    assert moe(torch.randn(5, 8)).shape == (5, 8)


def test_the_trainer_runs_the_load_hook_and_checkpoints_its_state(test_routers, data_dir, tmp_path):
    ffn = {"kind": "moe", "router": "bias-test", "num_experts": 4, "d_hidden": 32}
    cfg = tiny_config(data_dir, ffn).with_overrides(["data.micro_batch_size=2"])
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [r for r in lines if r["kind"] == "train"]
    assert len(steps) == cfg.train.steps
    model = TransformerLM(cfg.model)
    _, state = RunDir(tmp_path / "run").load_checkpoint(model)
    assert state[RouterLoadHook.name] == {"steps": cfg.train.steps}
    for block in model.blocks:  # the bias moved between steps and was saved with the weights
        assert block.ffn.router.bias_E.abs().sum() > 0


def test_the_load_hook_hands_summed_loads_to_the_router(test_routers):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 1, router="bias-test")
    hook = RouterLoadHook.for_layers([moe])
    assert RouterLoadHook.for_layers([MoE(8, 16, 4, 1)]) is None
    loads = torch.zeros(4, dtype=torch.float64)
    for _ in range(3):
        moe(torch.randn(6, 8))
        loads += moe.last_stats.tokens_per_expert
        hook.observe()
    hook.step()
    (seen,) = moe.router.updates
    torch.testing.assert_close(seen, loads)
    assert hook.state_dict() == {"steps": 1}
    with pytest.raises(RuntimeError, match="observe"):
        hook.step()
