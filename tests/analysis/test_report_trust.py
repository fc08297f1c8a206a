"""Reports that say what differs between runs and where they came from (issue #13; #9 item 12):
the provenance header, the run-settings table, the comparability warnings, the per-run links,
and `moelab compare` refusing runs of different code."""

from __future__ import annotations

import json

import pytest
from analysis_fixtures import prov_record, write_run

from moelab.analysis import build_report, suites
from moelab.analysis.origin import check_same_code, mixed_code_message

MOE = {
    "model": {
        "ffn": {
            "kind": "moe",
            "router": "topk",
            "num_experts": 8,
            "top_k": 1,
            "granularity": 1,
            "shared_experts": 0,
        }
    },
    "optim": {"lr": 0.003},
    "data": {"path": None},
}


def _cfg(**ffn):
    return {**MOE, "model": {"ffn": {**MOE["model"]["ffn"], **ffn}}}


def test_settings_table_and_warnings_for_unmatched_runs(tmp_path):
    """Before #9.12 the report showed neither E, k, granularity, shared experts, lr, data nor
    tokens, and put runs with 30% more FLOPs, 3x the tokens or other data side by side."""
    root = tmp_path / "runs"
    a = write_run(
        root,
        "small",
        "topk",
        config=_cfg(),
        flops=3_800_000,
        provenance=[prov_record(data_sha256="a" * 64)],
    )
    b = write_run(
        root,
        "big",
        "topk",
        config=_cfg(num_experts=16, top_k=2, granularity=2, shared_experts=1),
        steps=600,
        flops=5_000_000,
        provenance=[prov_record(data_sha256="b" * 64)],
    )
    res = build_report([a, b], tmp_path / "rep", analyze=False, plots_enabled=False)
    md = res["markdown"].read_text()
    settings = md[md.index("## Run settings") : md.index("## Runs")]
    header = (
        "| run | seeds | method | E | k | granularity | shared experts | lr | steps | "
        "tokens seen | measured FLOPs/token | data |"
    )
    assert header in settings
    assert (
        "| small | 1 | topk | **8** | **1** | **1** | **0** | 0.003 | **200** | **205k** | "
        "**3.8M** | **embedded corpus (sha256 aaaaaaaaaaaa)** |" in settings
    )
    assert "| big | 1 | topk | **16** | **2** | **2** | **1** |" in settings
    warnings = md[md.index("## Warnings") : md.index("## Provenance")]
    assert "measured forward FLOPs per token differ by 32%" in warnings
    assert "tokens seen differ 3.0×" in warnings
    assert "different data (sha256 aaaaaaaaaaaa: small; sha256 bbbbbbbbbbbb: big)" in warnings
    assert len([w for w in res["warnings"] if "uncommitted" not in w]) == 3
    assert md.index("## Warnings") < md.index("## Runs")  # at the top, before any number
    assert 'class="diff"' in res["html"].read_text()


def test_matched_runs_have_no_warnings(tmp_path):
    root = tmp_path / "runs"
    p = [prov_record()]
    runs = [
        write_run(root, "a", "topk", config=_cfg(), provenance=p),
        write_run(root, "b", "topk", config=_cfg(), flops=2_080_000, steps=290, provenance=p),
    ]  # FLOPs +4%, tokens 1.45x: within the tolerances
    res = build_report(runs, tmp_path / "rep", analyze=False, plots_enabled=False)
    assert res["warnings"] == [] or all("uncommitted" in w for w in res["warnings"])
    assert "FLOPs per token differ" not in res["markdown"].read_text()


