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

Other criteria choose the kept ids differently and slice the same way (:func:`prune_to`); they
are the pruning methods of ``moelab compress`` (:mod:`moelab.compress.methods`), of which this
one is ``frequency``. :func:`prune_run` (``moelab prune``) is that method's short name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from moelab.layers.base import RoutingObserver
from moelab.layers.moe import MoE
from moelab.layers.routers import require
from moelab.model import ModelConfig, TransformerLM
from moelab.model.ffn_configs import ROUTER_OPTION_FIELDS

__all__ = [
    "build_model",
    "calibration_forwards",
    "check_prunable",
    "config_with_ffn",
    "expert_usage",
    "keep_for_ratio",
    "kept_experts",
    "moe_blocks",
    "prune_experts",
    "prune_to",
    "pruned_layer",
    "sliced_layer_state",
]


def moe_blocks(model: TransformerLM) -> dict[int, MoE]:
    """The model's MoE layers by block index."""
    return {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}


def check_prunable(model: TransformerLM, keep: int, field: str = "keep") -> None:
    """Refuse, naming the field and the allowed values, before any work: a model without MoE
    layers, a router that cannot be pruned, and a ``keep`` the pruned config would refuse."""
    blocks = moe_blocks(model)
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
            f"{field}: must be an integer from top_k x granularity ({k}) to the routed experts "
            f"({total}), got {keep!r}"
        )
    if keep % g:
        raise ValueError(
            f"{field}: must be a multiple of the granularity ({g}) so that the pruned model has "
            f"whole coarse experts, got {keep}"
        )
    first = next(iter(blocks.values()))
    try:  # the router's own limits on its expert count (ReLU routing: k < E)
        _pruned_config(model.cfg, keep, first.router.pruned_options(torch.arange(keep)))
    except ValueError as err:
        raise ValueError(f"{field}: {keep} experts do not make a valid model ({err})") from None


def keep_for_ratio(model: TransformerLM, ratio: float) -> int:
    """Routed experts per MoE layer that keep at least ``ratio`` of the experts' parameters (all
    experts are the same size): ``ceil(ratio·E)`` rounded up to whole coarse experts. A ratio
    that keeps fewer than the router can take is refused (``--ratio``) with the smallest one."""
    ffn = model.cfg.ffn
    total, g = ffn.num_experts * ffn.granularity, ffn.granularity
    keep = math.ceil(round(ratio * total, 9) / g) * g
    try:
        check_prunable(model, keep, field="--ratio")
    except ValueError as err:
        if not str(err).startswith("--ratio"):
            raise
        lowest = next((n for n in range(keep + g, total + 1, g) if _keeps(model, n)), total)
        raise ValueError(
            f"--ratio: {ratio} keeps {keep} of {total} experts per layer, fewer than this model "
            f"can run with; the smallest ratio is {lowest / total:g} ({lowest} experts)"
        ) from None
    return keep


def _keeps(model: TransformerLM, keep: int) -> bool:
    try:
        check_prunable(model, keep)
    except ValueError:
        return False
    return True


@torch.no_grad()
def calibration_forwards(
    model: TransformerLM,
    batches: Iterable[torch.Tensor],
    observers: Mapping[int, RoutingObserver] | None = None,
    after_each: Callable[[], None] | None = None,
) -> None:
    """Run ``batches`` of input ids through ``model`` in evaluation mode (no aux losses, no
    controller update, nothing learnt), its training mode restored after: the calibration pass
    of every compression method. ``observers[i]`` watches MoE block ``i``'s routing meanwhile
    (its own observer put back after); ``after_each`` runs after every batch."""
    blocks = moe_blocks(model)
    observers = observers or {}
    saved = {i: blocks[i].routing_observer for i in observers}
    was_training = model.training
    model.eval()
    try:
        for i, observer in observers.items():
            blocks[i].routing_observer = observer
        device = next(model.parameters()).device
        for ids in batches:
            model(ids.to(device))
            if after_each is not None:
                after_each()
    finally:
        for i, observer in saved.items():
            blocks[i].routing_observer = observer
        model.train(was_training)


