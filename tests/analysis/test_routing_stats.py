"""The routing statistics file (routing.npz, issue #20): the analysis pass writes it, the numbers
recomputed from it equal the checkpoint pass's, export commits it, a redraw and `moelab analyze`
use it when the checkpoints are gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moelab.analysis import analyses, suites
from moelab.analysis.collect import LayerTrace, RoutingTrace
from moelab.analysis.evalpass import EvalSettings
from moelab.analysis.export import RUN_FILES, export_suite, redraw_suite
from moelab.analysis.report import analyze_run, build_report, read_analysis
from moelab.analysis.routing_file import load_routing, save_routing
from moelab.analysis.runs import read_run
from moelab.cli import main
from moelab.rundir import RunDir

train = pytest.importorskip("moelab.train")

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn.d_hidden=64",
    "train.steps=2",
    "data.batch_size=2",
    "data.seq_len=32",
    "data.eval_batch_size=2",
    "data.eval_max_batches=1",
    "checkpoint.every=1",
    "logging.log_every=1",
    "logging.progress=false",
    "train.eval_every=0",
]
FAST = EvalSettings(batch_size=4, max_batches=4)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    """A ReMoE run (variable experts per token) trained for 2 steps, analysed from its two
    checkpoints with the routing file saved; returns the run, the results and the notes."""
    root = tmp_path_factory.mktemp("routing_stats")
    cfg = train.resolve_run_config(preset="remoe-tiny", overrides=TINY)
    train.train(cfg, root / "remoe-seed0", preset="remoe-tiny")
    ra = analyze_run(root / "remoe-seed0", analyses.ANALYSES, FAST, save_routing=True)
    return root / "remoe-seed0", ra.results, ra.notes


def without_checkpoints(run: Path, dest: Path) -> Path:
    """The run as docs/results holds it: the exported files only (no checkpoint, no tokenizer)."""
    dest.mkdir(parents=True)
    for name in RUN_FILES:
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    return dest


def test_numbers_from_the_file_equal_the_checkpoint_pass(analysed, tmp_path):
    run, want, _ = analysed
    assert (run / RunDir.ROUTING).is_file()
    assert {"load", "compute", "domains", "usage", "stability", "top_tokens"} <= set(want)
    bare = without_checkpoints(run, tmp_path / "remoe-seed0")
    assert not RunDir(bare).checkpoints() and not RunDir(bare).has_tokenizer
    ra = analyze_run(bare, analyses.ANALYSES, FAST)
    got = ra.results
    exact = [k for k in want if k != "top_tokens"]
    assert json.dumps({k: got[k] for k in exact}) == json.dumps({k: want[k] for k in exact})
    assert set(got["top_tokens"]) == {"0"}  # the layer whose gate-weight sums are kept
    assert got["top_tokens"]["0"] == want["top_tokens"]["0"]  # texts: the shipped tokenizer
    note = ra.notes[-1]
    assert note.startswith(f"per-token analyses from {RunDir.ROUTING}")
    assert "need a checkpoint: top tokens of layers 1" in note


def test_the_file_is_small_and_holds_compact_arrays(analysed):
    run, want, _ = analysed
    rf = load_routing(run / RunDir.ROUTING)
    with np.load(run / RunDir.ROUTING) as z:
        kinds = {k: z[k].dtype for k in z.files}
    assert kinds["token_ids"] == np.uint16 and kinds["domain"] == np.uint8
    assert kinds["c0_l0_experts"] == np.uint8 and kinds["c1_l1_count"] == np.uint8
    assert kinds["c0_l0_pair_wsum"] == np.float64 and "c0_l1_pair_wsum" not in kinds
    assert rf.trace.num_tokens == want["eval_tokens"] == 4 * 4 * 32
    assert rf.meta["checkpoints"] == want["stability"]["checkpoints"]
    # 512 tokens: the training counts of the 8,192 ids (about 11 kB) weigh most
    assert (run / RunDir.ROUTING).stat().st_size < 40_000


def trace_with(layers: dict[str, LayerTrace], T: int = 6) -> RoutingTrace:
    rng = np.random.default_rng(0)
    return RoutingTrace(
        token_ids_T=rng.integers(0, 70_000, T),  # beyond uint16: stored as uint32
        domain_T=np.array([0, 1, 1, 0, 2, 2])[:T],
        loss_T=rng.random(T).astype(np.float32),
        layers=layers,
        domains=["a", "b", "c"],
    )


def test_round_trip_keeps_every_assignment_aggregate_and_pass(tmp_path):
    """Hand-made traces: assignments in router order (not sorted by token), a token routed
    twice to one expert (several passes), a token routed nowhere, a weight beyond float16's
    range, and a layer with aggregates only."""
    tok = np.array([3, 0, 0, 5, 3, 3, 1], np.int64)
    exp = np.array([2, 1, 0, 7, 2, 4, 0], np.int32)
    w = np.array([0.5, 0.25, 0.125, 7e4, 0.75, 1.0, 0.3], np.float32)
    flat = LayerTrace(
        "0",
        "moe-relu",
        8,
        np.bincount(exp, minlength=8).astype(np.int64),
        np.bincount(exp, weights=w, minlength=8),
        [3, 2],
        tok,
        exp,
        w,
        np.bincount(tok, minlength=6).astype(np.int32),
    )
    agg = LayerTrace(
        "1", "peer", 5000, np.arange(5000), np.linspace(0, 1, 5000), [7], active_T=np.full(6, 4)
    )
    trace = trace_with({"0": flat, "1": agg})
    prev_flat = LayerTrace("0", "moe-relu", 8, flat.load_E, flat.z_prime_E, [1], tok[:3], exp[:3])
    prev_flat.weight_N = w[:3]
    previous = trace_with({"0": prev_flat, "1": agg})
    save_routing(tmp_path / "r.npz", trace, previous, train_counts_V=np.arange(70_000))
    rf = load_routing(tmp_path / "r.npz")
    got = rf.trace.layers["0"]
    # the same multiset of (token, expert), compared one assignment at a time
    want_rows = sorted(zip(tok.tolist(), exp.tolist(), strict=True))
    assert (
        sorted(zip(got.token_idx_N.tolist(), got.expert_idx_N.tolist(), strict=True)) == want_rows
    )
    # gate-weight sums per (expert, vocabulary id), against a loop over the assignments
    sums: dict[tuple[int, int], list[float]] = {}
    for t, e, x in zip(tok, exp, w, strict=True):
        sums.setdefault((int(e), int(trace.token_ids_T[t])), []).append(float(x))
    pe, pi, pc, pw = rf.weight_sums["0"]
    assert sorted(sums) == list(zip(pe.tolist(), pi.tolist(), strict=True))
    assert pc.tolist() == [len(sums[k]) for k in sorted(sums)]
    assert pw.tolist() == pytest.approx([sum(sums[k]) for k in sorted(sums)], rel=1e-12)
    tops = analyses.top_tokens(rf.trace, sums=rf.weight_sums)
    assert tops == analyses.top_tokens(trace) and tops["0"][7][0]["weight"] == pytest.approx(7e4)
    assert got.active_T.tolist() == [2, 1, 0, 3, 0, 1]
    assert got.distinct_per_batch == [3, 2] and np.array_equal(got.z_prime_E, flat.z_prime_E)
    back = rf.trace.layers["1"]
    assert not back.has_flat and np.array_equal(back.load_E, agg.load_E)
    assert np.array_equal(back.z_prime_E, agg.z_prime_E) and back.active_T.tolist() == [4] * 6
    assert np.array_equal(rf.trace.token_ids_T, trace.token_ids_T)
    assert np.array_equal(rf.trace.loss_T, trace.loss_T)
    assert rf.train_counts_V[-1] == 69_999
    assert sorted(
        zip(rf.previous.layers["0"].token_idx_N, rf.previous.layers["0"].expert_idx_N, strict=True)
    ) == sorted(zip(tok[:3], exp[:3], strict=True))
    assert analyses.stability(rf.previous, rf.trace) == analyses.stability(previous, trace)
    assert analyses.domain_analysis(rf.trace) == analyses.domain_analysis(trace)
    assert analyses.usage_analysis(rf.trace) == analyses.usage_analysis(trace)


def test_a_file_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="x.npz: not a routing statistics file"):
        load_routing(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="y.npz: not a routing statistics file"):
        load_routing(tmp_path / "y.npz")


def test_a_redraw_recomputes_the_routing_numbers_from_the_file(analysed, tmp_path):
    """read_analysis (what redraw_suite reads) takes the per-token numbers from routing.npz,
    not from the saved analysis.json, and gets the PEER/PKM usage plot's gate masses back."""
    run, want, _ = analysed
    bare = without_checkpoints(run, tmp_path / "runs" / "remoe-seed0")
    out = tmp_path / "rep"
    build_report([bare], out, plots_enabled=False, html=False)
    path = out / "analysis.json"
    dump = json.loads(path.read_text())
    assert dump["remoe-seed0"]["results"]["domains"] == want["domains"]
    dump["remoe-seed0"]["results"]["domains"]["mean_kl"] = 999.0  # a stale number
    dump["remoe-seed0"]["results"]["stability"]["mean_assignment_flip_rate"] = -1.0
    path.write_text(json.dumps(dump))
    ra = read_analysis(out, [read_run(bare)])[str(bare)]
    assert ra.results["domains"] == want["domains"]
    assert ra.results["stability"] == want["stability"]
    assert set(ra.z_primes) == {"0", "1"}