def test_a_run_started_from_other_weights_says_so(tmp_path):
    """A pruned (or upcycled, converted) run records its origin; the settings table gains a
    "from" column and a warning says its tokens seen do not count the source's training."""
    root = tmp_path / "runs"
    origin = {"command": "prune", "source": "/somewhere/demo", "checkpoint": "step_00000300"}
    runs = [
        write_run(root, "demo", "topk", config=_cfg(), provenance=[prov_record()]),
        write_run(
            root, "pruned", "topk", config=_cfg(), provenance=[prov_record() | {"origin": origin}]
        ),
    ]
    res = build_report(runs, tmp_path / "rep", analyze=False, plots_enabled=False)
    md = res["markdown"].read_text()
    assert "| run | seeds | from | method |" in md
    assert "| pruned | 1 | **prune of demo@step_00000300** |" in md
    assert "| demo | 1 | **–** |" in md
    assert any(
        "pruned started from other weights (prune of demo@step_00000300)" in w
        for w in res["warnings"]
    )
    plain = build_report(runs[:1], tmp_path / "rep1", analyze=False, plots_enabled=False)
    assert "| from |" not in plain["markdown"].read_text()  # no column when nothing is derived


def test_provenance_header_once_or_per_run(tmp_path):
    root = tmp_path / "runs"
    rec = prov_record(git_commit="c" * 40, git_dirty=False, cpu="CPU One", threads=1)
    same = [write_run(root, n, "dense", layers=0, provenance=[rec]) for n in ("a", "b")]
    md = build_report(same, tmp_path / "r1", analyze=False, plots_enabled=False)[
        "markdown"
    ].read_text()
    assert "| code (git commit) | cccccccccccc |" in md and "| CPU | CPU One |" in md
    assert "Provenance by run" not in md and "Bit for bit" in md
    other = write_run(
        root, "c", "dense", layers=0, provenance=[rec | {"cpu": "CPU Two", "threads": 2}]
    )
    md = build_report([*same, other], tmp_path / "r2", analyze=False, plots_enabled=False)[
        "markdown"
    ].read_text()
    assert "| CPU | **differs between runs (next table)** |" in md
    assert "| run | CPU | torch threads |" in md and "| c | **CPU Two** | **2** |" in md
    assert "Not bit for bit: the runs differ in cpu, threads" in md
    assert "MIXED CODE" not in md  # same commit: a different CPU is not different code


def test_resumed_run_shows_both_versions(tmp_path):
    rec = prov_record(git_commit="c" * 40, git_dirty=False)
    run = write_run(
        tmp_path,
        "r",
        "dense",
        layers=0,
        provenance=[rec, rec | {"git_commit": "d" * 40, "start_step": 100}],
    )
    prov = {"r": json.loads((run / "provenance.json").read_text())}
    assert "cccccccccccc: r; dddddddddddd: r" in mixed_code_message(prov)
    with pytest.raises(ValueError, match="trained by different code.*--allow-mixed"):
        check_same_code(prov, allow_mixed=False, where="x")


def test_per_run_links_point_at_metrics_lines(fake_runs, tmp_path):
    out = tmp_path / "rep"
    md = build_report([fake_runs["topk0"]], out, analyze=False, plots_enabled=False)[
        "markdown"
    ].read_text()
    lines = (fake_runs["topk0"] / "metrics.jsonl").read_text().splitlines()
    link = "../runs/topk-seed0/metrics.jsonl#L204"
    assert f"[3.1000 (line 204)]({link})" in md
    assert json.loads(lines[203]) == {**json.loads(lines[203]), "kind": "eval", "val_loss": 3.1}
    assert "[summary](../runs/topk-seed0/summary.json)" in md
    data = json.loads((out / "analysis.json").read_text())
    assert data["topk-seed0"]["path"] == "../runs/topk-seed0"  # no absolute path of this machine


def _fake_trainer(trained, commit_for=lambda p: None):
    def train(p: suites.PlannedRun) -> None:
        trained.append(p.run_dir.name)
        rec = prov_record(**({"git_commit": c} if (c := commit_for(p)) else {}))
        write_run(
            p.run_dir.parent,
            p.run_dir.name,
            p.group,
            steps=20,
            layers=0 if p.group == "dense" else 2,
            val_loss=3.0 + 0.1 * p.seed,
            provenance=[rec],
        )

    return train


