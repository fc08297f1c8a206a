"""Data-parallel training on 2 ranks (gloo, processes started like torchrun does) against one
process on the same global batches.

Each rank trains on its half of every global batch (``BatchSampler(shard=...)``), so 2 ranks see
exactly the one-process batches. With losses that are linear in the tokens (LM loss, plain L1,
z-loss) 2 ranks equal one process without accumulation; losses defined per forward (the Switch
balance loss, ReMoE's load-balanced L1: statistics of one forward) equal one process whose
micro-batches are the ranks' halves (``data.micro_batch_size = batch_size / 2``), as in
Megatron-LM, where each data-parallel rank computes them on its own tokens.

Tolerance: DDP averages the two ranks' gradients, ``(g0 + g1) / 2``, where one process
accumulates ``g0/2 + g1/2``; the two differ by float rounding only, and over 4 AdamW steps of a
tiny model such differences stay below 1e-5 relative in the loss (measured: 0 to 5e-7).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from launcher import check_ok, run_ranks

from moelab.rundir import RunDir
from moelab.train import train
from run_fixtures import REMOE, TOPK, tiny_config

STEPS = 4
REL = 1e-5
PEER = {"kind": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "d_key": 16}
AUX_FREE = {**TOPK, "router": "aux_free", "router_options": {"bias_update_rate": 0.05}}


def one_process(
    data_dir: Path, run_dir: Path, ffn: dict, micro: int | None, batch: int = 4
) -> list[dict]:
    cfg = tiny_config(
        data_dir,
        ffn=ffn,
        data={"batch_size": batch, "micro_batch_size": micro},
        train={"steps": STEPS},
    )
    train(cfg, run_dir)
    return RunDir(run_dir).read_metrics("train")


def two_ranks(
    data_dir: Path, tmp: Path, ffn: dict, data: dict | None = None, **distributed
) -> list[dict]:
    cfg = tiny_config(
        data_dir,
        ffn=ffn,
        data=data or {"batch_size": 4},
        train={"steps": STEPS},
        distributed=distributed,
    )
    args = {"config": cfg.to_dict(), "run_dir": str(tmp / "run")}
    return check_ok(run_ranks(2, "train_run", args, tmp=tmp / "ranks"))


def assert_same_curve(got: list[dict], want: list[dict], rel: float = REL) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=rel), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), g["step"]
        assert g["tokens"] == w["tokens"]
        for name, value in w["aux"].items():
            assert g["aux"][name] == pytest.approx(value, rel=1e-4), (g["step"], name)
        # measured FLOPs: every rank's expert FLOPs, summed, over the global batch's tokens
        assert g["flops_total"] == pytest.approx(w["flops_total"], rel=1e-12), g["step"]
        for key, stats in w["layers"].items():  # the statistics of all ranks, summed
            assert g["layers"][key]["num_tokens"] == stats["num_tokens"]
            assert g["layers"][key]["expert_flops"] == stats["expert_flops"]
            if "tokens_per_expert" in stats:
                assert g["layers"][key]["tokens_per_expert"] == stats["tokens_per_expert"]


@pytest.mark.parametrize(
    ("ffn", "micro"),
    [
        ({"kind": "dense", "d_hidden": 64}, None),  # the same global batch in one forward
        ({**TOPK, "balance_coef": 0.0, "z_loss_coef": 1e-2}, None),
        (TOPK, 2),  # Switch balance loss: per forward, i.e. per rank
        (PEER, 2),  # sparse row gradients, all-gathered (DDP cannot reduce them)
        # balance_scope=global: f_e of the ranks' forwards summed, i.e. one forward of all 4
        ({**TOPK, "router_options": {"balance_scope": "global"}}, None),
        # aux-loss-free bias: updated from the step's loads summed over micro-batches and ranks
        pytest.param(AUX_FREE, 2, marks=pytest.mark.slow),
    ],
    ids=["dense", "topk-zloss", "topk-balance", "peer", "topk-global-balance", "aux-free"],
)
def test_two_ranks_match_one_process(
    ffn: dict, micro: int | None, tmp_path: Path, data_dir: Path
) -> None:
    want = one_process(data_dir, tmp_path / "one", ffn, micro)
    ranks = two_ranks(data_dir, tmp_path, ffn)
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "train"]
    assert_same_curve(got, want)
    assert ranks[0]["replicated"] == ranks[1]["replicated"]  # the ranks' weights stay identical


@pytest.mark.parametrize(
    ("ffn", "distributed"),
    [({"kind": "dense", "d_hidden": 64}, {}), (TOPK, {"expert_parallel": 2})],
    ids=["ddp", "expert-parallel"],
)
def test_ranks_share_the_evaluation_and_get_the_one_process_loss(
    ffn: dict, distributed: dict, tmp_path: Path, data_dir: Path
) -> None:
    """Each of 2 ranks scores half of the 5 validation batches (3 forwards each: the rank with 2
    repeats one unscored, without which the expert-parallel all-to-alls would hang); the sums over
    ranks give the one-process validation loss, per domain too."""
    data = {"batch_size": 4, "eval_max_batches": 5}
    one = data | {"micro_batch_size": 2}  # each rank's half is one forward (balance loss)
    cfg = tiny_config(data_dir, ffn=ffn, data=one, train={"steps": 2, "eval_every": 1})
    train(cfg, tmp_path / "one")
    want = RunDir(tmp_path / "one").read_metrics("eval")
    cfg2 = tiny_config(
        data_dir, ffn=ffn, data=data, train={"steps": 2, "eval_every": 1}, distributed=distributed
    )
    args = {"config": cfg2.to_dict(), "run_dir": str(tmp_path / "run")}
    ranks = check_ok(run_ranks(2, "train_run", args, tmp=tmp_path / "ranks"))
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "eval"]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert g["val_loss"] == pytest.approx(w["val_loss"], rel=REL)
        for name, loss in w["val_loss_by_domain"].items():
            assert g["val_loss_by_domain"][name] == pytest.approx(loss, rel=REL)
    assert ranks[0]["eval_forwards"] == ranks[1]["eval_forwards"] == [3, 3]


def test_lambda_identical_across_ranks(tmp_path: Path, data_dir: Path) -> None:
    """ReMoE's λ controller all-reduces the step's router counts: every rank applies the same
    update, bit for bit, and the same as one process on the same batches."""
    want = one_process(data_dir, tmp_path / "one", REMOE, 2)
    ranks = two_ranks(data_dir, tmp_path, REMOE)
    assert len(ranks[0]["lams"]) == STEPS
    assert ranks[0]["lams"] == ranks[1]["lams"]
    assert ranks[0]["lams"] == [r["lambda_next"] for r in want]
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "train"]
    assert [r["sparsity"] for r in got] == pytest.approx([r["sparsity"] for r in want], abs=0)
    assert_same_curve(got, want)


@pytest.mark.parametrize("ffn", [TOPK, REMOE], ids=["topk", "relu"])
def test_expert_parallel_training_matches_one_process(
    ffn: dict, tmp_path: Path, data_dir: Path
) -> None:
    """Experts split over the 2 ranks (each holds 2 of the 4): the same curve as one process.
    ReLU: 8 sequences a step, 2 micro-batches of 2 on each rank (gradient accumulation, the
    experts' gradients synchronised after the last)."""
    batch = 8 if ffn is REMOE else 4
    want = one_process(data_dir, tmp_path / "one", ffn, 2, batch=batch)
    data = {"batch_size": batch, "micro_batch_size": 2}
    ranks = two_ranks(data_dir, tmp_path, ffn, data=data, expert_parallel=2)
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "train"]
    assert_same_curve(got, want)
    assert ranks[0]["replicated"] == ranks[1]["replicated"]
    assert all(r["all_to_all_s"] >= 0 for r in got)
    if ffn is REMOE:
        assert ranks[0]["lams"] == ranks[1]["lams"] == [r["lambda_next"] for r in want]


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [{"expert_parallel": 2}, {"expert_parallel": 4}])
def test_four_ranks_match_one_process(distributed: dict, tmp_path: Path, data_dir: Path) -> None:
    """4 ranks of 1 sequence each; experts split in 2 groups of 2 ranks (each expert held by 2
    ranks, its gradient summed over them), or over all 4."""
    want = one_process(data_dir, tmp_path / "one", REMOE, 1)
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        data={"batch_size": 4},
        train={"steps": STEPS},
        distributed=distributed,
    )
    args = {"config": cfg.to_dict(), "run_dir": str(tmp_path / "run")}
    ranks = check_ok(run_ranks(4, "train_run", args, tmp=tmp_path / "ranks", timeout=300))
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "train"]
    assert_same_curve(got, want)
    assert all(r["replicated"] == ranks[0]["replicated"] for r in ranks)
    assert all(r["lams"] == ranks[0]["lams"] for r in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [1, 2])
