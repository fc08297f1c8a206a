"""What every registered router shares: jitter and z-loss wherever jitter is an option, options
that are keyword-only, registry errors that list the routers, and capabilities declared on the
class that the doors can trust (a router declaring ``causal_at_inference`` is causal; each one it
lacks is refused in one line with its reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.layers import MoE
from moelab.layers.routers import (
    CAPABILITIES,
    ROUTERS,
    require,
    router_class,
    router_options,
    routers_with,
)
from router_checks import assert_router_causal

JITTERED = [name for name in ROUTERS if "jitter_eps" in router_options(name)]


@pytest.mark.parametrize("name", JITTERED)
def test_every_jittered_router_has_jitter_and_z_loss(name):
    options = router_options(name)
    assert options["jitter_eps"] == 0.0 and options["z_loss_coef"] == 0.0
    k = router_class(name).example_top_k
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, k, router=name, jitter_eps=0.1, z_loss_coef=1e-3)
    x = torch.randn(2, 6, 16)
    moe.eval()
    quiet = moe(x)
    assert torch.equal(quiet, moe(x))  # jitter off at evaluation
    router = moe.router
    x_TD = torch.randn(6, router.weight.shape[1])  # the gate's input (RMoE's: its GRU state)
    clean = router.logits(x_TD)
    router.train()
    assert not torch.equal(router.logits(x_TD), clean)  # jittered while training
    moe.train()
    torch.manual_seed(1)
    moe(x)
    assert moe.aux_losses["z_loss"] > 0  # the z-loss is recorded and weighted
    assert moe.aux_coefficients["z_loss"] == 1e-3


def test_the_registry_lists_every_router_in_its_errors():
    with pytest.raises(ValueError) as err:
        MoE(16, 32, 4, 1, router="top-k")
    message = str(err.value)
    assert all(repr(name) in message for name in ROUTERS) and "did you mean 'topk'" in message


def test_the_learnt_softmax_routers_all_take_jitter():
    """Routers with no jitter option are those without a learnt per-token softmax gate."""
    shipped = [n for n, cls in ROUTERS.items() if cls.__module__.startswith("moelab.")]
    assert {n for n in shipped if "jitter_eps" not in router_options(n)} == {"relu", "hash", "lory"}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_capability_is_declared_and_refused_with_its_reason(name):
    cls = router_class(name)
    for capability, phrase in CAPABILITIES.items():
        declared = getattr(cls, capability)
        assert isinstance(declared, bool)
        line = cls.refusal(capability)
        assert (line is None) == declared
        if line is not None:
            assert line.startswith(f"router {name!r} {phrase}: ") and "\n" not in line
            assert "it does not declare it" not in line  # a registered router says why
            with pytest.raises(ValueError, match="routers that can: "):
                require(name, capability)
        else:
            require(name, capability)  # no error
            assert name in routers_with(capability)


@pytest.mark.parametrize("name", routers_with("causal_at_inference"))
def test_every_router_declaring_causal_inference_is_causal(name):
    cls = router_class(name)
    assert_router_causal(name, **cls.example_options(10))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("expert_choice", {"inference": "batch"}),
        ("lory", {"first_segment": "self", "segment_len": 10}),
    ],
)
def test_options_that_withdraw_causality_are_refused_and_are_not_causal(name, options):
    line = router_class(name).refusal("causal_at_inference", options)
    assert line.startswith(f"router {name!r} with ") and "is not causal at inference" in line
    with pytest.raises(AssertionError):  # the refusal is true: a later token changes an earlier
        assert_router_causal(name, **(router_class(name).example_options(10) | options))


def test_an_unknown_capability_is_named():
    with pytest.raises(ValueError, match="capability must be one of 'causal_at_inference'"):
        routers_with("fast")


def test_the_capability_table_of_the_docs_is_the_registry():
    """docs/routers.md lists what each router declares; it must say what the classes say."""
    text = (Path(__file__).parents[2] / "docs" / "routers.md").read_text()
    section = text.split("## What each router declares", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        name, *cells = (cell.strip() for cell in row.strip("|").split("|"))
        table[name.strip("`")] = [cell.startswith("yes") for cell in cells]
    shipped = {n: cls for n, cls in ROUTERS.items() if cls.__module__.startswith("moelab.")}
    want = {name: [getattr(cls, c) for c in CAPABILITIES] for name, cls in shipped.items()}
    assert table == want
