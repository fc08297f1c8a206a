"""``moelab export-hf``: a run exported, loaded by ``transformers``, gives moelab's logits and
greedy tokens, for every FFN kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.model import generate
from moelab.train import load_run, run_tokenizer, train
from run_fixtures import tiny_config

transformers = pytest.importorskip("transformers")

TOPK = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": 2, "d_hidden": 32}
FFNS = {
    "dense": {"kind": "dense", "d_hidden": 64},
    "topk": TOPK,
    "remoe": {
        "kind": "moe",
        "router": "relu",
        "num_experts": 4,
        "top_k": 1,
        "d_hidden": 32,
        "granularity": 2,
        "shared_experts": 1,
    },
    # a training capacity: moelab's eval mode is dropless, and so must the exported model be
    "topk-capacity": {**TOPK, "capacity_factor": 0.5},
    "topk-eval-capacity": {**TOPK, "capacity_factor": 0.5, "eval_capacity_factor": 0.5},
    "peer": {"kind": "peer", "num_experts": 64, "heads": 2, "top_k": 4, "d_key": 16},
    "pkm": {"kind": "pkm", "num_memories": 64, "heads": 2, "top_k": 4, "d_key": 16},
}


def make_run(root: Path, data_dir: Path, ffn: dict, **model) -> Path:
    """A 2-step tiny run (trained, so norms, routers and batch-norm statistics are not at init)."""
    cfg = tiny_config(
        data_dir,
        ffn,
        model={"n_kv_heads": 1, **model},
        train={"steps": 2, "eval_every": 0},
        checkpoint={"every": 0, "keep_last": 1},
    )
    run = root / "run"
    train(cfg, run)
    return run


@pytest.mark.parametrize("kind", list(FFNS))
def test_export_logits_and_greedy_generation_match_moelab(
    kind: str, tmp_path: Path, data_dir: Path
) -> None:
    run = make_run(tmp_path, data_dir, FFNS[kind], tie_embeddings=kind == "dense")
    out = tmp_path / "hf"
    assert main(["export-hf", str(run), str(out)]) == 0
    assert {"config.json", "model.safetensors", "modeling_moelab.py", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    model, _ = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    prompt = torch.tensor([tok("def f0_1(x):")["input_ids"]])
    tokens = run_tokenizer(run)
    assert prompt[0].tolist() == [tokens.eos_id, *tokens.encode("def f0_1(x):")]  # as in training
    assert tok.decode(prompt[0, 1:]) == "def f0_1(x):"
    expected = generate(model, prompt, max_new_tokens=8, temperature=0)
    got = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert got.tolist() == expected.tolist()


def test_export_bad_input_names_the_problem(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = make_run(tmp_path, data_dir, FFNS["dense"])
    out = tmp_path / "hf"
    assert main(["export-hf", str(run), str(out)]) == 0
    assert main(["export-hf", str(run), str(out)]) == 2  # not empty
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-hf", str(run), str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    shutil.rmtree(run / "checkpoints")
    assert main(["export-hf", str(run), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no weights to export" in err
    assert main(["export-hf", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    assert "not a moelab run" in capsys.readouterr().err


def test_export_refuses_a_router_it_cannot_reproduce(tmp_path: Path) -> None:
    from moelab.hf import export_model
    from moelab.layers.routers import ROUTERS, TopKRouter, register_router
    from moelab.model import ModelConfig, TransformerLM

    class OtherRouter(TopKRouter):
        name = "hf-export-test"

    if OtherRouter.name not in ROUTERS:
        register_router(OtherRouter)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=16,
        n_layers=1,
        n_heads=2,
        max_seq_len=16,
        ffn={"kind": "moe", "router": "hf-export-test", "num_experts": 2, "d_hidden": 16},
    )
    with pytest.raises(ValueError, match=r"\(block 0\): router 'hf-export-test' .*outside moelab"):
        export_model(TransformerLM(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_registered_auto_classes_load_an_export_without_remote_code(tmp_path: Path) -> None:
    from moelab.hf import export_model, register_auto_classes
    from moelab.model import ModelConfig, TransformerLM

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    model = TransformerLM(cfg).eval()
    export_model(model, tmp_path / "out")
    register_auto_classes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", trust_remote_code=False
    )
    assert type(hf).__module__ == "moelab.hf.modeling_moelab"
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids))


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path: Path) -> None:
    from moelab.hf import export_model
    from moelab.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=32,
        init_std=0.2,
        ffn={"kind": "moe", "num_experts": 4, "top_k": 2, "d_hidden": 32},
    )
    model = TransformerLM(cfg).eval()
    export_model(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    a, b = torch.randint(1, 64, (7,)), torch.randint(1, 64, (4,))
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = a, b
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    out = hf.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert out[0].tolist() == generate(model, a[None], 6, temperature=0)[0].tolist()
    assert out[1, 3:].tolist() == generate(model, b[None], 6, temperature=0)[0].tolist()
