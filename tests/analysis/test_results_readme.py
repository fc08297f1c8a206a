"""The generated results blocks (docs/results/README.md, docs/results/<suite>/README.md), the export
of a suite into docs/results, redrawing it from its files, the weight of docs/results, and `make
results` end to end on a tiny suite (issues #13, #19)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_fixtures import prov_record, write_run

import moelab
from moelab.analysis import results, suites
from moelab.analysis.export import export_suite, redraw_suite

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(moelab.__file__).resolve().parents[1]
LOSS = {"dense": 6.2, "topk": 6.3, "remoe": 5.9, "peer": 5.95}
RELU = {"model": {"ffn": {"kind": "moe", "router": "relu", "num_experts": 8, "top_k": 1}}}


def test_committed_blocks_are_current():
    """The checker, as a reader would run it, on the committed docs/results."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "results_readme.py"), "--check"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
    )
    assert proc.returncode == 0, proc.stderr


RESULTS = ROOT / "docs" / "results"
# issue #19: docs/results stays light (no embedded images, no HTML copies, no checkpoints); issue
# #20 adds what re-derives every routing number: each run's routing.npz (~0.5 MB for a 4-layer,
# 8-expert run) and the `paper` protocol's every-step logs
RESULTS_LIMIT = 28 * 2**20
EMBEDDED = re.compile(r"data:image/|;base64,")