def test_fsdp2_matches_one_process_across_a_resume(
    expert_parallel: int, tmp_path: Path, data_dir: Path
) -> None:
    """FSDP2 (weights, gradients and Adam state sharded; with expert parallelism the experts are
    split by it and left out of FSDP2), stopped after step 2 and resumed from its sharded
    checkpoint: the one-process curve."""
    want = one_process(data_dir, tmp_path / "one", REMOE, 2)
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        data={"batch_size": 4},
        train={"steps": STEPS},
        checkpoint={"every": 2},
        distributed={"data_parallel": "fsdp2", "expert_parallel": expert_parallel},
    )
    args = {"config": cfg.to_dict(), "run_dir": str(tmp_path / "run")}
    check_ok(run_ranks(2, "train_run", {**args, "stop_after": 2}, tmp=tmp_path / "a"))
    ranks = check_ok(run_ranks(2, "train_run", {**args, "resume": True}, tmp=tmp_path / "b"))
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "train"]
    assert_same_curve(got, want)
    assert ranks[0]["lams"] == ranks[1]["lams"]


@pytest.mark.slow
def test_fsdp2_shards_the_experts_over_their_copies(tmp_path: Path, data_dir: Path) -> None:
    """4 ranks, FSDP2 with expert_parallel 2: each block of 2 experts is held by 2 ranks (a mesh
    column), and FSDP2 shards it between them: a rank keeps 1 expert of each layer. The
    one-process curve (4 forwards of 1 sequence) across a stop and resume, and the checkpoint of
    step 2 resumes in one process to the same curve."""
    want = one_process(data_dir, tmp_path / "one", REMOE, 1)
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        data={"batch_size": 4},
        train={"steps": STEPS},
        checkpoint={"every": 2},
        distributed={"data_parallel": "fsdp2", "expert_parallel": 2},
    )
    run = tmp_path / "run"
    args = {"config": cfg.to_dict(), "run_dir": str(run)}
    first = check_ok(
        run_ranks(4, "train_run", {**args, "stop_after": 2}, tmp=tmp_path / "a", timeout=300)
    )
    for ranks in first:
        assert ranks["expert_rows"] and set(ranks["expert_rows"].values()) == {1}
    shutil.copytree(run, tmp_path / "copy")
    ranks = check_ok(run_ranks(4, "train_run", {**args, "resume": True}, tmp=tmp_path / "b"))
    got = [r for r in ranks[0]["metrics"] if r["kind"] == "train"]
    assert_same_curve(got, want)
    assert all(r["lams"] == ranks[0]["lams"] for r in ranks)
    one = tiny_config(
        data_dir, ffn=REMOE, data={"batch_size": 4, "micro_batch_size": 1}, train={"steps": STEPS}
    )
    train(one, tmp_path / "copy", resume=True)
    assert_same_curve(RunDir(tmp_path / "copy").read_metrics("train"), want)
