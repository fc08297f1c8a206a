"""Expert Choice: each expert picks its top-C tokens of the batch (non-causal); causal token-choice
top-k on the same scores at inference by default."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_checks import earlier_change, tiny_lm
from moelab.layers import MoE
from moelab.model import TransformerLM

torch.set_num_threads(2)


def expert_out(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    gate, up = (x_D @ moe.experts.w13_EDF2[e]).chunk(2)
    return (F.silu(gate) * up) @ moe.experts.w2_EFD[e]


def test_hand_checked_selection_and_weights():
    moe = MoE(2, 8, 2, 1, router="expert_choice").double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))  # logits = x
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5], [0.0, 0.0]], dtype=torch.float64)
    out = moe.router(x, None)
    # p0 = sigmoid(l0 - l1): 0.8808, 0.2689, 0.3775, 0.5; C = ceil(1·1·4/2) = 2
    # expert 0 takes t0 (0.8808) and t3 (0.5); expert 1 takes t1 (0.7311) and t2 (0.6225)
    got = sorted(
        zip(
            out.decision.expert_idx_N.tolist(),
            out.decision.token_idx_N.tolist(),
            out.decision.weight_N.tolist(),
            strict=True,
        )
    )
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    want = [(0, 0, sig(2)), (0, 3, 0.5), (1, 1, sig(1)), (1, 2, sig(0.5))]
    assert [(e, t) for e, t, _ in got] == [(e, t) for e, t, _ in want]
    for (_, _, w), (_, _, w_ref) in zip(got, want, strict=True):
        assert w == pytest.approx(w_ref, abs=1e-12)
    # with factor 1.5: C = 3, expert 0 adds t2 (0.3775 > 0.2689), expert 1 adds t3 (0.5)
    moe.router.capacity_factor = 1.5
    out = moe.router(x, None)
    per_token = torch.bincount(out.decision.token_idx_N, minlength=4).tolist()
    assert per_token == [1, 1, 2, 2]


def test_matches_per_expert_loop_reference():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, router="expert_choice", init_std=0.3, ec_capacity_factor=0.75)
    moe = moe.double()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    x_TD = x.reshape(-1, 8)
    scores = (x_TD @ moe.router.weight.T).softmax(-1)
    ranks = scores.detach()
    C = math.ceil(0.75 * 2 * 18 / 4)
    y_ref = torch.zeros_like(x_TD)
    for e in range(4):
        ranked = sorted(range(18), key=lambda t: -ranks[t, e].item())
        for t in ranked[:C]:
            y_ref[t] = y_ref[t] + scores[t, e] * expert_out(moe, e, x_TD[t])
    torch.testing.assert_close(y, y_ref.reshape_as(y), rtol=1e-10, atol=1e-12)
    # per-expert capacity instead of dropless accounting: every expert exactly C tokens
    s = moe.last_stats
    assert s.tokens_per_expert.tolist() == [C] * 4 and int(s.dropped) == 0
    assert int(s.active_sum) == 4 * C
    # gradient reaches the router through the picked scores
    y.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_padding_is_never_picked():
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 1, router="expert_choice", init_std=0.5)
    x = torch.randn(2, 8, 8)
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    y = moe(x, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    s = moe.last_stats
    C = math.ceil(11 / 4)
    assert int(s.num_tokens) == 11 and s.tokens_per_expert.tolist() == [C] * 4
    y_real = moe(torch.cat([x[0], x[1, :3]]))
    torch.testing.assert_close(y[mask], y_real)
    # more experts x capacity than valid tokens never reaches into padding either
    big = MoE(8, 16, 4, 4, router="expert_choice", ec_capacity_factor=4.0)
    big(x, token_mask=mask)
    assert big.last_stats.tokens_per_expert.tolist() == [11] * 4


def test_eval_uses_causal_top_k_on_the_same_scores():
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, 1, router="expert_choice", ec_capacity_factor=2.0).eval()
    x = torch.randn(7, 8)
    out = moe.router(x, None)
    top2 = moe.router.logits(x).topk(2, dim=-1).indices
    assert torch.equal(out.decision.token_idx_N, torch.arange(7).repeat_interleave(2))
    assert torch.equal(out.decision.expert_idx_N, top2.reshape(-1))
    batch = MoE(8, 16, 4, 1, router="expert_choice", inference="batch").eval()
    assert batch.router(x, None).decision.tokens_per_expert_E.tolist() == [2] * 4


def _lm(**options) -> TransformerLM:
    return tiny_lm("expert_choice", router_options=options, init_std=0.2)


def _earlier_changes(model: TransformerLM) -> bool:
    """Whether changing the later tokens changes the output of some earlier token (beyond the
    float32 rounding of matmuls over a different number of rows)."""
    torch.manual_seed(3)
    ids = torch.randint(0, 50, (2, 10))
    changed = ids.clone()
    changed[:, 5:] = torch.randint(0, 50, (2, 5))
    return earlier_change(model, ids, changed) > 1e-4


def test_non_causal_in_batch_mode_causal_in_the_inference_default():
    assert _earlier_changes(_lm().train())  # training: expert choice over the batch
    assert _earlier_changes(_lm(inference="batch").eval())
    assert not _earlier_changes(_lm().eval())  # inference="topk": causal


def test_bad_settings_raise():
    for bad in (0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="ec_capacity_factor must be a finite number > 0"):
            MoE(8, 16, 4, 1, router="expert_choice", ec_capacity_factor=bad)
    with pytest.raises(ValueError, match="inference must be one of 'topk', 'batch', got 'bat'"):
        MoE(8, 16, 4, 1, router="expert_choice", inference="bat")
    with pytest.raises(ValueError, match="capacity_factor must be None .* 'expert_choice'"):
        MoE(8, 16, 4, 1, router="expert_choice", capacity_factor=1.25)


def test_generation_uses_the_causal_path_and_refuses_batch_mode():
    from moelab.model.generate import generate

    prompt = torch.randint(0, 50, (2, 4))
    out = generate(_lm(), prompt, 5, temperature=0)
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="cannot decode one position at a time"):
        generate(_lm(inference="batch"), prompt, 5, temperature=0)
