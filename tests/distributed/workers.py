"""What each rank runs in the distributed tests (started by ``launcher.run_ranks``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist


def _init() -> None:
    dist.init_process_group("gloo")


def ep_layer(rank: int, world: int, *, cases: list[dict[str, Any]]) -> list[dict[str, float]]:
    """For each case: one MoE layer split over all ranks (ep = world) vs the same layer in one
    process; returns each case's largest differences (outputs, input gradients, every parameter
    gradient) and the gradients' scale."""
    _init()
    out = [_ep_layer_case(rank, world, **case) for case in cases]
    dist.destroy_process_group()
    return out


def _ep_layer_case(
    rank: int,
    world: int,
    *,
    router: str,
    tokens: list[int],
    num_experts: int = 8,
    top_k: int = 2,
    empty_experts: tuple[int, ...] = (),
    granularity: int = 1,
    shared_experts: int = 0,
) -> dict[str, Any]:
    """Rank r holds ``tokens[r]`` tokens (0: a rank with no tokens); ``empty_experts`` never
    receive a token (their router rows make their logits far below the others' and their ReLU
    outputs 0, for positive inputs)."""
    from moelab.distributed import apply_expert_parallel
    from moelab.layers import MoE

    D = 16
    torch.manual_seed(0)
    moe = MoE(
        D,
        32,
        num_experts,
        top_k,
        router=router,
        granularity=granularity,
        shared_experts=shared_experts,
    )
    with torch.no_grad():
        for e in empty_experts:
            moe.router.weight[e] = -1.0
    ref = copy.deepcopy(moe)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.rand(n, D, generator=gen) + 0.05 for n in tokens]
    ws = [torch.randn(n, D, generator=gen) for n in tokens]

    def loss_of(layer, x, w):
        y = layer(x)
        return y, (y * w).sum() + sum(v for v in layer.aux_losses.values())

    # one process: each rank's tokens are one forward (routing statistics are per forward)
    ref_grads, ref_y, ref_xgrad = [], [], []
    for x, w in zip(xs, ws, strict=True):
        ref.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y, loss = loss_of(ref, x, w)
        loss.backward()
        ref_y.append(y.detach())
        ref_xgrad.append(x.grad)
        ref_grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})

    sharded = apply_expert_parallel(moe, None, world, rank)
    x = xs[rank].clone().requires_grad_(True)
    y, loss = loss_of(moe, x, ws[rank])
    loss.backward()
    out = {
        "y": (y.detach() - ref_y[rank]).abs().max().item() if y.numel() else 0.0,
        "x_grad": (x.grad - ref_xgrad[rank]).abs().max().item() if y.numel() else 0.0,
        "tokens_per_expert": moe.last_stats.tokens_per_expert.tolist(),
        "local_rows": sum(moe.experts.w13_EDF2.shape[:1]),
        "scale": max(float(g.abs().max()) for gs in ref_grads for g in gs.values()),
    }
    for name, p in moe.named_parameters():
        if name in sharded:  # expert weights: every rank's tokens contributed
            lo, n = sharded[name].offset, p.shape[0]
            want = sum(g[name][lo : lo + n] for g in ref_grads)
        else:  # router, shared experts: this rank's tokens only (data parallelism averages)
            want = ref_grads[rank][name]
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = (got - want).abs().max().item()
    return out