def test_compare_refuses_mixed_code_unless_allowed(tmp_path):
    trained: list[str] = []
    other = _fake_trainer(trained, lambda p: "f" * 40 if p.group == "topk" else None)
    with pytest.raises(ValueError, match=r"different code \(.*ffffffffffff(\+dirty)?: topk-seed0"):
        suites.run_suite("paper-mini", tmp_path / "s", seeds=[0], trainer=other, log=lambda s: None)
    assert not (tmp_path / "s" / "report.md").exists()
    # the runs are there now, kept from another commit: refused before anything trains
    trained.clear()
    with pytest.raises(ValueError, match="different code"):
        suites.run_suite("paper-mini", tmp_path / "s", seeds=[0], trainer=other, log=lambda s: None)
    assert trained == []
    res = suites.run_suite(
        "paper-mini", tmp_path / "s", seeds=[0], trainer=other, allow_mixed=True, log=lambda s: None
    )
    md = res["markdown"].read_text()
    assert md.index("MIXED CODE VERSIONS") < md.index("## Provenance")
    assert "because --allow-mixed was given" in md
    record = json.loads((tmp_path / "s" / "suite.json").read_text())
    assert record["allow_mixed"] is True and any("MIXED" in w for w in record["warnings"])


def test_finished_suite_of_one_other_commit_is_reported_by_this_code(tmp_path):
    """Every run finished by one earlier commit: nothing trains, so this code (a newer report or
    analysis version) may report them; a run still to train would be refused."""
    trained: list[str] = []
    old = _fake_trainer(trained, lambda p: "e" * 40)
    suites.run_suite("paper-mini", tmp_path / "s", seeds=[0], trainer=old, log=lambda s: None)
    assert len(trained) == 4
    for run in (tmp_path / "s" / "runs").iterdir():  # the fake runs lack one: a started run
        (run / "config.yaml").touch()
    trained.clear()
    res = suites.run_suite("paper-mini", tmp_path / "s", seeds=[0], trainer=old, log=lambda s: None)
    assert trained == [] and "MIXED" not in res["markdown"].read_text()
    (tmp_path / "s" / "runs" / "dense-seed0" / "summary.json").unlink()  # one run to train
    with pytest.raises(ValueError, match="different code"):
        suites.run_suite("paper-mini", tmp_path / "s", seeds=[0], trainer=old, log=lambda s: None)
    assert trained == []


def test_suite_json_records_command_and_provenance(tmp_path):
    trained: list[str] = []
    suites.run_suite(
        "load-balance",
        tmp_path / "s",
        seeds=[3],
        steps=7,
        trainer=_fake_trainer(trained),
        command="moelab compare --suite x",
        log=lambda s: None,
    )
    record = json.loads((tmp_path / "s" / "suite.json").read_text())
    assert record["suite"] == "load-balance" and record["command"] == "moelab compare --suite x"
    assert record["steps"] == 7 and record["seeds"] == [3]
    assert record["runs"][0] | {"overrides": []} == {
        "name": "topk-balanced-seed3",
        "group": "topk-balanced",
        "seed": 3,
        "run_dir": "runs/topk-balanced-seed3",
        "preset": "topk-tiny",
        "overrides": [],
    }
    assert {"git_commit", "git_dirty", "torch", "cpu", "threads"} <= set(record["provenance"])
    assert record["train_seconds"] >= 0 and "finished" in record


def test_compare_refuses_kept_run_with_other_settings(tmp_path):
    """A suite resumed with other --steps would report runs of two settings as one."""
    import yaml

    from moelab.config import dump_yaml
    from moelab.train import resolve_run_config

    old = suites.plan_suite("load-balance", tmp_path, seeds=[0], steps=9)[0]
    config = yaml.safe_load(dump_yaml(resolve_run_config(old.preset, overrides=old.overrides)))
    write_run(old.run_dir.parent, old.run_dir.name, "topk", config=config)
    suites.check_kept_runs(suites.plan_suite("load-balance", tmp_path, seeds=[0], steps=9))
    plan = suites.plan_suite("load-balance", tmp_path, seeds=[0], steps=5)
    with pytest.raises(
        ValueError,
        match=r"topk-balanced-seed0: kept from an earlier run with "
        r"other settings \(.*train.steps: 9 there, 5 now",
    ):
        suites.check_kept_runs(plan)
