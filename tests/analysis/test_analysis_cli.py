"""The report / analyze / compare commands, and suites as data (training replaced by fixtures)."""

from __future__ import annotations

import json

import pytest
from analysis_fixtures import write_run

from moelab.analysis import suites
from moelab.cli import main
from moelab.rundir import RunDir


def test_report_command(fake_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", *map(str, fake_runs.values()), "-o", str(out), "--no-plots"]) == 0
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "wrote" in capsys.readouterr().out


def test_report_command_bad_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: not a run directory" in err


def test_analyze_dynamics_command(fake_runs, capsys, tmp_path):
    assert (
        main(
            [
                "analyze",
                str(fake_runs["remoe"]),
                "--what",
                "dynamics",
                "--plots",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "settled at step 96" in text and "0.8749" in text
    assert (tmp_path / "p" / "dynamics_remoe-seed0.png").is_file()
    assert main(["analyze", str(fake_runs["remoe"]), "--what", "dynamics", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"]["dynamics"]["stages"]["dense_end"] == 45


def test_analyze_needs_checkpoint_for_per_token(fake_runs, capsys):
    assert main(["analyze", str(fake_runs["topk0"]), "--what", "load"]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_suites_are_data():
    for name, suite in suites.SUITES.items():
        assert set(suite) >= {"description", "seeds", "runs"}, name
        for spec in suite["runs"].values():
            assert isinstance(spec["preset"], str) and isinstance(spec["overrides"], list)
    assert set(suites.SUITES["paper-mini"]["runs"]) == {"dense", "topk", "remoe", "peer"}
    assert suites.SUITES["paper-mini"]["seeds"] == [0, 1, 2]
    es = suites.SUITES["experts-scaling"]["runs"]
    assert {"topk-E4", "remoe-E32"} <= set(es) and len(es) == 8
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        suites.get_suite("nope")


def test_plan_suite(tmp_path):
    plan = suites.plan_suite("paper-mini", tmp_path, seeds=[3], steps=2, extra_overrides=["a=1"])
    assert [p.group for p in plan] == ["dense", "topk", "remoe", "peer"]
    assert plan[1].run_dir == tmp_path / "runs" / "topk-seed3"
    assert plan[1].overrides == (
        "train.steps=250",
        "train.steps=2",
        "a=1",
        "train.seed=3",
        "data.seed=3",
    )
    with pytest.raises(ValueError, match="seeds"):
        suites.plan_suite("paper-mini", tmp_path, seeds=[])
    with pytest.raises(ValueError, match="steps"):
        suites.plan_suite("paper-mini", tmp_path, steps=0)


def test_run_suite_with_fake_trainer_resumes(tmp_path):
    trained: list[str] = []

    def fake_trainer(p: suites.PlannedRun) -> None:
        trained.append(p.run_dir.name)
        method = p.group
        write_run(
            p.run_dir.parent,
            p.run_dir.name,
            method,
            steps=20,
            layers=0 if method == "dense" else 2,
            val_loss=3.0 + 0.1 * p.seed,
        )

    out = tmp_path / "suite"
    res = suites.run_suite(
        "paper-mini", out, seeds=[0, 1], trainer=fake_trainer, log=lambda s: None
    )
    assert len(trained) == 8
    md = res["markdown"].read_text()
    assert "| topk | topk | 2 |" in md and "3.0500 ± 0.0707" in md  # sample SD (ddof=1)
    assert json.loads((out / "suite.json").read_text())["seeds"] == [0, 1]
    trained.clear()
    suites.run_suite("paper-mini", out, seeds=[0, 1], trainer=fake_trainer, log=lambda s: None)
    assert trained == []  # finished runs are kept


def test_run_suite_trains_runs_in_parallel_processes(tmp_path, monkeypatch):
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    def fake_subprocess(p: suites.PlannedRun, log_dir) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        write_run(
            p.run_dir.parent,
            p.run_dir.name,
            p.group,
            steps=20,
            layers=0 if p.group == "dense" else 2,
            val_loss=3.0,
        )
        with lock:
            running[0] -= 1

    monkeypatch.setattr(suites, "train_in_subprocess", fake_subprocess)
    res = suites.run_suite("paper-mini", tmp_path / "s", seeds=[0], jobs=2, log=lambda s: None)
    assert peak[0] == 2 and res["markdown"].is_file()
    with pytest.raises(ValueError, match="jobs: must be an integer >= 1"):
        suites.run_suite("paper-mini", tmp_path / "s", jobs=0)


def test_a_run_in_a_subprocess_gets_its_preset_overrides_and_resume(tmp_path, monkeypatch):
    calls = []

    class Done:
        returncode = 0

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr(suites.subprocess, "run", fake_run)
    (plan,) = [p for p in suites.plan_suite("paper-mini", tmp_path, seeds=[1]) if p.group == "topk"]
    suites.train_in_subprocess(plan, tmp_path / "logs")
    assert calls[-1][3:] == [
        "train",
        "--preset",
        "topk-tiny",
        "--run-dir",
        str(plan.run_dir),
        *plan.overrides,
    ]
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / RunDir.CONFIG).write_text("{}\n")  # started, no checkpoint yet
    Done.returncode = 3
    with pytest.raises(RuntimeError, match="topk-seed1: training failed \\(exit 3\\), see .*log"):
        suites.train_in_subprocess(plan, tmp_path / "logs")
    assert calls[-1][-1] == "--overwrite"  # started, but no checkpoint to resume from
