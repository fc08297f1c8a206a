"""``moelab bench offload --run RUN_DIR``: a trained run's own model, prompted with its validation
split, decodes the loaded model's greedy tokens at a small budget (reference: ``generate`` on the
run loaded by ``load_run``, the prompt read straight from the split); with ``--miss-precision``
the NLL column equals a full-forward cross-entropy for the loaded and plain offloaded rows; the
options that shape only the random-init model are refused together with ``--run``."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from moelab.bench import offload as bench_offload
from moelab.data import TokenDataset
from moelab.model import generate
from moelab.train import load_run, train
from run_fixtures import data_dir, tiny_config  # noqa: F401

FFN = {"kind": "moe", "router": "topk", "num_experts": 8, "top_k": 2, "d_hidden": 32}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    bench_offload.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("bench_run") / "run"
    torch.manual_seed(0)
    train(tiny_config(data_dir, FFN, train={"steps": 3, "eval_every": 0}), run)
    return run


def bench(run, tmp_path, *extra: str) -> list[dict]:
    out = tmp_path / "rows.json"
    argv = ["--run", str(run), "--tokens", "6", "--prompt-len", "5", "--repeats", "1"]
    assert bench_offload.run(parse([*argv, "--json", str(out), *extra])) == 0
    return json.loads(out.read_text())


def test_run_path_feeds_the_validation_text_and_offloaded_predictions_equal_the_loaded(
    tiny_run,
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    rows = bench(tiny_run, tmp_path, "--budgets", "25", "--policies", "lru,prefetch")
    loaded, *offloaded = rows
    val = TokenDataset(data_dir).split("val")[:11].tolist()
    assert loaded["prompt"] == val[:5] and loaded["fed"] == val[5:]
    model, _ = load_run(tiny_run)
    with torch.no_grad():  # one full forward instead of the bench's KV-cache steps
        want = model(torch.tensor([val]))[0, 4:].argmax(-1).tolist()
    assert loaded["predicted"] == want
    assert [(r["budget"], r["policy"]) for r in offloaded] == [(25, "lru"), (25, "prefetch")]
    for r in offloaded:  # the bench itself raises if an offloaded run's predictions differ
        assert 0 <= r["hit_rate"] < 1 and r["read_per_token_mb"] > 0
        assert r["peak_over_budget"] <= 1
    assert "nll" not in loaded  # without --miss-precision: no quality columns
    out = capsys.readouterr().out
    assert f"run {tiny_run} (step_00000003), 8 experts/layer, k=2" in out
    assert "validation tokens fed (teacher-forced)" in out


def test_feed_greedy_decodes_the_loaded_runs_own_tokens(tiny_run, data_dir, tmp_path):  # noqa: F811
    rows = bench(tiny_run, tmp_path, "--budgets", "25", "--policies", "lru", "--feed", "greedy")
    prompt = TokenDataset(data_dir).split("val")[:5].tolist()
    model, _ = load_run(tiny_run)
    ref = generate(model, torch.tensor([prompt]), max_new_tokens=7, temperature=0)[0, 5:]
    assert rows[0]["fed"] == ref[:6].tolist() and rows[0]["predicted"] == ref.tolist()


def test_nll_column_equals_a_full_forward_for_loaded_and_plain_rows(tiny_run, tmp_path):
    pytest.importorskip("torchao")
    argv = ["--budgets", "60", "--policies", "lru", "--miss-precision", "int8"]
    rows = bench(tiny_run, tmp_path, *argv, "--miss-threshold", "1.0", "--nll-windows", "3")
    by_key = {(r["budget"], r.get("miss_precision")): r for r in rows}
    model, _ = load_run(tiny_run)
    windows = _val_windows(tiny_run, count=3, length=11)
    with torch.no_grad():
        logits = model(windows[:, :-1])[:, 4:].double()  # positions predicting tokens 5..10
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows[:, 5:].reshape(-1)
    )
    assert by_key["loaded", None]["nll"] == pytest.approx(float(ref), abs=1e-4)
    assert by_key["loaded", None]["nll_tokens"] == 3 * 6
    assert by_key[60, None]["nll"] == pytest.approx(by_key["loaded", None]["nll"], abs=1e-6)
    low = by_key[60, "int8"]
    assert low["lowprec_hits"] > 0 and low["nll"] != by_key[60, None]["nll"]
    assert low["nll_lowprec_hits"] > 0 and by_key[60, None]["nll_lowprec_hits"] == 0
    assert low["nll"] == pytest.approx(by_key[60, None]["nll"], abs=0.05)


def _val_windows(run, count: int, length: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of ``length`` tokens of the run's val split
    (``iter_eval_batches`` steps by ``length - 1``: its windows share their boundary token)."""
    from moelab.train import load_run_config

    tokens = TokenDataset(load_run_config(run).data.path).split("val")
    step = length - 1
    return torch.tensor([tokens[i * step : i * step + length].tolist() for i in range(count)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--experts", "8", "--top-k", "2"], "--experts, --top-k: shape the random-init model"),
        (["--d-hidden", "64"], "--d-hidden: shape the random-init model only"),
    ],
)
def test_random_init_options_are_refused_with_run_in_one_line(tmp_path, extra, message):
    missing = tmp_path / "no_such_run"  # refused before the run is even looked at
    with pytest.raises(ValueError, match=message) as err:
        bench_offload.run(parse(["--run", str(missing), *extra]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "3"], "--checkpoint: needs --run RUN_DIR"),
        (["--feed", "text"], "--feed: text needs --run RUN_DIR"),
    ],
)
def test_run_options_need_run(argv, message):
    with pytest.raises(ValueError, match=message):
        bench_offload.run(parse(argv))


def test_a_sharded_checkpoint_is_refused_by_the_bench_and_the_server(tiny_run, tmp_path):
    """One check (``serve.run.offload_source``) for both doors: no single file holds every
    expert of a checkpoint written by several processes."""
    from moelab.rundir import RunDir
    from moelab.serve import load_offloaded

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (RunDir(run).find_checkpoint(None) / RunDir.SHARDED).mkdir()
    with pytest.raises(ValueError, match="a sharded checkpoint") as err:
        bench_offload.run(parse(["--run", str(run)]))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="a sharded checkpoint"):
        load_offloaded(run, "50%")