def disk_usage(path: Path, block: int = 4096) -> int:
    """What ``du -s`` reports for ``path`` on a filesystem of ``block``-byte blocks: every file
    and every directory rounded up to whole blocks (so many small files cost what they occupy)."""
    entries = [path, *path.rglob("*")]
    return sum(-(-(p.stat().st_size if p.is_file() else 1) // block) * block for p in entries)


def test_disk_usage_counts_blocks_like_du(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"y" * 4097)
    assert disk_usage(tmp_path) == 4096 * (2 + 1 + 2)  # two dirs, a: one block, b: two


def test_committed_reports_link_their_plots_and_docs_results_stays_light():
    """docs/results commits each plot once: Markdown reports that link the PNGs beside them, no
    report embedding an image (the self-contained HTML is for users, not the repository), every
    committed plot linked from its report, and the whole directory within the limit."""
    texts = [p for p in RESULTS.rglob("*") if p.suffix in (".md", ".html", ".htm", ".json", ".svg")]
    embedding = [p for p in texts if EMBEDDED.search(p.read_text("utf-8", errors="replace"))]
    assert not embedding, f"reports embedding images: {embedding}"
    assert not list(RESULTS.rglob("*.htm*"))
    for report in RESULTS.glob("*/report.md"):
        linked = set(re.findall(r"!\[[^]]*\]\((plots/[^)]+)\)", report.read_text("utf-8")))
        committed = {p.relative_to(report.parent).as_posix() for p in report.parent.glob("plots/*")}
        assert linked == committed, (report, linked ^ committed)
    used = disk_usage(RESULTS)
    limit = RESULTS_LIMIT / 2**20
    assert used <= RESULTS_LIMIT, f"docs/results holds {used / 2**20:.1f} MiB, more than {limit}"


def _fake_trainer(p: suites.PlannedRun) -> None:
    write_run(
        p.run_dir.parent,
        p.run_dir.name,
        p.group,
        steps=20,
        eval_every=10,
        layers=0 if p.group == "dense" else 2,
        sparsity=p.group == "remoe",
        val_loss=LOSS[p.group] + 0.01 * p.seed,
        config=RELU if p.group == "remoe" else None,
        provenance=[prov_record()],
    )


@pytest.fixture
def exported(tmp_path):
    """paper-mini with 2 seeds from the fake trainer, exported (over a stale report.html), with
    an index README holding a block."""
    work, res = tmp_path / "work" / "paper-mini", tmp_path / "docs" / "results"
    suites.run_suite(
        "paper-mini",
        work,
        seeds=[0, 1],
        trainer=_fake_trainer,
        log=lambda s: None,
        command="moelab compare --suite paper-mini --out work/paper-mini",
    )
    (res / "paper-mini").mkdir(parents=True)
    (res / "paper-mini" / "report.html").write_text("<img src='data:image/png;base64,AAAA'>")
    export_suite(work, res / "paper-mini")
    readme = res / "README.md"
    readme.write_text(f"# r\n\nprose\n\n{results.BEGIN}\nold\n{results.END}\n\nmore prose\n")
    (res / "paper-mini" / "README.md").write_text(f"x\n{results.BEGIN}\n{results.END}\ny\n")
    return readme, res


def test_export_holds_runs_without_weights(exported):
    _, res = exported
    pm = res / "paper-mini"
    assert {p.name for p in pm.iterdir()} == {
        "README.md",
        "report.md",
        "analysis.json",
        "suite.json",
        "plots",
        "runs",
    }
    assert {p.name for p in (pm / "runs" / "remoe-seed1").iterdir()} == {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "provenance.json",
    }  # fixture: no acct.
    md = (pm / "report.md").read_text()
    assert "](runs/remoe-seed1/metrics.jsonl#L" in md  # the report's links work from here


def test_blocks_render_from_the_files_and_the_check_catches_drift(exported):
    readme, res = exported
    assert results.check_blocks(res)  # "old" is not what the files give
    results.write_blocks(res)
    assert results.check_blocks(res) == []
    text = readme.read_text()
    assert text.startswith("# r\n\nprose\n\n") and text.endswith("\n\nmore prose\n")
    assert "| remoe | 2 | 5.905 ± 0.007 | 2M | 20.5k |" in text  # sample SD (ddof=1)
    line = text.split("| ReMoE beats TopK MoE at equal active compute | ReMoE Table 2 | ")[1]
    line = line.split("\n")[0]
    assert line.startswith("val loss 5.905 vs 6.305: difference -0.400 (95% CI -0.400 to -0.400")
    assert "paired t-test over 2 seeds" in line and line.endswith("| **yes** |")
    assert "| TopK MoE beats dense at equal active compute | both papers |" in text
    assert "**contradicted** |" in text.split("TopK MoE beats dense")[1].split("\n")[0]
    assert results.RULE in text  # the rule, stated under the table
    assert "`moelab compare --suite paper-mini --out work/paper-mini`" in text
    assert "[per-run data](paper-mini/runs/)" in text
    assert "**`experts-scaling`**" in text and "no results committed yet" in text
    suite_md = (res / "paper-mini" / "README.md").read_text()
    assert re.search(
        r"\[5\.9000 \(line \d+\)\]\(\./runs/remoe-seed0/metrics\.jsonl#L\d+\)", suite_md
    )
    # a rerun that changes a number makes the committed block stale
    summary = res / "paper-mini" / "runs" / "remoe-seed0" / "summary.json"
    data = json.loads(summary.read_text())
    summary.write_text(json.dumps(data | {"final_val_loss": 5.5}))
    problems = results.check_blocks(res)
    assert any(str(readme) in p and "differs" in p for p in problems)
    # and so does a hand edit of the block
    summary.write_text(json.dumps(data))
    readme.write_text(readme.read_text().replace("5.905 ± 0.007", "5.800 ± 0.007"))
    assert [p for p in results.check_blocks(res) if str(readme) in p]


def test_redraw_rewrites_the_report_and_plots_from_the_exported_files(exported):
    """An exported suite is redrawn from its own files (no checkpoint, no training): the same
    report, the same plots (each a palette PNG), no HTML unless asked."""
    _, res = exported
    pm = res / "paper-mini"
    before = (pm / "report.md").read_text()
    plots_before = sorted(p.name for p in (pm / "plots").iterdir())
    for p in (pm / "plots").iterdir():
        p.unlink()
    (pm / "report.md").write_text("stale")
    (pm / "report.html").write_text("<img src='data:image/png;base64,AAAA'>")  # would contradict
    out = redraw_suite(pm)
    assert (pm / "report.md").read_text() == before
    assert sorted(p.name for p in (pm / "plots").iterdir()) == plots_before
    assert out["html"] is None and not (pm / "report.html").exists()
    Image = pytest.importorskip("PIL.Image")
    assert {Image.open(p).mode for p in out["images"]} == {"P"}
    assert results.check_blocks(res)  # the index holds "old"; the suite's files are intact
    results.write_blocks(res)
    assert results.check_blocks(res) == []


def test_redraw_recomputes_the_training_dynamics_from_the_metrics(exported):
    """The dynamics are a function of metrics.jsonl alone, so a redraw computes them with this
    code (a number written by an older version, e.g. a population SD, does not survive)."""
    _, res = exported
    pm = res / "paper-mini"
    path = pm / "analysis.json"
    dump = json.loads(path.read_text())
    fresh = dump["remoe-seed0"]["results"]["dynamics"]
    assert fresh["stages"]["min_sparsity"] is not None
    stale = json.loads(json.dumps(fresh))
    stale["stages"]["min_sparsity"] = 123.0
    dump["remoe-seed0"]["results"]["dynamics"] = stale
    path.write_text(json.dumps(dump))
    redraw_suite(pm)
    again = json.loads(path.read_text())["remoe-seed0"]["results"]["dynamics"]
    assert again == fresh


def test_the_committed_analysis_keeps_the_top_tokens_the_report_shows(exported):
    """slim_analysis drops the top tokens of layers after the first routed one; the report,
    which lists those of the first, is the same redrawn from the full or the slim file."""
    _, res = exported
    pm = res / "paper-mini"
    path = pm / "analysis.json"
    dump = json.loads(path.read_text())
    row = [{"id": i, "text": f"t{i}", "weight": 0.5 - 0.01 * i, "count": 3} for i in range(8)]
    tops = {"0": [row, row[::-1]], "1": [row[:2], row[2:4]]}
    dump["remoe-seed0"]["results"]["top_tokens"] = tops
    other = {k: v for k, v in dump["remoe-seed0"]["results"].items() if k != "top_tokens"}
    path.write_text(json.dumps(dump))
    out = redraw_suite(pm)  # redraws, then slims the file
    full = (pm / "report.md").read_text()
    assert "| remoe | 0 | 1 | 't7' 't6' 't5' 't4' 't3' 't2' |" in full
    slim = json.loads(path.read_text())["remoe-seed0"]["results"]
    assert slim["top_tokens"] == {"0": tops["0"]}
    assert {k: v for k, v in slim.items() if k != "top_tokens"} == other
    redraw_suite(pm)
    assert (pm / "report.md").read_text() == full and out["html"] is None


def test_missing_markers_or_index_are_an_error_and_write_creates_the_index(tmp_path):
    assert "missing" in results.check_blocks(tmp_path)[0]
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    assert "needs exactly one" in results.check_blocks(tmp_path)[0]
    readme.unlink()
    results.write_blocks(tmp_path / "fresh")
    assert results.check_blocks(tmp_path / "fresh") == []
    assert "no results committed yet" in (tmp_path / "fresh" / "README.md").read_text()


def test_export_refuses_an_unfinished_suite(tmp_path):
    def half(p: suites.PlannedRun) -> None:
        _fake_trainer(p)
        if p.group == "peer":
            (p.run_dir / "summary.json").unlink()

    suites.run_suite(
        "paper-mini", tmp_path / "w", seeds=[0], trainer=half, log=lambda s: None, analyze=False
    )
    with pytest.raises(ValueError, match="peer-seed0: run not finished"):
        export_suite(tmp_path / "w", tmp_path / "d")


TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "data.batch_size=2",
    "data.seq_len=32",
    "data.eval_batch_size=2",
    "data.eval_max_batches=1",
    "checkpoint.every=1",
    "logging.log_every=1",
    "logging.progress=false",
]


@pytest.mark.slow
def test_make_results_end_to_end_on_a_tiny_suite(tmp_path):
    """scripts/make_results.py: train (real trainer, 3 steps), export, rewrite the block."""
    args = [
        sys.executable,
        str(ROOT / "scripts" / "make_results.py"),
        "--suites",
        "load-balance",
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "results"),
        "--steps",
        "3",
        "--seeds",
        "0",
        "--allow-dirty",
        "--compare-args",
        "--batch-size 2 --max-batches 2",
        *[a for o in TINY for a in ("--set", o)],
    ]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert results.check_blocks(tmp_path / "results") == []
    text = (tmp_path / "results" / "README.md").read_text()
    assert "| topk-unbalanced | 1 |" in text and "max expert share × E" in text
    lb = tmp_path / "results" / "load-balance"
    assert (lb / "runs" / "remoe-plain-l1-seed0" / "provenance.json").is_file()
    assert not list(lb.rglob("*.safetensors")) and not list(lb.rglob("state.pt"))
    # reduced suites may not overwrite the committed results
    bad = subprocess.run([*args[:2], "--steps", "3"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "may not overwrite docs/results" in bad.stderr


def test_the_routers_suite_renders_its_table_and_table2_claims(tmp_path):
    losses = {name: 6.0 + 0.01 * i for i, (name, _, _) in enumerate(suites.ROUTER_RUNS)}
    losses["remoe"] = 5.5

    def trainer(p: suites.PlannedRun) -> None:
        write_run(
            p.run_dir.parent,
            p.run_dir.name,
            p.group,
            steps=20,
            eval_every=10,
            layers=0 if p.group == "dense" else 2,
            val_loss=losses[p.group],
            provenance=[prov_record()],
        )

    work = tmp_path / "routers"
    suites.run_suite("routers", work, seeds=[0], trainer=trainer, log=lambda s: None, analyze=False)
    text = "\n".join(results.render_suite("routers", work, "."))
    assert "| hash | hash | 6.040 | 1.00 |" in text  # run, method, val loss, experts/token
    for baseline in ("topk", "expert_choice", "hash", "sparsemixer", "lory"):
        assert f"| remoe beats {baseline} at equal active compute | ReMoE Table 2 |" in text
    assert "| hash beats dense | ReMoE Table 2 | val loss 6.040 vs 6.000" in text
    hash_line = text.split("| hash beats dense |")[1].split("\n")[0]
    assert "(one seed, no test)" in hash_line and "**not shown (1 seed)** |" in hash_line
    assert "| top_p beats dense | its paper |" in text
