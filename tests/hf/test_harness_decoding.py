"""``moelab lm-eval --decoding``: bad combinations refused in one line before any work (these run
without the lm-eval package, on a stand-in), and a run scored under a neutral MoE-aware decoding
gives plain decoding's log-likelihoods and accuracy (these need lm-eval; the accuracy through a
whole lm-eval run is marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_harness_offline import fake_lm_eval

from moelab.cli import main
from moelab.train import load_run, run_tokenizer, train
from run_fixtures import tiny_config

TOPK2 = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": 2, "d_hidden": 32}
RELU = {"kind": "moe", "router": "relu", "num_experts": 4, "top_k": 1, "d_hidden": 32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict[str, Path]:
    out = {}
    for name, ffn in (("topk2", TOPK2), ("relu", RELU)):
        out[name] = tmp_path_factory.mktemp("runs") / name
        train(tiny_config(data_dir, ffn, train={"steps": 1, "eval_every": 0}), out[name])
    return out


@pytest.mark.parametrize(
    ("which", "extra", "message"),
    [
        ("relu", ["--decoding", "scmoe"], "--decoding scmoe: router 'relu' cannot route"),
        ("topk2", ["--decoding", "beam"], "--decoding must be one of plain, scmoe, reroute"),
        ("topk2", ["--decoding", "scmoe", "--scmoe-alpha", "2"], "--scmoe-alpha must be in"),
        ("topk2", ["--decoding", "reroute", "--reroute-lr", "0"], "--reroute-lr must be > 0"),
        ("export", ["--decoding", "reroute"], "--decoding reroute: "),
    ],
)
def test_bad_decoding_combinations_are_one_line_before_any_work(
    runs, tmp_path, monkeypatch, capsys, which, extra, message
) -> None:
    calls = fake_lm_eval(monkeypatch)
    if which == "export":
        path = tmp_path / "export"
        path.mkdir()
        (path / "config.json").write_text("{}")  # an export-hf folder
    else:
        path = runs[which]
    capsys.readouterr()
    tasks = tmp_path / "tasks"  # the cloze task is written only after the checks pass
    assert main(["lm-eval", str(path), "--task-dir", str(tasks), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moelab: error: {message}")
    if which == "export":
        assert "lm-eval's hf model with plain decoding only" in err
    assert calls == [] and not tasks.exists()


def test_neutral_decodings_score_like_plain(runs) -> None:
    pytest.importorskip("lm_eval")
    from moelab.hf.harness import make_lm

    model, _ = load_run(runs["topk2"])
    tok = run_tokenizer(runs["topk2"])
    plain = make_lm(model, tok)
    neutral = [
        make_lm(model, tok, "scmoe", {"scmoe_alpha": 0.0, "scmoe_beta": 0.0}),
        make_lm(model, tok, "reroute", {"reroute_steps": 0}),
    ]
    for context, continuation in [("The cat", " sat down"), ("", "Hello"), ("a b c", " d")]:
        ctx, cont = tok.encode(context), tok.encode(continuation)
        want = plain._score(ctx, cont)
        for lm in neutral:
            got = lm._score(ctx, cont)
            assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == want[1]


@pytest.mark.slow
def test_neutral_scmoe_gives_plain_accuracy_through_lm_eval(runs, capsys) -> None:
    pytest.importorskip("lm_eval")
    args = ["lm-eval", str(runs["topk2"]), "--items", "20", "--json"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)["moelab_cloze"]
    assert main([*args, "--decoding", "scmoe", "--scmoe-alpha", "0", "--scmoe-beta", "0"]) == 0
    got = json.loads(capsys.readouterr().out)["moelab_cloze"]
    assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"])


@pytest.mark.parametrize(
    ("decoding", "options"),
    [
        ("scmoe", {"scmoe_alpha": 1e-3, "scmoe_beta": 0.7}),
        ("reroute", {"reroute_steps": 2, "reroute_lr": 0.5, "reroute_interval": 64}),
    ],
)
def test_answer_choices_share_their_context_and_score_as_alone(
    runs, monkeypatch, decoding, options
) -> None:
    """lm-eval's requests of two 3-choice questions, interleaved: each scored exactly as alone,
    in lm-eval's order, and (rerouting) the context adapted once per question, not per choice."""
    pytest.importorskip("lm_eval")
    import moelab.eval.decoding as decoding_module
    from moelab.hf.harness import make_lm

    model, _ = load_run(runs["topk2"])
    tok = run_tokenizer(runs["topk2"])
    lm = make_lm(model, tok, decoding, options)
    eot = lm.eot_token_id
    questions = [
        ("The cat sat on the", [" mat", " old red chair", " dog"]),
        ("a b c", [" d", " e f"]),
    ]
    requests = [
        (None, [eot, *tok.encode(context)], tok.encode(choice))
        for k in range(3)
        for context, choices in questions
        if k < len(choices)
        for choice in [choices[k]]
    ]
    alone = [lm._score(ctx[1:], cont) for _, ctx, cont in requests]
    calls = []
    real = decoding_module.reroute_step
    monkeypatch.setattr(
        decoding_module, "reroute_step", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    assert lm._loglikelihood_tokens(requests) == alone
    if decoding == "reroute":
        assert len(calls) == 2 * len(questions)  # 2 steps per context, none per choice
