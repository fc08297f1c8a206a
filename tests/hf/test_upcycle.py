"""Sparse upcycling: a dense model's FFNs copied into experts (split when fine-grained) compute the
dense function at step 0 where the method says they should, and the upcycled run trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.hf import upcycle
from moelab.layers.routers import ROUTERS, routers_with
from moelab.layers.routers.topk import TopKRouter
from moelab.model import ModelConfig, TransformerLM
from moelab.rundir import RunDir
from moelab.train import load_run, train
from run_fixtures import tiny_config


def dense_model(**ffn) -> TransformerLM:
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=32,
        init_std=0.1,
        ffn={"kind": "dense", "d_hidden": 64, **ffn},
    )
    torch.manual_seed(0)
    return TransformerLM(cfg).eval()


IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("num_experts", "top_k", "granularity"), [(4, 1, 1), (4, 2, 1), (4, 1, 4), (8, 2, 2)]
)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_topk_upcycled_model_equals_the_dense_model_at_step_0(
    num_experts: int, top_k: int, granularity: int, activation: str
) -> None:
    dense = dense_model(activation=activation)
    moe = upcycle(dense, num_experts, top_k, granularity).eval()
    assert moe.cfg.ffn.num_experts == num_experts and moe.cfg.ffn.renormalize
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS), dense(IDS), rtol=1e-5, atol=1e-5)
    # each copy's G parts share one router row (virtual groups), distinct between copies
    w = moe.blocks[0].ffn.router.weight.view(num_experts, granularity, -1)
    assert torch.equal(w, w[:, :1].expand_as(w)) and not torch.equal(w[0, 0], w[1, 0])


def test_upcycled_block_is_the_dense_ffn_scaled_where_not_exact() -> None:
    """No renormalisation: scaled by the selected probability mass; ReLU: by the token's total
    gate; noise: close, not equal."""
    dense = dense_model()
    x = torch.randn(10, 32)
    ffn = dense.blocks[0].ffn
    with torch.no_grad():
        moe = upcycle(dense, 4, 2, renormalize=False).blocks[0].ffn
        mass = moe.router.logits(x).softmax(-1).topk(2, dim=-1).values.sum(-1, keepdim=True)
        torch.testing.assert_close(moe(x), mass * ffn(x))
        relu = upcycle(dense, 4, 1, router="relu").blocks[0].ffn
        gate = relu.router.logits(x).relu().sum(-1, keepdim=True)
        torch.testing.assert_close(relu(x), gate * ffn(x))
        noisy = upcycle(dense, 4, 1, noise_std=1e-3).eval()
        diff = (noisy(IDS) - dense(IDS)).abs().max()
        assert 0 < diff < 0.1


@pytest.mark.parametrize("name", routers_with("upcyclable"))
def test_every_upcyclable_router_starts_on_the_split_copies(name: str) -> None:
    """Any router declaring ``upcyclable``: the experts are the dense FFN's split copies (the down
    projections scaled by G), a learnt gate gives a copy's parts one row, and the model runs."""
    dense = dense_model()
    G, width = 2, 32
    model = upcycle(dense, 4, 1, granularity=G, router=name).eval()
    assert model.cfg.ffn.router == name
    for old, new in zip(dense.blocks, model.blocks, strict=True):
        w13, w2 = old.ffn.w13_DF2, old.ffn.w2_FD
        for e in range(4 * G):
            j = e % G
            hidden = slice(j * width, (j + 1) * width)
            up = slice(64 + j * width, 64 + (j + 1) * width)
            want13 = torch.cat([w13[:, hidden], w13[:, up]], dim=1)
            torch.testing.assert_close(new.ffn.experts.w13_EDF2[e], want13, rtol=0, atol=0)
            torch.testing.assert_close(new.ffn.experts.w2_EFD[e], w2[hidden] * G, rtol=0, atol=0)
        router = new.ffn.router
        if isinstance(router.weight, torch.nn.Parameter):
            rows = router.weight[: 4 * G].view(4, G, -1)
            assert torch.equal(rows, rows[:, :1].expand_as(rows))
            assert not torch.equal(rows[0, 0], rows[1, 0])
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


class _Undeclared(TopKRouter):
    """A router added later that declares none of the capabilities."""

    name = "undeclared-test"
    upcyclable = False


def test_a_router_that_is_not_upcyclable_is_refused_in_one_line(monkeypatch) -> None:
    monkeypatch.setitem(ROUTERS, _Undeclared.name, _Undeclared)
    with pytest.raises(ValueError) as err:
        upcycle(dense_model(), 4, 1, router=_Undeclared.name)
    message = str(err.value)
    assert message.startswith("router: router 'undeclared-test' cannot be upcycled")
    assert "\n" not in message


def test_upcycle_bad_sizes_name_the_field() -> None:
    dense = dense_model()
    with pytest.raises(
        ValueError, match=r"upcycle: granularity: must divide d_hidden \(64\), got 3"
    ):
        upcycle(dense, 4, 1, granularity=3)
    with pytest.raises(ValueError, match=r"top_k: must be <= num_experts \(4\), got 5"):
        upcycle(dense, 4, 5)
    with pytest.raises(ValueError, match="upcycle: top_k: must be < num_experts for router 'relu'"):
        upcycle(dense, 4, 4, router="relu")
    with pytest.raises(ValueError, match="upcycling needs a dense model, got kind 'moe'"):
        upcycle(upcycle(dense, 4, 1), 8, 1)


def test_upcycle_cli_then_train_resume(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "dense"
    train(tiny_config(data_dir, train={"steps": 2, "eval_every": 0}), src)
    out = tmp_path / "moe"
    args = ["upcycle", str(src), str(out), "train.steps=4", "--num-experts", "4", "--top-k", "1"]
    assert main([*args, "--granularity", "2"]) == 0
    assert "moelab train --resume" in capsys.readouterr().out
    dense, _ = load_run(src)
    moe, config = load_run(out)
    assert config.model.ffn.kind == "moe" and config.model.ffn.granularity == 2
    assert config.data.path == str(data_dir)
    origin = RunDir(out).provenance()[0]["origin"]
    assert origin["command"] == "upcycle" and origin["checkpoint"] == "step_00000002"
    assert origin["source"] == str(src.resolve()) and origin["granularity"] == 2
    x = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    assert main(["train", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["method"] == "topk"
    capsys.readouterr()

    assert main([*args, "--granularity", "3", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upcycle: granularity: must divide d_hidden (64), got 3" in err
    assert (
        main(["upcycle", str(out), str(tmp_path / "again"), "--num-experts", "2", "--top-k", "1"])
        == 2
    )
    assert "upcycling needs a dense model, got kind 'moe'" in capsys.readouterr().err


def test_llama_checkpoint_converts_then_upcycles_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    from moelab.hf import convert

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
        expected = llama(IDS).logits
        dense = convert(llama)
        torch.testing.assert_close(dense(IDS), expected, rtol=1e-4, atol=1e-5)
        moe = upcycle(dense, 4, 2, granularity=2).eval()
        torch.testing.assert_close(moe(IDS), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="dense model with no router to switch"):
        convert(llama, router="relu")
