"""How a run made from another (``upcycle``, ``prune``/``compress``, ``convert-hf``) names its
source (and ``compress`` its calibration data) in provenance: relative to the new run when both
lie inside the working directory, so a results tree copied elsewhere still finds its sources;
absolute otherwise; and the source checkpoint's weights by sha256 (checked against ``hashlib``
over the file's bytes)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from moelab.compress import compress_run, prune_run
from moelab.config import ConfigError
from moelab.hf import upcycle_run
from moelab.provenance import source_path, source_reference, weights_sha256
from moelab.rundir import RunDir
from moelab.train import load_run, start_run, train
from run_fixtures import tiny_config


def test_source_reference_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere" / "run"
    project.mkdir()
    monkeypatch.chdir(project)
    out = project / "results" / "compress" / "runs" / "a"
    assert source_reference("results/paper/runs/s", out) == "../../../paper/runs/s"
    assert source_reference(project / "results" / "paper", "results/x") == "../paper"
    assert source_reference(elsewhere, out) == str(elsewhere.resolve())  # outside: absolute
    assert source_reference(project / "s", elsewhere) == str((project / "s").resolve())
    assert source_path(out, "../../../paper/runs/s").resolve() == (
        project / "results" / "paper" / "runs" / "s"
    )
    assert source_path(out, "/old/machine/run") == Path("/old/machine/run")  # older records


def test_weights_sha256_of_one_file_is_its_bytes_and_shards_count_their_names(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"first shard")
    b.write_bytes(b"second")
    assert weights_sha256([a]) == hashlib.sha256(b"first shard").hexdigest()
    both = hashlib.sha256(b"a.safetensorsfirst shardb.safetensorssecond").hexdigest()
    assert weights_sha256([b, a]) == both
    assert weights_sha256([tmp_path / "missing"]) is None


def test_upcycle_and_prune_record_portable_sources(tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_dir, "data")  # the project's own data: prune calibrates on it
    dense = Path("results/paper/runs/dense")
    train(tiny_config(Path("data"), train={"steps": 1, "eval_every": 0}), dense)
    moe = Path("results/upcycle/runs/moe")
    upcycle_run(dense, moe, num_experts=4, top_k=1)
    pruned = Path("results/compress/runs/pruned")
    prune_run(moe, pruned, keep=2, batches=1)

    for run, source in ((moe, dense), (pruned, moe)):
        origin = RunDir(run).provenance()[0]["origin"]
        weights = RunDir(source).latest_checkpoint() / RunDir.WEIGHTS
        assert origin["source"] == f"../../../{source.parent.parent.name}/runs/{source.name}"
        assert origin["source_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    calibration = RunDir(pruned).provenance()[0]["origin"]["calibration"]
    assert calibration.startswith("../../../../data (sha256 ")  # named as the source is

    with pytest.raises(
        ValueError, match=f"started from the weights of {(tmp_path / dense).resolve()} "
    ):
        compress_run(moe, "results/rc", "router_change", 0.5)  # the source named where it is

    shutil.copytree("results", "moved")  # another clone, another machine: the sources follow
    shutil.rmtree("results")
    origin = RunDir(Path("moved/compress/runs/pruned")).provenance()[0]["origin"]
    found = source_path(Path("moved/compress/runs/pruned"), origin["source"]).resolve()
    assert found == (tmp_path / "moved/upcycle/runs/moe").resolve()
    data = source_path(Path("moved/compress/runs/pruned"), calibration.split(" (sha256 ")[0])
    assert data.resolve() == (tmp_path / "data").resolve()
    assert RunDir(found).latest_checkpoint() is not None

    model, cfg = load_run(found)  # a relative source still guards the run it came from
    with pytest.raises(ConfigError, match="is the same directory as the source of its weights"):
        start_run(model, cfg, found, overwrite=True, origin={"source": "."})
