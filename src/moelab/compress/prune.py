"""Expert pruning: keep each MoE layer's most-used experts, drop the rest.

Usage is what the routers do on real tokens: a no-grad pass over validation batches counts, per
MoE block, the tokens routed to each expert (:func:`expert_usage`). :func:`prune_experts` keeps the
``keep`` most-used experts of every MoE block (each block its own; ties go to the lower index),
slicing the experts' weights and every per-expert row of the router, and returns a model whose
config says ``num_experts = keep / granularity``. This is frequency-based pruning, the simplest
of the expert-pruning criteria in the literature (Lu et al. 2024, "Not All Experts are Equal",
compare reconstruction-loss search; Muzio et al. 2024, SEER-MoE, use usage counts as here).

Each router slices its own per-expert state (:meth:`~moelab.layers.routers.Router.pruned_state`):
the gate's rows of the kept experts, plus what else it holds per expert (aux-loss-free balancing's
bias, MoE++'s gating-residual map, the rows of null and zero-computation experts, which are all
kept; a hash router keeps its hash and remaps its table). A router that does not declare
``prunable`` is refused before any work, with the reason (Lory: every token uses every expert).

What stays exact: where the router says so (:meth:`~moelab.layers.routers.Router.
prunes_exactly`), a token's choices and gates depend on the chosen experts alone, so dropping
experts that no token chose leaves every output unchanged: ReMoE's ReLU router (each gate is
``ReLU(x·w_e)``), TopK (and RMoE) with ``renormalize=True`` or ``softmax_after_topk``, AdaMoE's
null experts with ``renormalize``, aux-loss-free balancing with sigmoid scores, and hash routing
(for tokens whose experts were all kept). Anything else changes outputs (a softmax over all
experts loses the dropped ones' mass; a token whose choice was dropped takes its next-best kept
experts): evaluate the pruned run, and continue training it (``moelab train --resume``) to
recover.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from moelab.checkpoint_io import load_state
from moelab.eval.perplexity import eval_batches
from moelab.layers.moe import MoE
from moelab.layers.routers import require
from moelab.model import ModelConfig, TransformerLM
from moelab.model.ffn_configs import ROUTER_OPTION_FIELDS
from moelab.rundir import RunDir
from moelab.train import load_run, open_dataset, run_config_for, start_run

__all__ = ["expert_usage", "prune_experts", "prune_run"]


def _moe_blocks(model: TransformerLM) -> dict[int, MoE]:
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}


def check_prunable(model: TransformerLM, keep: int) -> None:
    """Refuse, naming the field and the allowed values, before any work."""
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError("model: no MoE layer to prune (model.ffn.kind must be 'moe')")
    ffn = model.cfg.ffn
    try:
        require(ffn.router, "prunable", ffn.router_kwargs())
    except ValueError as err:
        raise ValueError(f"model.ffn.router: {err}") from None
    if ffn.iterations != 1:
        raise ValueError(f"model.ffn.iterations: must be 1 to prune, got {ffn.iterations}")
    total, g, k = ffn.num_experts * ffn.granularity, ffn.granularity, ffn.top_k * ffn.granularity
    if not isinstance(keep, int) or isinstance(keep, bool) or not k <= keep <= total:
        raise ValueError(
            f"keep: must be an integer from top_k x granularity ({k}) to the routed experts "
            f"({total}), got {keep!r}"
        )
    if keep % g:
        raise ValueError(
            f"keep: must be a multiple of the granularity ({g}) so that the pruned model has "
            f"whole coarse experts, got {keep}"
        )


@torch.no_grad()
def expert_usage(model: TransformerLM, batches: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert of every MoE block (``{block: long [E]}``) over ``batches``
    of input ids, in evaluation mode (no aux losses, no controller update, nothing learnt)."""
    blocks = _moe_blocks(model)
    counts = {i: torch.zeros(moe.num_experts, dtype=torch.long) for i, moe in blocks.items()}
    was_training = model.training
    model.eval()
    try:
        for moe in blocks.values():
            moe.force_stats = True
        device = next(model.parameters()).device
        for ids in batches:
            model(ids.to(device))
            for i, moe in blocks.items():
                counts[i] += moe.last_stats.tokens_per_expert.cpu()
    finally:
        for moe in blocks.values():
            moe.force_stats = False
        model.train(was_training)
    return counts


