"""moelab compress's driver and command: registry and options, refusals before any file is
written, the written run (provenance, reload, eval, generate), and the source run left alone."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.compress import compress_run
from moelab.compress.methods import (
    CompressMethod,
    get_method,
    method_names,
    register_method,
)
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.train import load_run, start_run
from run_fixtures import REMOE, TOPK, tiny_config

PRUNING = ["frequency", "reconstruction", "router_change", "stun"]


def _run(root: Path, data_dir: Path, ffn: dict, name: str) -> Path:
    """A step-0 run of the tiny config with ``ffn`` (weights from the seeded init)."""
    config = tiny_config(data_dir, ffn=ffn)
    torch.manual_seed(0)
    start_run(TransformerLM(config.model), config, root / name)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compress_runs")
    peer = {"kind": "peer", "num_experts": 64, "heads": 2, "top_k": 4, "d_key": 8}
    ffns = {"topk": TOPK, "relu": REMOE, "dense": {"kind": "dense", "d_hidden": 32}, "peer": peer}
    return {name: _run(root, data_dir, ffn, name) for name, ffn in ffns.items()}


def _digest(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def test_the_pruning_methods_are_registered_and_discovered():
    assert set(PRUNING) <= set(method_names())
    assert method_names() == sorted(method_names())
    for name in PRUNING:
        cls = get_method(name)
        assert cls.name == name and cls.summary and cls.capability == "prunable"
    with pytest.raises(ValueError, match=r"--method: must be one of .*'frequency'.*got 'nope'"):
        get_method("nope")


def test_a_duplicate_method_name_is_refused():
    class Again(CompressMethod):
        name = "frequency"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Again)


def test_options_resolve_to_the_defaults_and_refuse_other_keys():
    cls = get_method("reconstruction")
    assert cls.resolve_options({}) == {"max_combinations": 5000}
    assert cls.resolve_options({"max_combinations": 7}) == {"max_combinations": 7}
    with pytest.raises(ValueError, match=r"options: 'keep' is not an option of method 're"):
        cls.resolve_options({"keep": 2})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "frequency", "--ratio", "0"], r"--ratio: .* in \(0, 1\), got 0.0"),
        (["--method", "frequency", "--ratio", "1"], r"--ratio: .* in \(0, 1\), got 1.0"),
        (["--method", "stun", "--ratio", "1.5"], r"--ratio: .* in \(0, 1\), got 1.5"),
        (
            ["--method", "frequency", "--ratio", "0.5", "--max-combinations", "3"],
            "--max-combinations: an option of --method reconstruction, not of --method frequency",
        ),
        (["--method", "frequency", "--keep", "2", "--ratio", "0.5"], "--keep: method 'freq"),
        (["--method", "stun"], "--ratio: method 'stun' needs the fraction"),
        (
            ["--method", "reconstruction", "--ratio", "0.5", "--calib-data", "/no/such/data"],
            "--calib-data: '/no/such/data' does not exist",
        ),
        (["--method", "frequency", "--keep", "1"], "keep: must be an integer from top_k"),
        (
            ["--method", "frequency", "--ratio", ".5", "--set", "model.d_model=8"],
            "model.d_model: the",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_file(runs, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["compress", str(runs["topk"]), str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moelab: error: ")
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["dense", "peer"])
def test_runs_without_routed_experts_are_refused_naming_what_applies(runs, tmp_path, capsys, kind):
    out = tmp_path / "out"
    assert main(["compress", str(runs[kind]), str(out), "--method", "stun", "--ratio", ".5"]) == 2
    err = capsys.readouterr().err
    assert f"model.ffn.kind: this run's FFN layers are '{kind}'" in err
    assert f"moelab compress --method {', '.join(method_names())}" in err
    assert not out.exists()


def test_an_unknown_method_is_refused(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", str(runs["topk"]), str(tmp_path / "o"), "--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--method: must be one of"):
        compress_run(runs["topk"], tmp_path / "o", "nope", 0.5)
    assert not (tmp_path / "o").exists()


def test_a_router_without_the_capability_is_refused(tmp_path, data_dir):
    lory = {"kind": "moe", "router": "lory", "num_experts": 4, "top_k": 1, "d_hidden": 32}
    run = _run(tmp_path, data_dir, lory | {"router_options": {"segment_len": 8}}, "lory")
    with pytest.raises(ValueError, match=r"^model.ffn.router: router 'lory' cannot be pruned"):
        compress_run(run, tmp_path / "o", "frequency", 0.5)
    assert not (tmp_path / "o").exists()


def test_missing_run_data_is_refused_before_any_file(tmp_path, data_dir):
    import shutil

    data = shutil.copytree(data_dir, tmp_path / "data")
    config = tiny_config(data, ffn=TOPK)
    torch.manual_seed(0)
    start_run(TransformerLM(config.model), config, tmp_path / "src")
    shutil.rmtree(data)
    with pytest.raises(ValueError, match=r"^--calib-data: method 'stun' needs calibration"):
        compress_run(tmp_path / "src", tmp_path / "o", "stun", 0.5)
    assert not (tmp_path / "o").exists()
    # without calibration the new run still needs data (its config names it): data.path=...
    with pytest.raises(ValueError, match=r"^data.path: .* does not exist"):
        compress_run(tmp_path / "src", tmp_path / "o", "router_change", 0.5)
    assert not (tmp_path / "o").exists()
    overrides = [f"data.path={data_dir}"]
    compress_run(tmp_path / "src", tmp_path / "o", "router_change", 0.5, overrides=overrides)
    assert RunDir(tmp_path / "o").holds_run


# two combinations by default (each ~3 s idle); all of them with -m slow
COMBINATIONS = [
    (m, r)
    if (m, r) in {("frequency", "topk"), ("stun", "relu")}
    else pytest.param(m, r, marks=pytest.mark.slow)
    for m in PRUNING
    for r in ("topk", "relu")
]


@pytest.mark.parametrize(("method", "router"), COMBINATIONS)
def test_each_pruning_method_writes_a_run_that_reloads_evaluates_and_generates(
    runs, tmp_path, capsys, data_dir, router, method
):
    source, out = runs[router], tmp_path / "out"
    before = _digest(source)
    argv = ["--method", method, "--ratio", "0.5", "--calib-batches", "2"]
    assert main(["compress", str(source), str(out), *argv]) == 0
    printed = capsys.readouterr().out
    assert "block 0: experts 4 -> " in printed and f"moelab train --resume {out}" in printed
    assert _digest(source) == before  # the source run is only read

    origin = RunDir(out).provenance()[0]["origin"]
    assert origin["method"] == method and origin["ratio"] == 0.5
    assert origin["source"] == str(source.resolve()) and origin["checkpoint"] == "step_00000000"
    assert origin["seed"] == 0 and origin["options"] == get_method(method).resolve_options({})
    calibration = origin["calibration"]
    if method == "router_change":
        assert calibration == "none"
    else:  # the tiny data lies outside the working directory: named by its absolute path
        assert calibration.startswith(f"{data_dir.resolve()} (sha256 ")
        assert "split 'train'" in calibration
    weights = RunDir(out).latest_checkpoint() / RunDir.WEIGHTS
    assert origin["weights_bytes"]["compressed"] == weights.stat().st_size
    assert origin["weights_bytes"]["compressed"] < origin["weights_bytes"]["source"] or (
        method == "stun"  # zeros are stored: fewer experts, but dense tensors
    )
    model, config = load_run(out)
    layers = [c for c in origin["layers"]]
    assert [c["experts_after"] for c in layers] == [model.cfg.ffn.num_experts] * 2
    assert main(["eval", str(out), "--max-batches", "1"]) == 0
    assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "3"]) == 0


def test_relu_runs_carry_lambda_with_the_target_of_the_new_expert_count(tmp_path, data_dir):
    from moelab.checkpoint_io import load_state
    from moelab.train import train

    train(tiny_config(data_dir, ffn=REMOE, train={"steps": 2}), tmp_path / "src")
    compress_run(tmp_path / "src", tmp_path / "out", "reconstruction", 0.75, calib_batches=1)

    def controller(run: Path) -> dict:
        return load_state(RunDir(run).latest_checkpoint() / RunDir.STATE)["controller"]

    source, new = controller(tmp_path / "src"), controller(tmp_path / "out")
    assert new["lam"] == source["lam"] != new["lambda0"]
    assert new["target"] == pytest.approx(1 - 1 / 3)  # 1 - k/E' for 3 kept of 4


def test_the_prune_command_is_frequency_under_its_short_name(runs, tmp_path):
    main(["prune", str(runs["topk"]), str(tmp_path / "p"), "--keep", "3", "--batches", "2"])
    argv = ["--method", "frequency", "--keep", "3", "--calib-batches", "2"]
    main(["compress", str(runs["topk"]), str(tmp_path / "c"), *argv])
    p, c = (RunDir(tmp_path / r).provenance()[0]["origin"] for r in ("p", "c"))
    assert p["command"] == "prune" and c["command"] == "compress"
    assert p["details"] == c["details"] and p["kept_experts"] == c["details"]["kept_experts"]
    a, b = (load_run(tmp_path / r)[0].state_dict() for r in ("p", "c"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_method_options_are_grouped_on_the_parser():
    from moelab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    help_text = sub.choices["compress"].format_help()
    for name in PRUNING:
        assert f"--method {name} options" in help_text


def test_a_compressed_run_is_analysed_before_it_trains(runs, tmp_path, capsys):
    """A step-0 run (config + checkpoint, no metrics yet) reads as a run: its routing analysis
    runs on the checkpoint, and stability says it needs a second one."""
    out = tmp_path / "c"
    argv = ["compress", str(runs["relu"]), str(out), "--method", "frequency", "--ratio", ".5"]
    assert main(argv) == 0
    capsys.readouterr()
    assert not RunDir(out).has_metrics
    assert main(["analyze", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expert" in printed and "stability: needs two checkpoints" in printed
