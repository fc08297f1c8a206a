"""Every router through ``export-hf``, asked of the registry: each router that the export takes
gives moelab's logits and greedy tokens once loaded by ``AutoModelForCausalLM``; each other is
refused with one line naming it. A router registered later is covered without a new test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moelab.hf import export_model
from moelab.hf.exportable import export_refusal
from moelab.layers.routers import ROUTERS
from moelab.model import ModelConfig, TransformerLM, generate

transformers = pytest.importorskip("transformers")

EXPORTED = [(name, {}) for name in ROUTERS if export_refusal(name) is None]
# MoE structure options exported with any router (shown with topk): MomentumSMoE, Chain-of-Experts
EXPORTED += [("topk", {"momentum": 0.5, "momentum_step": 0.8}), ("topk", {"iterations": 2})]
REFUSED = [name for name in ROUTERS if export_refusal(name) is not None]


def tiny_model(router: str, seed: int = 0, **moe) -> TransformerLM:
    """3 blocks (the middle one dense, so state passed between routed layers crosses it), GQA,
    weights large enough that routing differs between tokens, between-step state (aux_free's
    bias) moved away from its initial value."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        init_std=0.2,
        ffn_layers=[0, 2],
        ffn={
            "kind": "moe",
            "router": router,
            "num_experts": 4,
            "top_k": 2,
            "d_hidden": 32,
            "shared_experts": 1,
            **moe,
        },
    )
    model = TransformerLM(cfg).eval()
    for layer in model.routed_layers():  # 500 steps of skewed loads: aux_free's bias at ±0.5
        if type(layer.router).updates_between_steps:
            for _ in range(500):
                layer.router.step_update(torch.arange(layer.num_experts))
    return model


def case_id(case: tuple[str, dict]) -> str:
    return "-".join([case[0], *(f"{k}={v}" for k, v in case[1].items())])


@pytest.mark.parametrize("router,options", EXPORTED, ids=[case_id(c) for c in EXPORTED])
def test_exported_router_matches_moelab(router: str, options: dict, tmp_path: Path) -> None:
    """Logits and greedy tokens equal moelab's, also after ``save_pretrained`` and reloading."""
    model = tiny_model(router, **options)
    export_model(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    hf.save_pretrained(tmp_path / "again")  # parameters held once under several names included
    again = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "again", trust_remote_code=True
    )
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :5]
    expected = generate(model, prompt, max_new_tokens=8, temperature=0)
    got = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("router", REFUSED)
def test_router_that_cannot_be_exported_is_refused_in_one_line(router: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        export_model(tiny_model(router), tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"model.ffn.router (block 0): router {router!r} ")
    assert "cannot be exported to transformers" in message or "is not causal" in message
    assert not (tmp_path / "out").exists()


BLOCK_MOELAB = """
import sys

class NoMoelab:
    def find_spec(self, name, path=None, target=None):
        if name == "moelab" or name.startswith("moelab."):
            raise ImportError(f"moelab is not importable here ({name})")

sys.meta_path.insert(0, NoMoelab())
import torch, transformers
hf = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(hf(ids).logits, sys.argv[3])
assert not any(m == "moelab" or m.startswith("moelab.") for m in sys.modules)
"""


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~10-25 s
def test_export_loads_where_moelab_is_not_importable(tmp_path: Path) -> None:
    """The exported folder needs torch and transformers only: a fresh interpreter that cannot
    import moelab (an import hook refuses it) loads it and gives moelab's logits (RMoE: state
    carried over the layers, past a dense block)."""
    model = tiny_model("rmoe")
    export_model(model, tmp_path / "hf")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # no module cached by this process
    args = [str(tmp_path / name) for name in ("hf", "ids.pt", "logits.pt")]
    subprocess.run(
        [sys.executable, "-c", BLOCK_MOELAB, *args], check=True, cwd=tmp_path, env=env, timeout=300
    )
    with torch.no_grad():
        torch.testing.assert_close(
            torch.load(tmp_path / "logits.pt"), model(ids), rtol=1e-5, atol=1e-5
        )