def expert_usage(model: TransformerLM, batches: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert of every MoE block (``{block: long [E]}``) over ``batches``
    of input ids, in evaluation mode (no aux losses, no controller update, nothing learnt)."""
    blocks = moe_blocks(model)
    counts = {i: torch.zeros(moe.num_experts, dtype=torch.long) for i, moe in blocks.items()}

    def count() -> None:
        for i, moe in blocks.items():
            counts[i] += moe.last_stats.tokens_per_expert.cpu()

    try:
        for moe in blocks.values():
            moe.force_stats = True
        calibration_forwards(model, batches, after_each=count)
    finally:
        for moe in blocks.values():
            moe.force_stats = False
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
    kept_ids: dict[int, torch.Tensor] = {}
    for i, moe in moe_blocks(model).items():
        if i not in usage or usage[i].shape != (moe.num_experts,):
            raise ValueError(f"usage: needs a [{moe.num_experts}] count for MoE block {i}")
        kept_ids[i] = kept_experts(usage[i], keep)
    pruned = prune_to(model, kept_ids)
    return pruned, {i: idx.tolist() for i, idx in kept_ids.items()}


@torch.no_grad()
def prune_to(model: TransformerLM, kept_ids: dict[int, torch.Tensor]) -> TransformerLM:
    """A copy of ``model`` whose MoE block ``i`` keeps the routed experts ``kept_ids[i]`` (the
    same number in every block: one config describes them all), in ascending order: the experts'
    weights and every per-expert row of the router (its own :meth:`~moelab.layers.routers.Router.
    pruned_state`) are sliced, everything else is copied."""
    blocks = moe_blocks(model)
    if set(kept_ids) != set(blocks) or len({len(v) for v in kept_ids.values()}) != 1:
        raise ValueError(
            f"kept_ids: needs the same number of kept experts for every MoE block {sorted(blocks)}"
        )
    kept_ids = {i: torch.as_tensor(v, dtype=torch.long).sort().values for i, v in kept_ids.items()}
    keep = len(next(iter(kept_ids.values())))
    check_prunable(model, keep)
    for i, idx in kept_ids.items():
        if len(set(idx.tolist())) != keep or not 0 <= int(idx.min()) <= int(idx.max()) < (
            blocks[i].num_experts
        ):
            raise ValueError(
                f"kept_ids[{i}]: must be distinct expert ids below "
                f"{blocks[i].num_experts}, got {idx.tolist()}"
            )
    first = next(iter(blocks))
    options = blocks[first].router.pruned_options(kept_ids[first])  # the same in every block
    pruned = build_model(_pruned_config(model.cfg, keep, options))
    source = model.state_dict()
    for i, moe in blocks.items():
        prefix = f"blocks.{i}.ffn."
        source = {k: v for k, v in source.items() if not k.startswith(prefix)}
        source |= {prefix + k: v for k, v in sliced_layer_state(moe, kept_ids[i]).items()}
    pruned.load_state_dict(source)
    return pruned.train(model.training)


def pruned_layer(model: TransformerLM, block: int, keep: int) -> MoE:
    """A fresh MoE layer of block ``block`` built for ``keep`` routed experts (load it with
    :func:`sliced_layer_state`): candidate layers of criteria that compare kept sets."""
    first = next(iter(moe_blocks(model).values()))
    cfg = _pruned_config(model.cfg, keep, first.router.pruned_options(torch.arange(keep)))
    with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
        return cfg.ffn_for(block).build(cfg.d_model, cfg.init_std)


def sliced_layer_state(moe: MoE, kept_K: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of MoE layer ``moe`` keeping only the routed experts ``kept_K``
    (ascending ids): what the same layer built for ``len(kept_K)`` experts loads. Per-expert
    tensors of the experts are sliced, the router slices its own state, the rest is copied."""
    state = {}
    for name, t in moe.state_dict().items():
        if name.startswith("router."):
            continue  # the router's own pruned state below
        if name.startswith("experts.") and t.dim() and t.shape[0] == moe.num_experts:
            t = t.index_select(0, kept_K.to(t.device))
        state[name] = t
    return state | {"router." + k: v for k, v in moe.router.pruned_state(kept_K).items()}


def config_with_ffn(cfg: ModelConfig, fields: dict, options: dict) -> ModelConfig:
    """``cfg`` with the MoE config's ``fields`` replaced and the router's ``options`` for its
    changed experts (those with a field of their own on the MoE config there, the others in
    ``router_options``)."""
    ffn = cfg.to_dict()["ffn"] | fields
    for name, value in options.items():
        if name in ROUTER_OPTION_FIELDS:
            ffn[name] = value
        else:
            ffn["router_options"] = ffn.get("router_options", {}) | {name: value}
    return ModelConfig.from_dict(cfg.to_dict() | {"ffn": ffn})


def _pruned_config(cfg: ModelConfig, keep: int, options: dict) -> ModelConfig:
    """``cfg`` with ``keep`` routed experts per block and the router's pruned ``options``."""
    return config_with_ffn(cfg, {"num_experts": keep // cfg.ffn.granularity}, options)


def build_model(cfg: ModelConfig) -> TransformerLM:
    """``TransformerLM(cfg)`` (its weights to be loaded) without moving the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        return TransformerLM(cfg)
