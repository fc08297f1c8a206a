"""``moelab bench offload --miss-precision``: the low-precision rows with their counters, budgets
too small for the copies shown refused, bad values one line before any model is built."""

from __future__ import annotations

import argparse
import json

import pytest

import moelab.model
from moelab.bench import offload as bench_offload

TINY = ["--experts", "8", "--top-k", "2", "--d-hidden", "64", "--tokens", "4", "--repeats", "1"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    bench_offload.add_arguments(parser)
    return parser.parse_args(argv)


def test_int8_rows_carry_the_counters_and_small_budgets_are_refused(tmp_path, capsys):
    pytest.importorskip("torchao")
    out = tmp_path / "rows.json"
    argv = TINY + ["--budgets", "10,60", "--policies", "lru", "--miss-precision", "int8"]
    args = parse(argv + ["--miss-threshold", "1.0", "--json", str(out)])
    assert bench_offload.run(args) == 0
    rows = {
        (r["budget"], r["policy"], r.get("miss_precision")): r for r in json.loads(out.read_text())
    }
    assert set(rows) == {
        ("loaded", "-", None),
        (10, "lru", None),
        (60, "lru", None),
        (60, "lru", "int8"),
        (10, "lru", "int8"),
    }
    assert "cannot hold the int8 copies" in rows[10, "lru", "int8"]["refused"]
    plain, low = rows[60, "lru", None], rows[60, "lru", "int8"]
    # threshold 1: every missed second expert runs from its copy; each one saves a full expert
    assert low["lowprec_hits"] > 0 and plain["lowprec_hits"] == 0
    d_model, d_hidden, layers = 128, 64, 4
    expert_mb = 4 * 3 * d_model * d_hidden / 1e6  # float32 w1, w3, w2
    assert low["saved_per_token_mb"] == pytest.approx(low["lowprec_hits"] * expert_mb / 4)
    assert low["lowprec_mb"] > 0 and low["lowprec_mb"] < 8 * layers * expert_mb
    assert plain["logit_max_abs_diff"] < 1e-4  # same experts, same outputs
    assert low["logit_max_abs_diff"] > plain["logit_max_abs_diff"]
    text = capsys.readouterr().out
    assert "int8: refused: --expert-memory:" in text and "logit diff" in text


def test_default_table_has_no_low_precision_columns(tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = parse(TINY + ["--budgets", "60", "--policies", "lru", "--json", str(out)])
    assert bench_offload.run(args) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all("miss_precision" not in r for r in rows)
    text = capsys.readouterr().out
    assert "logit diff" not in text
    if "O_DIRECT)" in text:  # aligned ranges: more bytes off the device than the experts' bytes
        assert rows[1]["disk_per_token_mb"] > rows[1]["read_per_token_mb"] > 0
        assert "O_DIRECT's aligned ranges took" in text
    else:  # O_DIRECT refused here: the buffered path asks the file for the experts' bytes
        assert rows[1]["disk_per_token_mb"] == rows[1]["read_per_token_mb"] > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--miss-precision", "int2"], "--miss-precision: must be one of int8, int4, got 'int2'"),
        (["--miss-precision", "int8", "--miss-threshold", "1.5"], "--miss-threshold: must be"),
        (["--miss-threshold", "0.3"], "--miss-threshold: needs --miss-precision"),
        (["--miss-precision", "int4", "--d-hidden", "344"], "--miss-precision: int4 needs a group"),
        (["--top-k", "9"], r"--top-k: must be in \[1, --experts=8\], got 9"),
        (["--read-workers", "0"], "--read-workers: must be an integer >= 1, got 0"),
    ],
)
def test_bad_values_are_one_line_before_any_model_is_built(monkeypatch, extra, message):
    if "int4" in extra:
        pytest.importorskip("torchao")

    def built(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(moelab.model, "TransformerLM", built)
    argv = ["--experts", "8", *extra]
    with pytest.raises(ValueError, match=message) as err:
        bench_offload.run(parse(argv))
    assert "\n" not in str(err.value)
