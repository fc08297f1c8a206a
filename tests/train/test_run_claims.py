"""Which directories a command may write (docs/training.md "Where a run may be written"): a new,
empty or recognised run directory only; --overwrite removes a run's files and nothing else; the
output is never the input; a prepared dataset is never a run; one writer at a time."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.config import ConfigError
from moelab.rundir import DirectoryLock, RunDir
from moelab.train import Trainer, load_run, start_run, train
from run_fixtures import TINY, tiny_config

SRC = Path(__file__).resolve().parents[2] / "src"


def snapshot(root: Path) -> dict[str, str]:
    """``relative path → sha256`` of every file under ``root`` (what "left intact" means)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def trained(path: Path, data_dir: Path, steps: int = 2) -> Path:
    train(tiny_config(data_dir, train={"steps": steps}, checkpoint={"every": 1}), path)
    return path


def test_a_prepared_dataset_is_never_a_run_dir(tmp_path: Path, data_dir: Path) -> None:
    data = tmp_path / "mine4"
    shutil.copytree(data_dir, data)
    before = snapshot(data)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"run_dir: .* is a prepared dataset \(meta.json\)"):
            Trainer(tiny_config(data_dir), data, overwrite=overwrite)
    assert snapshot(data) == before  # its tokenizer.json above all


def test_a_folder_of_other_files_is_refused(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "ideas.md").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"is not empty and does not hold a run .*notes/"):
            Trainer(tiny_config(data_dir), folder, overwrite=overwrite)
    assert snapshot(folder) == {"notes/ideas.md": hashlib.sha256(b"keep me").hexdigest()}


def test_overwrite_removes_only_a_runs_files(tmp_path: Path, data_dir: Path) -> None:
    run = trained(tmp_path / "run", data_dir)
    (run / "notes").mkdir()
    (run / "notes" / "todo.txt").write_text("mine")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"holds a run and also notes/.*nothing was removed"):
        Trainer(tiny_config(data_dir), run, overwrite=True)
    assert snapshot(run) == before
    shutil.rmtree(run / "notes")
    train(tiny_config(data_dir, train={"steps": 1}), run, overwrite=True)  # a run alone: replaced
    assert [p.name for p in RunDir(run).checkpoints()] == ["step_00000001"]
    assert {p.name for p in run.iterdir()} <= RunDir.ENTRIES


def test_new_empty_and_stale_locked_directories_are_accepted(
    tmp_path: Path, data_dir: Path
) -> None:
    cfg = tiny_config(data_dir, train={"steps": 1})
    train(cfg, tmp_path / "new" / "run")
    (tmp_path / "empty").mkdir()
    train(cfg, tmp_path / "empty")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / DirectoryLock.NAME).write_text("999999999\n")  # a killed writer's lock file
    train(cfg, stale)
    for run in (tmp_path / "new" / "run", tmp_path / "empty", stale):
        assert RunDir(run).has_summary and not (run / DirectoryLock.NAME).exists()


