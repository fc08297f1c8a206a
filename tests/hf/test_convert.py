"""``moelab.hf.convert``: transformers Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE models (tiny random
configs) become moelab models with the same outputs, export back to transformers unchanged, and
switch to ReLU routing that the λ controller drives to its target."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moelab.cli import main
from moelab.data.tokenizer import SHIPPED_TOKENIZER
from moelab.hf import convert, export_model
from moelab.layers import MoE, SparsityController
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.train import load_run

transformers = pytest.importorskip("transformers")

COMMON = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}
FAMILIES = {  # name: (config class, model class, family options)
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        {"intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 16,  # not hidden_size / heads: moelab's head_size
        },
    ),
}


def tiny_hf_model(family: str, **options) -> torch.nn.Module:
    """A random tiny model of ``family``, weights redrawn larger than the 0.02 init (and norms,
    biases away from 1 / 0) so that routing and every nonlinearity matter."""
    config_cls, model_cls, opts = FAMILIES[family]
    if not hasattr(transformers, model_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {model_cls}")
    config = getattr(transformers, config_cls)(**(COMMON | opts | options))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if p.mean() > 0.5 else p.normal_(0, 0.2)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def ids(vocab: int = 96, shape: tuple[int, int] = (2, 20)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_model_and_blocks_match_transformers(family: str, tmp_path: Path) -> None:
    hf = tiny_hf_model(family)
    ours = convert(hf)
    assert isinstance(ours, TransformerLM)
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)

        for layer in hf.model.layers:  # each sparse block alone
            block = getattr(layer, "mlp", None)
            if type(block).__name__.endswith("SparseMoeBlock"):
                h = torch.randn(2, 7, COMMON["hidden_size"])
                moe = convert(block)
                assert isinstance(moe, MoE)
                torch.testing.assert_close(moe(h), block(h), rtol=1e-4, atol=1e-6)

        # and back out: the export of the converted model is the transformers model again
        export_model(ours, tmp_path / "export")
        back = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "export", trust_remote_code=True
        )
        torch.testing.assert_close(back(x).logits, expected, rtol=1e-4, atol=1e-5)


def test_routing_semantics_map_onto_moelab_options() -> None:
    mix, olmoe, qwen2 = (convert(tiny_hf_model(f)).cfg for f in ("mixtral", "olmoe", "qwen2_moe"))
    assert mix.ffn.renormalize and mix.qk_norm == "none" and not mix.qkv_bias
    assert not olmoe.ffn.renormalize and olmoe.qk_norm == "full"  # norm_topk_prob defaults False
    assert qwen2.ffn.renormalize and qwen2.qkv_bias and qwen2.ffn.shared_gate
    assert qwen2.ffn.shared_experts == 2 and qwen2.ffn_layers == [0] and qwen2.dense_d_hidden == 64


def test_relu_switch_trains_towards_the_target_sparsity() -> None:
    hf = tiny_hf_model("mixtral", num_local_experts=8, num_experts_per_tok=2)
    model = convert(hf, router="relu").train()
    layers = model.routed_layers()
    assert {layer.router_name for layer in layers} == {"relu"}
    target = layers[0].sparsity_target
    assert target == pytest.approx(1 - 2 / 8)
    torch.testing.assert_close(layers[0].router.weight, hf.model.layers[0].mlp.gate.weight)

    torch.manual_seed(0)
    controller = SparsityController(target=target, lambda0=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sparsity, lambdas = [], []
    for _ in range(25):
        x = torch.randint(0, COMMON["vocab_size"], (4, 16))
        logits = model(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        (loss + controller.penalty(layers)).backward()
        opt.step()
        opt.zero_grad()
        controller.observe(layers)
        sparsity.append(controller.step())
        lambdas.append(controller.lam)
        if sparsity[-1] >= target:
            break
    assert sparsity[0] < target - 0.1  # about half the ReLU outputs start positive
    assert sparsity[-1] >= target, sparsity  # λ grew until the target was reached
    assert lambdas[-1] < lambdas[-2] and lambdas[-2] > 1e-2  # and now turns back


def test_convert_rejects_what_it_cannot_reproduce() -> None:
    with pytest.raises(ValueError, match="cannot convert Linear: supported are Mixtral"):
        convert(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    )
    with pytest.raises(ValueError, match=r"model_type 'gpt2'\): supported are .*Qwen3-MoE"):
        convert(gpt2)
    with pytest.raises(ValueError, match="olmoe: clip_qkv is not supported"):
        convert(tiny_hf_model("olmoe", clip_qkv=8.0))
    with pytest.raises(ValueError, match="shared_expert_intermediate_size .* multiple"):
        convert(tiny_hf_model("qwen2_moe", shared_expert_intermediate_size=24))
    with pytest.raises(ValueError, match="router must be one of 'topk', 'relu'"):
        convert(tiny_hf_model("mixtral"), router="sigmoid")
    with pytest.raises(ValueError, match="router: router 'hash' cannot take over a converted"):
        convert(tiny_hf_model("mixtral"), router="hash")


def test_convert_hf_cli_then_train_resume(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    hf = tiny_hf_model("mixtral", vocab_size=8192, num_local_experts=4, num_experts_per_tok=1)
    hf.save_pretrained(tmp_path / "mixtral")
    shutil.copyfile(SHIPPED_TOKENIZER, tmp_path / "mixtral" / "tokenizer.json")
    run = tmp_path / "run"
    settings = [
        "data.seq_len=16",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.eval_max_batches=1",
        "train.steps=3",
        "train.eval_every=0",
        "logging.progress=false",
        "logging.log_every=1",
        "checkpoint.every=0",
    ]
    args = ["convert-hf", str(tmp_path / "mixtral"), str(run)]
    assert main([*args, *settings, "--data", str(data_dir), "--router", "relu"]) == 0
    assert "moelab train --resume" in capsys.readouterr().out
    step0, config = load_run(run)
    assert config.model.ffn.router == "relu" and config.model.ffn.num_experts == 4
    origin = RunDir(run).provenance()[0]["origin"]
    weights = (tmp_path / "mixtral" / "model.safetensors").read_bytes()
    assert origin["source_sha256"] == hashlib.sha256(weights).hexdigest()
    assert origin["source"] == str((tmp_path / "mixtral").resolve())  # outside the working dir
    x = ids(8192)
    with torch.no_grad():
        torch.testing.assert_close(step0(x), convert(hf, router="relu").eval()(x))

    assert main(["train", "--resume", str(run)]) == 0
    records = RunDir(run).read_metrics("train")
    assert [r["step"] for r in records] == [1, 2, 3] and all("sparsity" in r for r in records)
    assert json.loads((run / "summary.json").read_text())["method"] == "remoe"

    assert main([*args, "--set", "model.d_model=64", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "model.d_model: the model comes from the weights it starts from" in err
    assert main(["convert-hf", str(tmp_path), str(tmp_path / "r2")]) == 2
    assert "is not a transformers checkpoint" in capsys.readouterr().err
