"""``--method compressed_experts`` (He et al. 2025): the least-squares stand-in against references
computed differently, exact where the optimum is known, the layer option's accounting, and the
driver end to end on tiny TopK and ReLU runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model_checks import TINY_LM_64
from moelab.compress import compress_run
from moelab.compress.compressed_experts_fit import fit_stand_in, stand_in_error
from moelab.compress.methods import Calibration, get_method
from moelab.layers.dense import activate
from moelab.model import ModelConfig, TransformerLM
from moelab.model.accounting import accounting
from moelab.model.ffn_base import ffn_params
from moelab.model.generate import generate
from moelab.train import evaluate_run, load_run, train
from run_fixtures import tiny_config

D, F = 16, 16


def _model(**ffn) -> TransformerLM:
    torch.manual_seed(0)
    spec = {"kind": "moe", "num_experts": 4, "top_k": 2, "d_hidden": F} | ffn
    return TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": spec})).eval()


def _calib(batches: int = 4) -> Calibration:
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(batches)]
    return Calibration(ids, "t", 0)


def _apply(model: TransformerLM, ratio: float, width: int | None = None, batches: int = 4):
    method = get_method("compressed_experts")(ratio, {"ce_width": width})
    method.check(model)
    return method.apply(model, _calib(batches))


def _duplicated_units(w13: torch.Tensor, w2: torch.Tensor, distinct: int) -> None:
    """Make hidden unit j a copy of unit ``j mod distinct`` (SwiGLU: gate and up columns), so the
    expert's activations have rank ``distinct``: a stand-in of that width is exact once W2 is
    refit (summing the copies' rows), while keeping the units unchanged is not."""
    hidden = w2.shape[0]
    src = torch.arange(hidden) % distinct
    w13[:, :hidden] = w13[:, src].clone()
    w13[:, hidden:] = w13[:, hidden + src].clone()


def test_the_fit_is_weighted_least_squares_on_the_kept_units():
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(D, 2 * F, generator=gen), torch.randn(F, D, generator=gen)
    x, g = torch.randn(200, D, generator=gen), torch.rand(200, generator=gen) + 0.1
    s = fit_stand_in(w13, w2, "swiglu", x, g, width=5)
    # reference: numpy's lstsq on the gate-weighted design [1, a_S]
    a = activate(x.double() @ w13.double(), "swiglu").numpy()
    y, gw = a @ w2.double().numpy(), g.double().numpy()[:, None]
    design = np.concatenate([np.ones((200, 1)), a[:, s.units]], 1)
    theta = np.linalg.lstsq(gw * design, gw * y, rcond=None)[0]
    np.testing.assert_allclose(s.bias_D.numpy(), theta[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.w2.numpy(), theta[1:], rtol=1e-4, atol=1e-4)
    # the kept units: greedily, the one least explained by the vector and the units kept so far
    # (reference: residual norms from lstsq projections instead of the QR updates)
    m = gw * a * np.linalg.norm(w2.double().numpy(), axis=1)
    chosen: list[int] = []
    for _ in range(5):
        basis = np.concatenate([gw, m[:, chosen]], 1)
        resid = m - basis @ np.linalg.lstsq(basis, m, rcond=None)[0]
        norms = np.linalg.norm(resid, axis=0)
        norms[chosen] = -1
        chosen.append(int(np.argmax(norms)))
    assert s.units == sorted(chosen)
    # better than dropping the expert and than keeping the units with their old weights
    truncated = type(s)(s.w13, w2[s.units], torch.zeros(D), s.units)
    fitted = stand_in_error(w13, w2, "swiglu", x, g, s)
    assert fitted < stand_in_error(w13, w2, "swiglu", x, g, truncated)
    assert fitted < stand_in_error(w13, w2, "swiglu", x, g, None)


def test_a_vector_stand_in_is_the_gated_mean_output():
    gen = torch.Generator().manual_seed(1)
    w13, w2 = torch.randn(D, 2 * F, generator=gen), torch.randn(F, D, generator=gen)
    x, g = torch.randn(50, D, generator=gen), torch.rand(50, generator=gen)
    s = fit_stand_in(w13, w2, "swiglu", x, g, width=0)
    y = activate(x.double() @ w13.double(), "swiglu") @ w2.double()
    w = g.double() ** 2
    expected = (w[:, None] * y).sum(0) / w.sum()  # argmin_b Σ g²‖y − b‖²
    torch.testing.assert_close(s.bias_D.double(), expected, rtol=1e-5, atol=1e-6)


def test_an_expert_of_rank_r_activations_is_reproduced_exactly():
    gen = torch.Generator().manual_seed(2)
    w13, w2 = torch.randn(D, 2 * F, generator=gen), torch.randn(F, D, generator=gen)
    _duplicated_units(w13, w2, distinct=4)
    x, g = torch.randn(80, D, generator=gen), torch.rand(80, generator=gen) + 0.1
    s = fit_stand_in(w13, w2, "swiglu", x, g, width=4)
    dropped = stand_in_error(w13, w2, "swiglu", x, g, None)
    assert stand_in_error(w13, w2, "swiglu", x, g, s) < 1e-9 * dropped
    truncated = type(s)(s.w13, w2[s.units], torch.zeros(D), s.units)
    assert stand_in_error(w13, w2, "swiglu", x, g, truncated) > 0.1 * dropped


def test_a_ratio_that_keeps_every_expert_changes_nothing():
    model = _model()
    outcome = _apply(model, ratio=0.99)
    assert outcome.details["compressed_experts"] == 0
    assert outcome.model.cfg == model.cfg
    ids = _calib(1).batches[0]
    with torch.no_grad():
        torch.testing.assert_close(outcome.model(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "ffn", [{"router": "topk"}, {"router": "relu"}, {"router": "topk", "granularity": 2}]
)
def test_exact_stand_ins_leave_the_model_unchanged(ffn):
    """Every expert's activations have rank 2: replaced experts are reproduced exactly, so the
    compressed model (router permuted, full experts first) computes the same logits."""
    model = _model(**ffn)
    hidden = F // model.cfg.ffn.granularity
    with torch.no_grad():
        for block in model.blocks:
            ex = block.ffn.experts
            for e in range(ex.num_experts):
                _duplicated_units(ex.w13_EDF2.data[e], ex.w2_EFD.data[e], distinct=2)
    outcome = _apply(model, ratio=0.6, width=2, batches=8)
    ffn_after = outcome.model.cfg.ffn
    assert ffn_after.compressed_experts >= 1 and ffn_after.compressed_width == 2
    assert hidden > 2
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(outcome.model(ids), model(ids), rtol=1e-4, atol=1e-5)
    for block in outcome.details["blocks"].values():
        assert block["error_compressed"] < 1e-5 * block["error_dropped"]  # float32 weights


@pytest.mark.parametrize("width", [0, 3])
def test_parameters_follow_the_ratio_and_the_models_accounting(width):
    model = _model(num_experts=8, top_k=2)
    outcome = _apply(model, ratio=0.5, width=width)
    new, c = outcome.model, outcome.details["compressed_experts"]
    assert accounting(new.cfg)["total_params"] == sum(p.numel() for p in new.parameters())
    full, stand_in = ffn_params(D, F, "swiglu"), D + ffn_params(D, width, "swiglu")
    kept = (8 - c) * full + c * stand_in
    assert kept >= 0.5 * 8 * full > kept - (full - stand_in)  # the most compressed that keep 50%
    for change in outcome.layers:
        layer = new.blocks[change.block].ffn
        assert change.params_after == sum(p.numel() for p in layer.parameters())
        assert change.params_before - change.params_after == c * (full - stand_in)
        assert change.experts_after == 8 - c


def test_refusals_name_the_option():
    model = _model()
    with pytest.raises(ValueError, match="--ratio: 0.05 would compress all 4"):
        _apply(model, ratio=0.05)
    with pytest.raises(ValueError, match="--ce-width: must be an integer from 0 to 15"):
        _apply(model, ratio=0.5, width=16)
    with pytest.raises(ValueError, match="ffn.compressed_width: must be below"):
        _model(compressed_experts=1, compressed_width=F)
    with pytest.raises(ValueError, match="ffn.compressed_experts: must be below"):
        _model(compressed_experts=4)


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_the_driver_writes_a_run_that_reloads_evaluates_and_generates(
    tmp_path: Path, data_dir: Path, router: str
):
    ffn = {"kind": "moe", "router": router, "num_experts": 4, "top_k": 1, "d_hidden": 32}
    train(tiny_config(data_dir, ffn=ffn, train={"steps": 2}), tmp_path / "src")
    before = _digest(tmp_path / "src")
    out = tmp_path / "ce"
    _, outcome = compress_run(
        tmp_path / "src", out, "compressed_experts", 0.6, {"ce_width": 2}, calib_batches=2
    )
    assert _digest(tmp_path / "src") == before  # the source run is only read
    model, config = load_run(out)
    assert config.model.ffn.compressed_experts == outcome.details["compressed_experts"] >= 1
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), outcome.model(ids))
    assert evaluate_run(out, max_batches=1)["val_loss"] > 0
    assert generate(model, ids, max_new_tokens=4, temperature=0).shape == (1, 12)
    if router == "relu":
        assert model.blocks[0].ffn.sparsity_target == pytest.approx(1 - 1 / 4)


def test_the_command_writes_a_run_that_analyzes_and_trains_on(tmp_path: Path, data_dir: Path):
    from moelab.cli import main

    ffn = {"kind": "moe", "router": "relu", "num_experts": 4, "top_k": 1, "d_hidden": 32}
    train(tiny_config(data_dir, ffn=ffn, train={"steps": 2}), tmp_path / "src")
    out = str(tmp_path / "ce")
    args = ["--method", "compressed_experts", "--ratio", "0.6", "--ce-width", "2"]
    assert main(["compress", str(tmp_path / "src"), out, *args, "--calib-batches", "1"]) == 0
    assert main(["generate", out, "--prompt", "a b", "--max-new-tokens", "3"]) == 0
    assert main(["train", "--resume", out, "train.steps=2", "logging.progress=false"]) == 0
    assert main(["analyze", out, "--what", "load", "compute"]) == 0  # needs logged metrics
    model, config = load_run(out)
    assert config.model.ffn.compressed_experts >= 1 and config.train.steps == 2
