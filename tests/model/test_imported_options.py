"""Model options that exist for converted architectures (moelab.hf): q/k/v biases, q/k RMSNorm
(whole projection or per head), a head size other than d_model / n_heads, and a sigmoid gate on the
shared experts. They build, run, cache like the rest, and stay out of config.yaml when unset."""

from __future__ import annotations

import pytest
import torch

from moelab.layers import MoE
from moelab.model import ModelConfig, TransformerLM, accounting


def test_imported_attention_options_build_run_and_cache() -> None:
    for options in ({"qkv_bias": True, "qk_norm": "full"}, {"qk_norm": "head", "head_size": 12}):
        cfg = ModelConfig(
            vocab_size=50,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=16,
            **options,
        )
        model = TransformerLM(cfg).double().eval()
        assert model.num_params() == accounting(cfg)["total_params"]
        ids = torch.randint(0, 50, (2, 10))
        full = model(ids)
        cache = model.new_kv_cache(2)
        parts = torch.cat([model(ids[:, :6], kv_cache=cache), model(ids[:, 6:], kv_cache=cache)], 1)
        torch.testing.assert_close(parts, full)
        assert {k: v for k, v in cfg.to_dict().items() if k in options} == options


def test_imported_options_stay_out_of_the_config_file_when_unset() -> None:
    text = ModelConfig(ffn={"kind": "moe"}).to_yaml()
    for name in ("qkv_bias", "qk_norm", "head_size", "shared_gate"):
        assert name not in text


def test_shared_gate_scales_the_shared_experts_per_token() -> None:
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, 1, shared_experts=1, shared_gate=True)
    plain = MoE(16, 32, 4, 1, shared_experts=1)
    plain.load_state_dict({k: v for k, v in moe.state_dict().items() if "shared_gate" not in k})
    x = torch.randn(5, 16)
    gate = torch.sigmoid(x @ moe.shared_gate.weight.T)
    shared = moe.shared(x)
    torch.testing.assert_close(moe(x) - plain(x), (gate - 1) * shared)
    with pytest.raises(ValueError, match="shared_gate needs shared_experts >= 1"):
        MoE(16, 32, 4, 1, shared_gate=True)
