"""Evaluation: losses against an independent computation, per-domain consistency, no side effects
on routing state, generation with the KV cache, and the eval / generate commands."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moelab.cli import main
from moelab.data import TokenDataset, load_tokenizer
from moelab.eval import evaluate, generate_text
from moelab.model import decode_step
from moelab.rundir import RunDir
from moelab.train import Trainer, evaluate_run, train
from run_fixtures import REMOE, TOPK, tiny_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    import torch

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("eval_run") / "run"
    train(tiny_config(data_dir, ffn=TOPK, train={"steps": 3}), run)
    return run


def test_loss_matches_direct_computation_and_domains_average(data_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(data_dir)
    from moelab.model import TransformerLM

    model = TransformerLM(cfg.model)
    ds = TokenDataset(data_dir)
    out = evaluate(model, ds, seq_len=16, batch_size=3, max_batches=None)
    # independent reference: every full window of the val split, one at a time
    tokens = torch.from_numpy(ds.split("val").astype("int64"))
    domains = torch.from_numpy(ds.domain_ids("val").astype("int64"))
    n = (len(tokens) - 1) // 16
    losses, doms = [], []
    with torch.no_grad():
        for i in range(n):
            w = tokens[i * 16 : i * 16 + 17]
            logits = model(w[None, :-1])[0]
            losses.append(F.cross_entropy(logits, w[1:], reduction="none"))
            doms.append(domains[i * 16 + 1 : i * 16 + 17])
    loss_T, dom_T = torch.cat(losses).double(), torch.cat(doms)
    assert out["tokens"] == loss_T.numel() == n * 16
    assert out["val_loss"] == pytest.approx(float(loss_T.mean()), rel=1e-6)
    assert out["val_ppl"] == pytest.approx(float(loss_T.mean().exp()), rel=1e-6)
    assert set(out["val_loss_by_domain"]) == {"prose", "code"}
    for i, name in enumerate(ds.domains):
        assert out["val_loss_by_domain"][name] == pytest.approx(
            float(loss_T[dom_T == i].mean()), rel=1e-6
        )
    weighted = sum(
        out["val_loss_by_domain"][d] * out["tokens_by_domain"][d] for d in out["tokens_by_domain"]
    )
    assert weighted / out["tokens"] == pytest.approx(out["val_loss"], rel=1e-12)


def test_eval_does_not_touch_routing_state(tmp_path: Path, data_dir: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, ffn=REMOE), tmp_path / "run")
    trainer.train_step()
    layers = list(trainer.layers.values())
    before = [(layer.last_stats, dict(layer.aux_losses)) for layer in layers]
    ctrl = trainer.controller
    ctrl_state = copy.deepcopy(vars(ctrl))  # every attribute, private counters included
    assert trainer.model.training
    trainer.evaluate()
    assert trainer.model.training  # mode restored
    for layer, (stats, aux) in zip(layers, before, strict=True):
        assert layer.last_stats is stats  # no new statistics recorded by the eval forwards
        assert layer.aux_losses.keys() == aux.keys()
        assert all(layer.aux_losses[k] is aux[k] for k in aux)
    assert same(vars(ctrl), ctrl_state)


def same(a: object, b: object) -> bool:
    """Deep equality that also compares tensors (by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def test_generate_uses_kv_cache_and_matches_full_recompute(trained_run: Path) -> None:
    from moelab.train import load_run, run_tokenizer

    model, _ = load_run(trained_run)
    tok = run_tokenizer(trained_run)
    calls = {"cached": 0}
    original = model.forward

    def spy(ids, token_mask=None, kv_cache=None):
        calls["cached"] += kv_cache is not None
        return original(ids, token_mask=token_mask, kv_cache=kv_cache)

    model.forward = spy
    steps = {"fast": 0}
    fast_call = decode_step.FastStep.__call__

    def spy_step(self, next_B):  # noqa: ANN001, ANN202
        steps["fast"] += 1
        assert self.cache is not None and self.cache.length > 0  # decodes on the filled cache
        return fast_call(self, next_B)

    decode_step.FastStep.__call__ = spy_step
    try:
        text = generate_text(model, tok, "the quick", max_new_tokens=8, temperature=0.0)
    finally:
        decode_step.FastStep.__call__ = fast_call
    # the prompt fills the cache through the forward; each new token is then either one cached
    # forward (the general path) or one step of the decode step on the same cache
    assert calls["cached"] >= 1 and calls["cached"] + steps["fast"] >= 2
    model.forward = original
    # greedy reference without a cache: recompute the whole sequence for each new token
    ids = [tok.eos_id, *tok.encode("the quick")]
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
    assert text == tok.decode(ids[len(tok.encode("the quick")) + 1 :])
    with pytest.raises(ValueError, match="max_new_tokens: prompt"):
        generate_text(model, tok, "the quick", max_new_tokens=500)


def test_eval_and_generate_commands(trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(trained_run), "--max-batches", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == "step_00000003" and out["val_loss"] > 0
    assert set(out["val_loss_by_domain"]) <= {"prose", "code"}
    assert main(["eval", str(trained_run), "--max-batches", "1"]) == 0
    assert "ppl" in capsys.readouterr().out
    rc = main(["generate", str(trained_run), "--prompt", "def f", "--max-new-tokens", "5"])
    assert rc == 0 and capsys.readouterr().out.startswith("def f")


def test_eval_bad_input(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "is not a moelab run" in capsys.readouterr().err
    assert main(["eval", str(trained_run), "--data", str(tmp_path / "missing")]) == 2
    assert "--data: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="--max-batches: must be >= 1"):
        evaluate_run(trained_run, max_batches=0)


def test_tokenizer_mismatch_is_refused(trained_run: Path, tmp_path: Path) -> None:
    """A dataset prepared with another tokenizer cannot be scored by this run."""
    from moelab.data import prepare

    other_tok = tmp_path / "tok.json"
    src = json.loads(Path(load_tokenizer().path).read_text())
    src["model"]["merges"] = src["model"]["merges"][:-1]  # a different (but valid) tokenizer
    other_tok.write_text(json.dumps(src))
    docs = [json.dumps({"text": f"hello world {i} " * 20}) for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(docs) + "\n")
    out = prepare(
        tmp_path / "d.jsonl",
        tmp_path / "data",
        tokenizer=other_tok,
        format="jsonl",
        val_fraction=0.2,
        progress=False,
    )
    with pytest.raises(ValueError, match="--data: .* was tokenised with"):
        RunDir(trained_run).check_same_tokenizer(TokenDataset(out))


def test_max_batches_spreads_windows_over_every_domain(data_dir: Path) -> None:
    from moelab.eval.perplexity import eval_batches

    ds = TokenDataset(data_dir)
    batches = list(eval_batches(ds, "val", seq_len=16, batch_size=2, max_batches=2))
    assert len(batches) == 2
    seen = torch.cat([b["domain_ids"].flatten() for b in batches]).unique().tolist()
    assert sorted(seen) == [0, 1]  # a prefix of the split would hold the first domain only
    tokens = torch.from_numpy(ds.split("val").astype("int64"))
    for b in batches:
        for row_in, row_t in zip(b["input_ids"], b["targets"], strict=True):
            assert torch.equal(row_in[1:], row_t[:-1])
            start = int(row_in[0])  # windows are real slices of the split
            assert start in tokens.tolist()