def train_run(
    rank: int,
    world: int,
    *,
    config: dict,
    run_dir: str,
    resume: bool = False,
    stop_after: int | None = None,
    fail_at_step: int | None = None,
    fail_rank: int = 1,
    noisy_ranks: bool = False,
) -> dict[str, Any]:
    """``moelab.train`` on this rank (the Trainer sets up the process group from the
    environment, as under torchrun). Returns what the tests compare: rank 0's metrics, each
    rank's λ after every step and a digest of its replicated weights.

    ``fail_at_step``: rank ``fail_rank`` raises during that step (the launch must then end on
    every rank, through :func:`moelab.distributed.run_guarded`). ``noisy_ranks``: every forward
    draws ``rank + 1`` numbers from torch's RNG and scales the logits by them, so each rank's
    stream is its own and shows in the loss.
    """
    from moelab.distributed import run_guarded
    from moelab.rundir import RunDir
    from moelab.train import RunConfig, Trainer

    cfg = RunConfig.from_dict(config)
    lams: list[float] = []
    out: dict[str, Any] = {}

    if noisy_ranks:
        from moelab.model import TransformerLM

        forward = TransformerLM.forward

        def noisy(self, *args, **kwargs):
            logits = forward(self, *args, **kwargs)
            return logits * (1.0 + 1e-3 * torch.rand(rank + 1).sum().item())

        TransformerLM.forward = noisy  # type: ignore[method-assign]

    def command() -> int:
        trainer = Trainer(cfg, run_dir, resume=resume)
        step = trainer.train_step

        def recorded_step():
            if fail_at_step is not None and rank == fail_rank and trainer.step + 1 == fail_at_step:
                raise RuntimeError(f"injected failure at step {fail_at_step}")
            record = step()
            if trainer.controller is not None:
                lams.append(trainer.controller.lam)
            return record

        trainer.train_step = recorded_step
        evaluate = trainer.evaluate
        out["eval_forwards"] = []

        def counted_evaluate():  # forwards of the model per evaluation on this rank
            calls = []
            hook = trainer.model.register_forward_hook(lambda *_: calls.append(1))
            try:
                return evaluate()
            finally:
                hook.remove()
                out["eval_forwards"].append(len(calls))

        trainer.evaluate = counted_evaluate
        out["summary"] = trainer.run(stop_after=stop_after)
        sharded = trainer.parallel.sharded
        out["replicated"] = {
            n: p.detach().double().sum().item()
            for n, p in trainer.model.named_parameters()
            if n not in sharded
        }
        out["expert_rows"] = {  # rows of each expert tensor this rank keeps
            n: (p.to_local() if hasattr(p, "to_local") else p).shape[0]
            for n, p in trainer.model.named_parameters()
            if n in sharded
        }
        trainer.close()
        return 0

    run_guarded(command)
    out["lams"] = lams
    if rank == 0:
        out["metrics"] = RunDir(run_dir).read_metrics()
    return out


def cli(
    rank: int, world: int, *, argv: list[str], cwd: str | None = None, clock_skew_s: float = 0
) -> int:
    """``moelab`` on this rank, as ``torchrun -m moelab`` runs it (in ``cwd``); this rank's clock
    runs ``rank · clock_skew_s`` seconds late, as when ranks start in different seconds."""
    import os
    import time

    from moelab.cli import main

    if cwd is not None:
        os.chdir(cwd)
    if clock_skew_s:
        strftime, skew = time.strftime, rank * clock_skew_s
        time.strftime = lambda fmt, t=None: strftime(  # type: ignore[assignment]
            fmt, time.localtime(time.time() + skew) if t is None else t
        )
    return main(argv)


def clip_norm(rank: int, world: int, *, config: dict, max_norm: float) -> dict[str, float]:
    """The same gradients twice: whole in one process (``moelab.train.optim.clip_grad_norm_``)
    and split by this launch's layout (experts sliced, FSDP2 shards) through
    ``DataParallel.clip_grad_norm_``; returns both norms and the largest relative difference of
    the clipped gradients."""
    from moelab.distributed import setup_parallel
    from moelab.model import TransformerLM
    from moelab.train import RunConfig
    from moelab.train.optim import clip_grad_norm_

    cfg = RunConfig.from_dict(config)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model)
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    grads = {}
    for i, (name, p) in enumerate(ref.named_parameters()):
        g = torch.randn(p.shape, generator=gen) * 10.0 ** -(i % 4)
        g.view(-1)[0] = 1.0  # many small entries and a large one (cf. the lm_head's gradient)
        grads[name] = g
        p.grad = g.clone()
    want = float(clip_grad_norm_(ref.parameters(), max_norm))
    parallel = setup_parallel(cfg, torch.device("cpu"))
    parallel.parallelize(model)
    for name, p in model.named_parameters():
        g = grads[name]
        if name in parallel.sharded:
            lo = parallel.sharded[name].offset
            g = g[lo : lo + p.shape[0]]
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import distribute_tensor

            g = distribute_tensor(g, p.device_mesh, p.placements)
        p.grad = g.clone()
    got = parallel.clip_grad_norm_(model, max_norm, clip_grad_norm_)
    worst = 0.0
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        w = dict(ref.named_parameters())[name].grad
        if name in parallel.sharded:
            lo = parallel.sharded[name].offset
            w = w[lo : lo + p.shape[0]]
        worst = max(worst, float(((g - w).abs() / w.abs().clamp_min(1e-30)).max()))
    parallel.close()
    return {"got": got, "want": want, "clipped": worst}
