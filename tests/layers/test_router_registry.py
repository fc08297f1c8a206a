"""What every registered router shares: jitter and z-loss on every learnt softmax router, options
that are keyword-only, registry errors that list the routers."""

from __future__ import annotations

import pytest
import torch

from moelab.layers import MoE
from moelab.layers.routers import ROUTERS, router_options

# Routers without a learnt softmax over experts: ReLU gates, a fixed hash, Lory's segment merge.
NOT_SOFTMAX = {"relu", "hash", "lory"}


@pytest.mark.parametrize("name", sorted(set(ROUTERS) - NOT_SOFTMAX))
def test_every_softmax_router_has_jitter_and_z_loss(name):
    options = router_options(name)
    assert options["jitter_eps"] == 0.0 and options["z_loss_coef"] == 0.0
    k = 2 if name in ("sparsemixer", "aux_free") else 1
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
