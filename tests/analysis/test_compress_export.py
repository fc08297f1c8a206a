"""The compress suite's export (``moelab.analysis.export.export_compress_suite``) copies the small
files of a suite directory, and the suite records its sources relative to the working directory."""

from __future__ import annotations

import json

import pytest

from moelab.analysis.export import COMPRESS_RECORD, export_compress_suite
from moelab.compress.suite import RECORD_FILE, shown_path


def test_export_copies_the_small_files_only(tmp_path) -> None:
    src, dest = tmp_path / "suite", tmp_path / "dest"
    files = {
        "compress_report.md": "# r",
        COMPRESS_RECORD: "{}",
        "img/a.png": "png",
        "rows/topk.json": "{}",
        "runs/topk-frequency-0.5/config.yaml": "a: 1",
        "runs/topk-frequency-0.5/provenance.json": "[]",
        "runs/topk-frequency-0.5/checkpoints/step_1/model.safetensors": "weights",
        "img/notes.txt": "not a plot",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    (dest).mkdir()
    (dest / "README.md").write_text("kept")
    written = export_compress_suite(src, dest)
    got = sorted(p.relative_to(dest).as_posix() for p in written)
    assert got == sorted(n for n in files if "checkpoints" not in n and not n.endswith(".txt"))
    assert (dest / "README.md").read_text() == "kept"
    with pytest.raises(ValueError, match="compress_suite.json: missing"):
        export_compress_suite(tmp_path / "empty", dest)


def test_record_names_agree_and_paths_are_relative(tmp_path, monkeypatch) -> None:
    assert COMPRESS_RECORD == RECORD_FILE
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert shown_path(tmp_path / "runs" / "a") == "runs/a"
    assert shown_path("runs/a") == "runs/a"
    outside = tmp_path.parent / "elsewhere"
    assert shown_path(outside) == str(outside.resolve())


def test_the_committed_record_names_no_absolute_path() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "docs" / "results" / "compress"
    record = json.loads((root / RECORD_FILE).read_text())
    assert all(not Path(s["run"]).is_absolute() for s in record["sources"].values())
    assert "--from runs/results/paper" in record["command"]