def test_analyze_without_checkpoint_or_file_names_what_needs_one(analysed, tmp_path, capsys):
    run, _, _ = analysed
    bare = without_checkpoints(run, tmp_path / "r")
    (bare / RunDir.ROUTING).unlink()
    with pytest.raises(ValueError, match=r"no checkpoints/step_\* and no routing.npz: load"):
        analyze_run(bare, ("load", "domains"))
    assert "domains" not in analyze_run(bare, ("dynamics",)).results
    bare2 = without_checkpoints(run, tmp_path / "r2")
    assert main(["analyze", str(bare2), "--what", "domains", "stability"]) == 0
    text = capsys.readouterr().out
    assert "mean KL(domain || all)" in text and "flip rate" in text
    assert f"note: per-token analyses from {RunDir.ROUTING}" in text


@pytest.mark.slow  # four analysed runs, a report with plots, then its redraw
def test_compare_writes_it_export_commits_it_and_a_redraw_repeats_the_report(analysed, tmp_path):
    """moelab compare's analysis pass writes routing.npz into each run, the export copies it,
    and a redraw of the exported suite (no checkpoint) recomputes the same analysis.json and
    report.md from it."""
    run, _, _ = analysed
    assert RunDir.ROUTING in RUN_FILES and RunDir.ROUTING in RunDir.ENTRIES

    def trainer(p: suites.PlannedRun) -> None:  # every run: a copy of the trained one
        shutil.copytree(run, p.run_dir, ignore=shutil.ignore_patterns(RunDir.ROUTING))

    work, dest = tmp_path / "work", tmp_path / "docs" / "paper-mini"
    suites.run_suite(
        "paper-mini", work, seeds=[0], trainer=trainer, report_settings=FAST, log=lambda s: None
    )
    assert all((d / RunDir.ROUTING).is_file() for d in (work / "runs").iterdir())
    export_suite(work, dest)
    assert (dest / "runs" / "peer-seed0" / RunDir.ROUTING).is_file()
    assert not list(dest.rglob("*.safetensors"))
    report, analysis = (dest / "report.md").read_text(), (dest / "analysis.json").read_text()
    (dest / "analysis.json").write_text(analysis.replace('"mean_kl":', '"mean_kl":1e9,"x":'))
    redraw_suite(dest)
    assert (dest / "analysis.json").read_text() == analysis
    assert (dest / "report.md").read_text() == report
