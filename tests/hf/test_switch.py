"""Switching a TopK model's routing (``convert-hf --router``) through the registry: every router
declaring ``convertible`` takes over the TopK gate's rows and the experts stay; every other router
is refused in one line, in the library and at the command line."""

from __future__ import annotations

import pytest
import torch

from model_checks import TINY_LM_64
from moelab.cli import build_parser
from moelab.hf.switch import switch_router
from moelab.layers import MoE
from moelab.layers.routers import ROUTERS, router_class, routers_with
from moelab.model import ModelConfig, TransformerLM

CONVERTIBLE = routers_with("convertible")
NOT_CONVERTIBLE = [name for name in ROUTERS if name not in CONVERTIBLE]


def topk_model(top_k: int = 1) -> TransformerLM:
    ffn = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": top_k, "d_hidden": 32}
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": ffn})).eval()


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_every_convertible_router_takes_over_the_topk_gate(name: str) -> None:
    model = topk_model(router_class(name).example_top_k)
    switched = switch_router(model, name).eval()
    assert switched.cfg.ffn.router == name and model.cfg.ffn.router == "topk"  # input unchanged
    for old, new in zip(model.blocks, switched.blocks, strict=True):
        assert torch.equal(new.ffn.router.weight[:4], old.ffn.router.weight)
        assert torch.equal(new.ffn.experts.w13_EDF2, old.ffn.experts.w13_EDF2)
        assert torch.equal(new.attn.wq.weight, old.attn.wq.weight)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(switched(ids)).all()
    block = switch_router(model.blocks[0].ffn, name)  # one MoE block alone
    assert isinstance(block, MoE) and block.router_name == name
    assert torch.equal(block.router.weight[:4], model.blocks[0].ffn.router.weight)


@pytest.mark.parametrize("name", NOT_CONVERTIBLE)
def test_a_router_that_cannot_take_a_gate_is_refused_in_one_line(name: str, capsys) -> None:
    with pytest.raises(ValueError) as err:
        switch_router(topk_model(), name)
    message = str(err.value)
    assert message.startswith(f"router: router {name!r} cannot take over") and "\n" not in message
    with pytest.raises(SystemExit):  # the command line offers only the convertible routers
        build_parser().parse_args(["convert-hf", "hf", "run", "--router", name])
    assert "invalid choice" in capsys.readouterr().err


def test_switching_a_gate_to_the_router_it_has_is_the_same_model() -> None:
    model = topk_model()
    assert switch_router(model, "topk") is model
