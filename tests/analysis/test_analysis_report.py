"""Reports from hand-written run directories (docs/CONTRACTS.md), and bad input."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from analysis_fixtures import write_run

from moelab.analysis import build_report, read_run, training_curves
from moelab.analysis.analyses import dynamics
from moelab.analysis.evalpass import check_same_vocab
from moelab.analysis.runs import sparsity_target


class _Checker(HTMLParser):
    """Well-formedness (every opened non-void tag closed in order) and the embedded images."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        elif tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def check_html(path: Path) -> _Checker:
    c = _Checker()
    c.feed(path.read_text("utf-8"))
    c.close()
    assert not c.errors, c.errors
    assert c.stack == [], c.stack
    return c


def test_read_run_and_curves(fake_runs):
    rec = read_run(fake_runs["remoe"])
    assert rec.group == "remoe" and rec.method == "remoe"
    c = training_curves(rec)
    assert c.steps.size == 200 and c.has_sparsity
    assert set(c.layer_sparsity) == {"0", "1"} and "remoe_l1" in c.aux
    assert c.eval_steps.tolist() == [50, 100, 150, 200]
    assert sparsity_target(rec) == pytest.approx(0.875)
    d = dynamics(c, 0.875, tolerance=0.025)
    assert d["stages"]["settle_step"] == 96 and d["stages"]["dense_end"] == 45
    assert d["layer_sparsity"]["1"]["mean"] == pytest.approx(0.877, abs=1e-3)
    assert d["collapsed_layers"] == []
    c.layer_sparsity["1"][-5:] = 0.99  # one layer driven (almost) fully sparse by the shared λ
    assert dynamics(c, 0.875, tolerance=0.025)["collapsed_layers"] == ["1"]
    dense = training_curves(read_run(fake_runs["dense"]))
    assert not dense.has_sparsity and dense.layer_sparsity == {}
    assert sparsity_target(read_run(fake_runs["dense"])) is None


def test_report_from_logged_runs(fake_runs, tmp_path):
    out = tmp_path / "report"
    res = build_report(list(fake_runs.values()), out, title="fixture report")
    md = res["markdown"].read_text()
    # table: the two TopK seeds are one row with mean ± SD; the dense run still has its row
    assert "| topk | topk | 2 |" in md
    assert "3.1500 ± 0.0707" in md  # sample SD (ddof=1) of 3.10 and 3.20
    assert "| dense-seed0 | dense | 1 |" in md or "| dense | dense | 1 |" in md
    assert "loss: prose" in md and "loss: code" in md
    assert "no checkpoint: per-token analyses skipped" in md
    names = {p.name for p in res["images"]}
    assert {"loss_curves.png", "final_val_loss.png", "dynamics_remoe.png"} <= names
    for p in res["images"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({p.relative_to(out).as_posix()})" in md
    checker = check_html(res["html"])
    assert len(checker.images) == len(res["images"])
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    data = json.loads((out / "analysis.json").read_text())
    assert data["remoe-seed0"]["results"]["dynamics"]["stages"]["target"] == 0.875


def test_report_without_analysis_or_plots(fake_runs, tmp_path):
    res = build_report([fake_runs["dense"]], tmp_path / "r", analyze=False, plots_enabled=False)
    assert res["images"] == []
    assert "dense" in res["markdown"].read_text()
    check_html(res["html"])


def test_not_a_run_directory(tmp_path, fake_runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}: not a run directory"):
        build_report([fake_runs["topk0"], empty], tmp_path / "out")
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"{missing}: not a run directory"):
        read_run(missing)
    bad = write_run(tmp_path, "bad", "topk", steps=3)
    with (bad / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not valid JSON"):
        read_run(bad)
    with pytest.raises(ValueError, match="at least one run"):
        build_report([], tmp_path / "out")


def test_incompatible_vocabularies_name_the_run():
    check_same_vocab([("a", 512, "bpe"), ("b", 512, "bpe")])
    with pytest.raises(ValueError, match=r"^b: vocabulary \(size 1024.*differs from a"):
        check_same_vocab([("a", 512, "bpe"), ("b", 1024, "bpe")])
    with pytest.raises(ValueError, match=r"^c: .*tokenizer gpt2"):
        check_same_vocab([("a", 512, "bpe"), ("b", 512, "bpe"), ("c", 512, "gpt2")])


def test_explicit_groups(fake_runs, tmp_path):
    res = build_report(
        [fake_runs["topk0"], fake_runs["topk1"]],
        tmp_path / "g",
        groups={"TopK E=8": [str(fake_runs["topk0"]), str(fake_runs["topk1"])]},
        plots_enabled=False,
    )
    assert "| TopK E=8 | topk | 2 |" in res["markdown"].read_text()


def test_analysis_json_is_one_compact_line_per_run_and_keeps_every_digit(tmp_path):
    """write_analysis: compact (docs/results commits one per suite), yet the same numbers: a
    rounded float would round the report's figures twice when a report is redrawn from it."""
    from moelab.analysis.report import write_analysis

    dump = {
        "a-seed0": {"results": {"x": 6.339549999999, "n": 3, "v": [1 / 3, None, "t é"]}},
        "b-seed0": {"results": {"big": 123456789.0, "tiny": 1.23456789e-9}, "notes": []},
    }
    write_analysis(tmp_path / "analysis.json", dump)
    text = (tmp_path / "analysis.json").read_text()
    assert len(text.splitlines()) == 2 + len(dump) and ": " not in text.splitlines()[1][12:]
    assert json.loads(text) == dump
