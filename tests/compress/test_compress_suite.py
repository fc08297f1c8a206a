"""``moelab compare --suite compress``: rows equal a direct compress_run + whole-split eval of the
same run, refusals are rows, a resumed suite keeps its finished rows, the sources stay unchanged,
and the settings come from the methods themselves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from moelab.analysis.compress_report import read_rows
from moelab.cli import main
from moelab.compress import compress_run
from moelab.compress.methods import SUITE_RATIOS, get_method, method_names
from moelab.compress.suite import plan_compress, run_compress_suite
from moelab.train import evaluate_run, load_run, train
from run_fixtures import REMOE, TOPK, tiny_config

METHODS = ["frequency", "mc_smoe"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """Tiny TopK and ReLU runs trained 3 steps under FROM/runs, and the suite run on them once
    (frequency and mc_smoe at ratio 0.5) through the command line."""
    root = tmp_path_factory.mktemp("compress_suite")
    for name, ffn in (("topk-seed0", TOPK), ("remoe-seed0", REMOE)):
        train(tiny_config(data_dir, ffn=ffn, train={"steps": 3}), root / "from" / "runs" / name)
    before = _digests(root / "from")
    out = root / "out"
    argv = ["compare", "--suite", "compress", "--from", str(root / "from"), "--out", str(out)]
    argv += ["--methods", *METHODS, "--ratios", "0.5", "--calib-batches", "2"]
    assert main(argv) == 0
    return {"root": root, "out": out, "before": before, "argv": argv}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_rows_equal_a_direct_compress_and_whole_split_eval(suite, tmp_path):
    rows = {(r["source"], r["method"]): r for r in read_rows(suite["out"])}
    assert set(rows) == {(s, m) for s in ("topk", "remoe") for m in ["none", *METHODS]}
    src = suite["root"] / "from" / "runs" / "topk-seed0"
    compress_run(src, tmp_path / "direct", "frequency", 0.5, calib_batches=2)
    direct = evaluate_run(tmp_path / "direct")  # max_batches None: the whole split
    row = rows["topk", "frequency"]
    assert row["status"] == "ok" and row["setting"] == "0.5"
    assert row["val_loss"] == pytest.approx(direct["val_loss"], abs=1e-6)
    assert row["val_tokens"] == direct["tokens"]
    # the whole split, not the runs' eval_max_batches=2 windows of 4x16 tokens
    assert direct["tokens"] > 2 * 4 * 16
    assert (
        row["weights_bytes"]
        == (tmp_path / "direct" / "checkpoints" / "step_00000000" / "model.safetensors")
        .stat()
        .st_size
    )
    # kept: the MoE layers' parameters after over before, from the models themselves
    model, _ = load_run(tmp_path / "direct")
    source, _ = load_run(src)
    moe = [n for n, _ in source.named_parameters() if ".ffn." in n]
    before = sum(p.numel() for n, p in source.named_parameters() if n in moe)
    after = sum(p.numel() for n, p in model.named_parameters() if ".ffn." in n)
    assert row["kept"] == pytest.approx(after / before)
    base = rows["topk", "none"]
    assert base["val_loss"] == pytest.approx(evaluate_run(src)["val_loss"], abs=1e-6)
    report = (suite["out"] / "compress_report.md").read_text()
    assert f"{row['val_loss']:.4f} | {row['val_loss'] - base['val_loss']:+.4f}" in report
    assert (suite["out"] / "img" / "compress_loss_vs_bytes.png").is_file()
    record = json.loads((suite["out"] / "compress_suite.json").read_text())
    assert record["methods"] == METHODS and len(record["jobs"]) == 4 and record["finished"]


def test_the_sources_are_byte_identical_afterwards(suite):
    assert _digests(suite["root"] / "from") == suite["before"]
    assert not list((suite["root"] / "from").rglob("*frequency*"))


def test_a_refusal_is_a_row_and_resumption_keeps_finished_rows(suite, capsys):
    out = suite["out"]
    kept = (out / "rows" / "topk-frequency-0.5.json").read_text()
    mtime = (out / "runs" / "topk-frequency-0.5" / "config.yaml").stat().st_mtime_ns
    # ratio 0.05 keeps < 1 of 4 experts: mc_smoe and frequency refuse it, one line each
    argv = [*suite["argv"][:-4], "--ratios", "0.5", "0.05", "--calib-batches", "2"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "topk-frequency-0.5: done already, kept" in log
    assert (out / "rows" / "topk-frequency-0.5.json").read_text() == kept
    assert (out / "runs" / "topk-frequency-0.5" / "config.yaml").stat().st_mtime_ns == mtime
    low = {(r["source"], r["method"]): r for r in read_rows(out) if r["setting"] == "0.05"}
    assert len(low) == 4
    # mc_smoe: round(0.05·4) = 0 weight slots; frequency on TopK k=2: 1 expert < k
    refused = [low["topk", "mc_smoe"], low["remoe", "mc_smoe"], low["topk", "frequency"]]
    assert all(r["status"] == "refused" for r in refused)
    assert all(r["reason"].startswith("--ratio") and "\n" not in r["reason"] for r in refused)
    assert not (out / "runs" / "topk-frequency-0.05").exists()
    assert "refused: " in (out / "compress_report.md").read_text()


def test_settings_come_from_the_methods(suite):
    src = {"topk": suite["root"] / "from" / "runs" / "topk-seed0"}
    plan = plan_compress(src, suite["root"] / "p")
    model, _ = load_run(src["topk"])
    want = [(n, s.label) for n in method_names() for s in get_method(n).suite_settings(model)]
    assert [(j.method, j.setting.label) for j in plan] == want
    assert [s.ratio for s in get_method("frequency").suite_settings(model)] == list(SUITE_RATIOS)
    quant = get_method("quantize").suite_settings(model)
    assert [s.options["bits"] for s in quant] == [8, 4] and all(s.ratio is None for s in quant)
    # d_model 32 and expert width 32 of the tiny model: the largest group dividing both
    assert all(s.options["quant_group"] == 32 for s in quant)


def test_bad_options_are_one_line_errors_before_any_work(suite, tmp_path):
    src = suite["root"] / "from"
    with pytest.raises(ValueError, match=r"--method: must be one of"):
        run_compress_suite(tmp_path / "o", from_dir=src, methods=["nope"])
    with pytest.raises(ValueError, match=r"--ratios: each must be a number in \(0, 1\)"):
        run_compress_suite(tmp_path / "o", from_dir=src, ratios=(1.5,))
    with pytest.raises(ValueError, match=r"--out: .* must lie outside source topk"):
        run_compress_suite(src / "runs" / "topk-seed0" / "x", from_dir=src)
    with pytest.raises(ValueError, match=r"--heal-steps"):
        run_compress_suite(tmp_path / "o", from_dir=src, heal_steps=-1)
    assert not (tmp_path / "o").exists()