def kept_experts(usage_E: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` most-used experts' ids, ascending (ties: the lower id), so the kept experts
    stay in their original order."""
    order = torch.argsort(-usage_E, stable=True)  # descending usage, lower id first on ties
    return order[:keep].sort().values


@torch.no_grad()
def prune_experts(
    model: TransformerLM, keep: int, usage: dict[int, torch.Tensor]
) -> tuple[TransformerLM, dict[int, list[int]]]:
    """A copy of ``model`` whose MoE blocks keep their ``keep`` most-used experts (by ``usage``,
    see :func:`expert_usage`); returns it and the kept expert ids per block."""
    check_prunable(model, keep)
    blocks = _moe_blocks(model)
    kept_ids: dict[int, torch.Tensor] = {}
    for i, moe in blocks.items():
        if i not in usage or usage[i].shape != (moe.num_experts,):
            raise ValueError(f"usage: needs a [{moe.num_experts}] count for MoE block {i}")
        kept_ids[i] = kept_experts(usage[i], keep)
    first = next(iter(blocks))
    options = blocks[first].router.pruned_options(kept_ids[first])  # the same in every block
    pruned = _build(_pruned_config(model.cfg, keep, options))
    source = model.state_dict()
    for i, moe in blocks.items():
        idx, prefix = kept_ids[i], f"blocks.{i}.ffn."
        for name, t in list(source.items()):
            if name.startswith(prefix + "router."):
                del source[name]  # replaced by the router's own pruned state below
            elif name.startswith(prefix + "experts.") and t.dim() and t.shape[0] == moe.num_experts:
                source[name] = t.index_select(0, idx.to(t.device))
        source |= {prefix + "router." + k: v for k, v in moe.router.pruned_state(idx).items()}
    pruned.load_state_dict(source)
    kept = {i: idx.tolist() for i, idx in kept_ids.items()}
    return pruned.train(model.training), kept


def _pruned_config(cfg: ModelConfig, keep: int, options: dict) -> ModelConfig:
    """``cfg`` with ``keep`` routed experts per block and the router's pruned ``options`` (those
    with a field of their own on the MoE config there, the others in ``router_options``)."""
    ffn = cfg.to_dict()["ffn"]
    ffn["num_experts"] = keep // cfg.ffn.granularity
    for name, value in options.items():
        if name in ROUTER_OPTION_FIELDS:
            ffn[name] = value
        else:
            ffn["router_options"] = ffn.get("router_options", {}) | {name: value}
    return ModelConfig.from_dict(cfg.to_dict() | {"ffn": ffn})


def _build(cfg: ModelConfig) -> TransformerLM:
    state = torch.random.get_rng_state()
    try:
        return TransformerLM(cfg)
    finally:
        torch.random.set_rng_state(state)  # building the model must not move the caller's RNG


def prune_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    keep: int,
    batches: int | None = 16,
    checkpoint: str | int | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
) -> tuple[Path, dict[int, list[int]], dict[int, torch.Tensor]]:
    """A run's checkpoint pruned to ``keep`` experts per MoE block, counting usage on
    ``batches`` validation batches of the run's own data; written as a new run in ``out_dir``
    with the source run's other settings (``overrides`` change data/optim/train/... fields).
    Returns the new checkpoint, the kept expert ids and the usage counts per block."""
    source = RunDir(run_dir).find_checkpoint(checkpoint)  # resolved once: weights, λ, origin
    model, config = load_run(run_dir, source)
    check_prunable(model, keep)  # before the usage pass (prune_experts checks again for callers)
    d = config.data
    windows = eval_batches(open_dataset(config), "val", d.seq_len, d.eval_batch_size, batches)
    usage = expert_usage(model, (b["input_ids"] for b in windows))
    pruned, kept = prune_experts(model, keep, usage)
    run_config = run_config_for(pruned, config.to_dict(), overrides)
    origin = {
        "command": "prune",
        "source": str(Path(run_dir).resolve()),
        "checkpoint": source.name,
        "keep": keep,
        "usage_batches": batches,
        "kept_experts": {str(block): ids for block, ids in kept.items()},
    }
    ckpt = start_run(
        pruned,
        run_config,
        out_dir,
        overwrite=overwrite,
        origin=origin,
        hook_states=_controller_state(source),
    )
    return ckpt, kept, usage


def _controller_state(checkpoint: Path) -> dict:
    """The checkpoint's ReMoE λ controller state (``{}`` when it has none): the pruned run
    continues with the trained λ (its target becomes 1 − k/E' for the fewer experts)."""
    try:
        state = load_state(checkpoint / RunDir.STATE)
    except (OSError, ValueError):
        return {}
    return {"controller": state["controller"]} if "controller" in state else {}