def test_a_failed_start_leaves_no_directory_behind(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, data={"path": str(tmp_path / "missing")})
    with pytest.raises(ValueError):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_hf_into_its_own_run_is_refused(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = trained(tmp_path / "run", data_dir)
    before = snapshot(run)
    assert main(["export-hf", str(run), str(run), "--overwrite"]) == 2
    assert "OUT_DIR: " in capsys.readouterr().err and snapshot(run) == before
    assert main(["export-hf", str(run / ".."), str(run.parent), "--overwrite"]) == 2
    assert snapshot(run) == before


def test_export_hf_overwrite_keeps_other_files(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = trained(tmp_path / "run", data_dir)
    out = tmp_path / "hf"
    assert main(["export-hf", str(run), str(out)]) == 0
    (out / "README.md").write_text("my model card")
    assert main(["export-hf", str(run), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "README.md" in err and err.count("\n") == 1
    assert (out / "README.md").read_text() == "my model card" and (out / "config.json").is_file()
    other_run = trained(tmp_path / "other", data_dir, steps=1)
    assert main(["export-hf", str(run), str(other_run), "--overwrite"]) == 2  # a run is not ours
    assert RunDir(other_run).has_summary


@pytest.mark.parametrize(
    ("argv", "fields"),
    [
        (["prune", "{run}", "{run}", "--keep", "1", "--overwrite"], ("OUT_RUN_DIR", "RUN_DIR")),
        (
            ["upcycle", "{run}", "{run}", "--num-experts", "2", "--top-k", "1", "--overwrite"],
            ("OUT_RUN_DIR", "RUN_DIR"),
        ),
        (["convert-hf", "{run}", "{run}", "--overwrite"], ("RUN_DIR", "HF_DIR")),
    ],
    ids=["prune", "upcycle", "convert-hf"],
)
def test_commands_never_write_over_their_source(
    argv: list[str],
    fields: tuple[str, str],
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """One line naming the output and the source as the command's usage line names them."""
    run = trained(tmp_path / "run", data_dir)
    before = snapshot(run)
    assert main([a.format(run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    output, source = fields
    assert f"{output}: '{run}' is the same directory as {source};" in err, err
    assert err.count("\n") == 1
    assert snapshot(run) == before


def test_start_run_refuses_its_own_source(tmp_path: Path, data_dir: Path) -> None:
    """The library path under prune/upcycle/convert-hf: the source is named in ``origin``."""
    run = trained(tmp_path / "run", data_dir)
    before = snapshot(run)
    model, cfg = load_run(run)
    with pytest.raises(ConfigError, match="is the same directory as the source of its weights"):
        start_run(model, cfg, run, overwrite=True, origin={"source": str(run.resolve())})
    assert snapshot(run) == before


HOLDER = textwrap.dedent(
    """
    import sys
    from moelab.rundir import RunDir
    lock = RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path: Path, data_dir: Path) -> None:
    run = trained(tmp_path / "run", data_dir)
    cfg = tiny_config(data_dir, train={"steps": 3})
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(ConfigError, match=rf"another process \(pid {holder.pid}\)"):
                Trainer(cfg, run, **kwargs)
        assert snapshot(run) == before
    finally:
        holder.communicate("\n", timeout=60)
    summary = train(cfg, run, resume=True)  # the holder is gone: the run is free again
    assert summary["steps"] == 3 and not (run / DirectoryLock.NAME).exists()


def test_two_resumes_at_once_one_is_refused(tmp_path: Path, data_dir: Path) -> None:
    """The CLI as a user runs it twice: the second ``train --resume`` exits 2 naming our pid."""
    run = trained(tmp_path / "run", data_dir)
    trainer = Trainer(tiny_config(data_dir, train={"steps": 3}), run, resume=True)  # holds it
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        second = subprocess.run(
            [sys.executable, "-m", "moelab", "train", "--resume", str(run), "train.steps=3"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        trainer.close()
    assert second.returncode == 2, second.stderr
    assert f"being written by another process (pid {os.getpid()})" in second.stderr
    assert second.stderr.count("\n") == 1


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    first = RunDir(tmp_path / "run").lock()
    second = RunDir(tmp_path / "run").lock()
    second.release()
    assert (tmp_path / "run" / DirectoryLock.NAME).read_text().strip() == str(os.getpid())
    first.release()
    assert not (tmp_path / "run" / DirectoryLock.NAME).exists()


def test_demo_says_it_replaces_a_run_and_refuses_other_files(
    tmp_path: Path, data_dir: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    import moelab.commands.train as train_command

    monkeypatch.setattr(train_command, "run_and_report", lambda trainer, run_dir: None)
    run = trained(tmp_path / "demo", data_dir)
    args = ["demo", "--run-dir", str(run), *TINY, f"data.path={data_dir}"]
    assert main(args) == 130  # stops where training would start
    assert f"demo: replacing the earlier run in {run}" in capsys.readouterr().out
    (run / "notes").mkdir()
    assert main(args) == 2
    assert "notes/" in capsys.readouterr().err and (run / "notes").is_dir()
    assert RunDir(run).holds_run
