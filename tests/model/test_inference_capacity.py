"""Capacity at inference: with ``capacity_factor`` set, eval and generation are dropless by default
(``eval_capacity_factor=None``), so KV-cache decoding equals a full forward and a token's output
does not depend on the other sequences of its batch; every registered router is checked."""

from __future__ import annotations

import pytest
import torch

from moelab.config import ConfigError
from moelab.layers.routers import ROUTERS, LoryRouter
from moelab.model import ModelConfig, TransformerLM

torch.set_num_threads(2)

VOCAB, LEN = 40, 16
# Options that make a router route on these tiny shapes (Lory: four segments of a 16-token row).
OPTIONS = {"lory": {"segment_len": 4}}


def _capacity(router: str) -> dict:
    """An aggressive training capacity (half the mean load) where the router takes one."""
    cls = ROUTERS[router]
    if getattr(cls, "sets_own_capacity", False) or issubclass(cls, LoryRouter):
        return {}
    return {"capacity_factor": 0.5}


def _model(router: str = "topk", **ffn) -> TransformerLM:
    spec = {"kind": "moe", "router": router, "num_experts": 4, "top_k": 2, "d_hidden": 16}
    spec |= _capacity(router) | ffn
    if router in OPTIONS:
        spec["router_options"] = OPTIONS[router]
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, max_seq_len=LEN, ffn=spec, init_std=0.3
    )
    torch.manual_seed(0)
    return TransformerLM(cfg).double().eval()


def _ids(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_a_token_does_not_depend_on_its_batch_mates_in_eval(router):
    """Each sequence alone gives the logits it gets inside a batch of four."""
    model = _model(router)
    ids = _ids(4)
    with torch.no_grad():
        batched = model(ids)
        for b in range(4):
            alone = model(ids[b : b + 1])
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-9, atol=1e-10)


def _decode(model: TransformerLM, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every position: the prompt in one call, then one position per call."""
    cache = model.new_kv_cache(ids.shape[0])
    steps = [model(ids[:, :prompt], kv_cache=cache)]
    steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1)


DECODABLE = sorted(r for r in ROUTERS if not getattr(ROUTERS[r], "kv_cache_error", None))


CASES = [("topk", 1)] + [(router, 3) for router in DECODABLE]  # batch 1 and batch > 1


@pytest.mark.parametrize("router, batch", CASES)
def test_kv_cache_decoding_equals_a_full_forward(router, batch):
    model = _model(router)
    ids = _ids(batch, seed=2)
    with torch.no_grad():
        full = model(ids)
        decoded = _decode(model, ids, prompt=5)
    torch.testing.assert_close(decoded, full, rtol=1e-9, atol=1e-10)


def _moe_layers(model: TransformerLM) -> list:
    return [block.ffn for block in model.blocks]


def test_training_still_drops_and_eval_capacity_factor_restores_it():
    """The cap applies in training; eval_capacity_factor brings the same cap to eval mode (then a
    token's output depends on its batch again, as in training)."""
    ids = _ids(4)
    dropless, capped = _model(capacity_factor=None), _model(capacity_factor=0.5)
    same_cap = _model(capacity_factor=0.5, eval_capacity_factor=0.5)
    with torch.no_grad():
        torch.testing.assert_close(capped(ids), dropless(ids), rtol=0, atol=0)  # eval: dropless
        eval_capped = same_cap(ids)
    train_capped = capped.train()(ids).detach()  # with grad: training statistics recorded
    assert all(int(m.last_stats.dropped) > 0 for m in _moe_layers(capped))
    torch.testing.assert_close(eval_capped, train_capped, rtol=0, atol=0)
    assert not torch.allclose(eval_capped, dropless(ids))
    with torch.no_grad():
        alone = same_cap(ids[:1])
    assert not torch.allclose(eval_capped[:1], alone)


def test_eval_capacity_factor_in_config_yaml_only_when_set():
    assert "eval_capacity_factor" not in _model().cfg.to_dict()["ffn"]
    cfg = _model(eval_capacity_factor=1.25).cfg
    assert cfg.to_dict()["ffn"]["eval_capacity_factor"] == 1.25
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert "eval_capacity_factor=1.25" in repr(_moe_layers(_model(eval_capacity_factor=1.25))[0])


@pytest.mark.parametrize(
    "ffn, match",
    [
        ({"eval_capacity_factor": 0}, "ffn.eval_capacity_factor: must be None (dropless) or a"),
        ({"eval_capacity_factor": float("nan")}, "ffn.eval_capacity_factor: must be None"),
        ({"eval_capacity_factor": -1.0}, "ffn.eval_capacity_factor: must be None"),
        (
            {"router": "expert_choice", "eval_capacity_factor": 1.0},
            "ffn.eval_capacity_factor: must be None (null) with router 'expert_choice'",
        ),
        (
            {"router": "lory", "eval_capacity_factor": 1.0},
            "ffn.eval_capacity_factor: must be None with router 'lory'",
        ),
    ],
)
def test_bad_eval_capacity_factor_is_one_clear_error(ffn, match):
    spec = {"kind": "moe", "num_experts": 4, "top_k": 2, "d_hidden": 16} | ffn
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=LEN, ffn=spec)
