"""Expert quantization (``moelab compress --method quantize``): weights within half a step of the
group-wise scale (scales recomputed here from the float weights), matmul outputs within the bound
that follows, int8 closer than int4, kept experts bit-identical, the gate-weighted clip error
against a per-token loop, and the written run reloading, evaluating, generating and refusing to
train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

from model_checks import TINY_LM_64  # noqa: E402
from moelab.cli import main  # noqa: E402
from moelab.compress.methods import get_method  # noqa: E402
from moelab.compress.prune import expert_usage  # noqa: E402
from moelab.compress.quantization import (  # noqa: E402
    quantize_model,
    routed_grams,
    weighted_error,
)
from moelab.config import ConfigError  # noqa: E402
from moelab.model import ModelConfig, TransformerLM  # noqa: E402
from moelab.rundir import RunDir  # noqa: E402
from moelab.train import load_run, train  # noqa: E402
from run_fixtures import tiny_config  # noqa: E402

GROUP = 32
LM = TINY_LM_64 | {"d_model": 64}


def _model(**ffn) -> TransformerLM:
    torch.manual_seed(0)
    spec = {"kind": "moe", "num_experts": 4, "top_k": 2, "d_hidden": 64} | ffn
    return TransformerLM(ModelConfig.from_dict(LM | {"ffn": spec})).eval()


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (2, 16), generator=g) for _ in range(n)]


def _ref_step(w_KN: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantization step per weight ``[K, N]``, from each group's range (plain torch): symmetric
    int8 ``absmax/127.5``; asymmetric int4 ``(max − min)/15``."""
    k, n = w_KN.shape
    g = w_KN.t().reshape(n, k // GROUP, GROUP)
    step = g.abs().amax(-1) / 127.5 if bits == 8 else (g.amax(-1) - g.amin(-1)) / 15
    return step.repeat_interleave(GROUP, dim=1).t()  # [K, N]


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_and_matmuls_stay_within_half_a_step(bits):
    model = _model()
    quantized, _ = quantize_model(model, bits, GROUP, clip_search=False)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    for block, qblock in zip(model.blocks, quantized.blocks, strict=True):
        experts, q = block.ffn.experts, qblock.ffn.experts
        w13_q, w2_q = q.dequantized()
        for e in range(experts.num_experts):
            for name, w, wq in (
                ("w13", experts.w13_EDF2[e], w13_q[e]),
                ("w2", experts.w2_EFD[e], w2_q[e]),
            ):
                w = w.detach()
                step = _ref_step(w, bits)
                # int4 runs in bf16 (the kernel's fast path): weights, scales and outputs round
                # to 8 bits of mantissa, up to 8 steps of scale error
                tol = step / 2 * (1 + 1e-4) if bits == 8 else step * (0.5 + 8 / 256) + w.abs() / 128
                assert ((wq - w).abs() <= tol + 1e-7).all(), name
                assert (wq != w).any()  # really quantized
                bank, slot = q.slots()[e]
                rows = x[:, : w.shape[0]]
                y = bank.linear(slot, name, rows)  # the forward's kernel, not the dequantized copy
                bound = rows.abs() @ tol + 1e-6
                if bits == 4:  # bf16 activations in, bf16 products out
                    bound = bound + (rows.abs() @ w.abs()) / 128 + y.abs() / 128
                assert ((y - rows @ w).abs() <= bound).all()


def _layer_error(model: TransformerLM, quantized: TransformerLM) -> float:
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.blocks[0].ffn(x)
        out = quantized.blocks[0].ffn(x)
    return float((out - ref).norm() / ref.norm())


def test_int8_is_closer_than_int4_and_both_are_close():
    model = _model()
    err8 = _layer_error(model, quantize_model(model, 8, GROUP, clip_search=False)[0])
    err4 = _layer_error(model, quantize_model(model, 4, GROUP, clip_search=False)[0])
    assert err8 < err4 / 4  # 16x finer steps; the bound above is per element
    assert err8 < 0.02 and err4 < 0.3


@pytest.mark.parametrize(("bits", "high_bits"), [(8, None), (4, 8)])
def test_experts_kept_high_are_bit_identical_and_the_most_used(bits, high_bits):
    model = _model()
    batches = _batches()
    quantized, details = quantize_model(model, bits, GROUP, 2, batches, clip_search=False)
    usage = expert_usage(model, batches)
    reference = None
    if high_bits is not None:  # the int4 model's kept experts are those of a plain int8 model
        reference = quantize_model(model, high_bits, GROUP, clip_search=False)[0]
    for i, block in enumerate(model.blocks):
        high = details["kept_experts"][str(i)]
        low = [e for e in range(4) if e not in high]
        assert len(high) == 2 and min(usage[i][high]) >= max(usage[i][low])
        w13_q, w2_q = quantized.blocks[i].ffn.experts.dequantized()
        if reference is None:
            w13_ref, w2_ref = block.ffn.experts.w13_EDF2, block.ffn.experts.w2_EFD
        else:
            w13_ref, w2_ref = reference.blocks[i].ffn.experts.dequantized()
        for e in range(4):
            same = torch.equal(w13_q[e], w13_ref[e]) and torch.equal(w2_q[e], w2_ref[e])
            assert same == (e in high), (i, e)


def test_clip_error_matches_a_per_token_loop():
    model = _model()
    batches = _batches(1)
    grams = routed_grams(model, batches, GROUP)
    seen = []  # what the router of block 0 did, captured independently
    moe = model.blocks[0].ffn
    moe.routing_observer = lambda layer, decision, x: seen.append((decision, x.clone()))
    with torch.no_grad():
        model(batches[0])
    moe.routing_observer = None
    decision, x_TD = seen[0]
    e = int(decision.expert_idx_N[0])
    delta = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))  # [D, up]
    loop = torch.zeros(128, 64 // GROUP)
    for t, ex, g in zip(
        decision.token_idx_N, decision.expert_idx_N, decision.weight_N, strict=True
    ):
        if int(ex) != e:
            continue
        for j in range(64 // GROUP):
            part = slice(j * GROUP, (j + 1) * GROUP)
            loop[:, j] += (float(g) * (x_TD[t, part] @ delta[part])) ** 2
    torch.testing.assert_close(weighted_error(delta, grams[0]["w13"][e]), loop, rtol=1e-4, atol=0)

    quantized, details = quantize_model(model, 4, GROUP, 0, batches, clip_search=True)
    err = details["clip_error"]["0"]
    assert err["searched"] < err["unclipped"]  # int4 on these weights: clipping pays
    w13_q, w2_q = quantized.blocks[0].ffn.experts.dequantized()
    experts = moe.experts
    direct = sum(
        float(weighted_error(wq - w.detach(), grams[0][name][x].float()).sum())
        for x in range(4)
        for name, wq, w in (
            ("w13", w13_q[x], experts.w13_EDF2[x]),
            ("w2", w2_q[x], experts.w2_EFD[x]),
        )
    )
    assert direct == pytest.approx(err["searched"], rel=1e-3)


def test_unsupported_widths_and_groups_are_refused_before_any_work():
    cls = get_method("quantize")
    with pytest.raises(ValueError, match=r"^--bits: must be one of 8, 4, got 3$"):
        cls(None, cls.resolve_options({"bits": 3}))
    method = cls(None, cls.resolve_options({"bits": 4, "quant_group": 48}))
    with pytest.raises(
        ValueError, match=r"^--quant-group: must be one of \(32, 64, 128, 256\) for int4, got 48$"
    ):
        method.check(_model())
    method = cls(None, cls.resolve_options({"keep_high": 4}))
    with pytest.raises(ValueError, match=r"^--keep-high: must be a count in \[0, 4\)"):
        method.check(_model())
    with pytest.raises(ValueError, match="merges the experts"):
        cls(None, cls.resolve_options({})).check(_model(router="lory"))
    bad = LM | {"ffn": {"kind": "moe", "d_hidden": 64, "expert_quant": "int4"}}
    with pytest.raises(ConfigError, match=r"ffn.expert_quant_group: must divide d_model \(64\)"):
        ModelConfig.from_dict(bad | {"ffn": bad["ffn"] | {"expert_quant_group": 128}})


def test_a_quantized_run_reloads_evaluates_generates_and_refuses_to_train(
    tmp_path: Path, data_dir: Path, capsys
) -> None:
    ffn = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": 1, "d_hidden": 64}
    train(tiny_config(data_dir, ffn=ffn, train={"steps": 2}), tmp_path / "src")
    out = tmp_path / "q4"
    argv = ["compress", str(tmp_path / "src"), str(out), "--method", "quantize", "--bits", "4"]
    assert main([*argv, "--keep-high", "1", "--calib-batches", "1"]) == 0
    model, config = load_run(out)
    ffn_q = config.model.ffn
    assert (ffn_q.expert_quant, ffn_q.expert_quant_group, ffn_q.expert_quant_keep) == (
        "int4",
        32,
        1,
    )
    origin = RunDir(out).provenance()[0]["origin"]
    high = origin["details"]["kept_experts"]["0"]
    assert model.blocks[0].ffn.experts.high_E.tolist() == high  # the state dict says which
    assert "expert_quant: int4" in (out / RunDir.CONFIG).read_text()

    # bytes on disk: experts shrink to 4 bits + bf16 scale and zero per 32 (one: int8 + fp32)
    source_model, _ = load_run(tmp_path / "src")
    n_weights = sum(p.numel() for b in source_model.blocks for p in b.ffn.experts.parameters())
    per_weight = (3 * (0.5 + 4 / 32) + 1 * (1 + 4 / 32)) / 4
    expected_saving = n_weights * (4 - per_weight)
    sizes = origin["weights_bytes"]
    assert sizes["source"] - sizes["compressed"] == pytest.approx(expected_saving, rel=0.02)

    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert main(["generate", str(out), "--prompt", "def f", "--max-new-tokens", "3"]) == 0
    assert main(["train", "--resume", str(out), "train.steps=4", "logging.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "model.ffn.expert_quant: is 'int4': quantized experts have no gradient" in err
    assert main([*argv[:2], str(tmp_path / "x"), *argv[3:5], "--bits", "3"]) == 2
    assert "--bits: must be one of 8, 4, got 3" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
