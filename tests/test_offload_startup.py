"""Start-up on the meta device (moelab.serve.startup): no CPU tensor as large as a layer's experts
is ever made while loading (every aten op's outputs are recorded), outputs equal the fully loaded
model's for every router that declares ``causal_at_inference``; the CPU build, recorded the same
way, does make them (so the check can fail)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moelab.layers.routers import routers_with
from moelab.model import TransformerLM
from moelab.serve import offload_model
from moelab.serve.startup import build_meta, meta_buildable
from test_offload import greedy, preset_model, router_model, saved


class LargestCpuTensor(TorchDispatchMode):
    """The most bytes of any CPU tensor an aten op returned while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_no_expert_sized_tensor_is_made_on_the_cpu(tmp_path):
    model = preset_model("topk-tiny")
    weights = saved(model, tmp_path)
    w13 = model.blocks[0].ffn.experts.w13_EDF2  # one layer's w13: [E, D, 2F]
    layer = w13.numel() * w13.element_size()
    with LargestCpuTensor() as cpu_build:
        TransformerLM(model.cfg)
    assert cpu_build.largest >= layer  # the old way allocates them
    with LargestCpuTensor() as meta_build:
        served = build_meta(model.cfg)
        session = offload_model(served, weights, "30%", load_resident=True)
    assert meta_build.largest < layer
    assert all(p.device.type == "cpu" for p in served.parameters())
    assert all(b.device.type == "cpu" for b in served.buffers())
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(served(ids), model(ids))
    session.close()


@pytest.mark.parametrize("name", routers_with("causal_at_inference"))
def test_meta_start_up_decodes_the_loaded_models_tokens_for_every_causal_router(name, tmp_path):
    model = router_model(name)
    if model.blocks[0].ffn.merges_experts:  # Lory: refused by offloading itself
        return
    weights = saved(model, tmp_path)
    served = build_meta(model.cfg)
    assert meta_buildable(served)
    offload_model(served, weights, "30%", load_resident=True, prefetch=True)
    assert torch.equal(greedy(served), greedy(model))
    served.offload.close()
