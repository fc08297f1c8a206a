"""``moelab bench moe --configs routers``: every registered router runs as a model would call it
(batches of sequences with token ids) and gets a row; no timing assertions."""

from __future__ import annotations

import json

from moelab.cli import main
from moelab.layers.routers import ROUTERS

TINY = ["--d-model", "16", "--d-hidden", "64", "--tokens", "64", "--repeats", "1", "--threads", "1"]


def test_every_router_gets_a_row(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert main(["bench", "moe", "--configs", "routers", *TINY, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["layer"] for r in rows] == ["dense FFN", *ROUTERS]
    for r in rows[1:]:
        assert r["ms"] > 0 and r["config"] == "routers"
        assert f"\nrouters            {r['layer']} " in table
    by = {r["layer"]: r for r in rows}
    for name, cls in ROUTERS.items():  # a k > 1 method runs k·E experts of width 1/k
        assert by[name]["experts"] == 8 * cls.example_top_k
    assert by["topk"]["top_k"] == 1.0  # one coarse expert's width per token
    assert by["sparsemixer"]["experts"] == 16 and by["sparsemixer"]["top_k"] == 1.0
    assert by["lory"]["top_k"] == 8.0  # every expert merged


def test_an_unknown_router_is_named(capsys):
    assert main(["bench", "moe", "--configs", "routers", "--routers", "nope", *TINY]) == 2
    assert "--routers: unknown ['nope']; registered: topk, relu" in capsys.readouterr().err
