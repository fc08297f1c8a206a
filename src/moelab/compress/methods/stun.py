"""``--method stun``: expert pruning, then unstructured pruning inside the kept experts.

Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning" (ACL 2025,
arXiv 2409.06211). Stage 1 (structured): experts whose router rows are alike behave alike
(the paper's behavioural similarity, approximated from router weights with no forward pass), so
each MoE layer's experts are clustered by the L2 distance of their router rows (agglomerative,
average linkage) into as many clusters as experts are kept, and one expert per cluster stays:
the cluster's most-used one on the calibration tokens (ties: the lower id). Stage 2
(unstructured): Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large
Language Models", arXiv 2306.11695) inside each kept expert: weight ``W[j, o]`` (input j, output
o) scores ``|W[j, o]|·‖X_j‖₂`` over the tokens the expert receives (its input rows for the up
projections, its hidden activations for the down projection), and each output's lowest-scoring
inputs are zeroed; ``--unstructured magnitude`` scores ``|W|`` alone.

What differs from the paper: the paper's stage 1 also weighs a Taylor term and may reconstruct a
cluster's expert from its members ("selective reconstruction"); here the kept expert is the
cluster's most-used member, unchanged. ``--expert-ratio`` (the fraction of experts kept by stage
1; default ``√ratio``, splitting the compression between the stages, our choice) and ``--ratio``
(the fraction of expert parameters kept nonzero) fix stage 2's sparsity
``1 − ratio·E/E_kept`` per output. The zeros are real zeros in dense weights: parameters in the
provenance are nonzero parameters, bytes are the stored (dense) bytes.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from moelab.compress.methods._pruning import layer_inputs
from moelab.compress.methods.base import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    layer_changes,
    module_params,
    register_method,
)
from moelab.compress.prune import expert_usage, keep_for_ratio, moe_blocks, prune_to
from moelab.layers.dense import activate
from moelab.layers.moe import MoE
from moelab.model import TransformerLM

UNSTRUCTURED = ("wanda", "magnitude")


def router_clusters(rows_ED: torch.Tensor, clusters: int) -> list[list[int]]:
    """Agglomerative clustering (average linkage) of the rows by L2 distance into ``clusters``
    groups of expert ids (each sorted; merges of equal distance: the lower pair first)."""
    dist = torch.cdist(rows_ED.double(), rows_ED.double())
    groups = [[e] for e in range(rows_ED.shape[0])]
    while len(groups) > clusters:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                d = float(dist[groups[a]][:, groups[b]].mean())
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        groups[a] = sorted(groups[a] + groups.pop(b))
    return groups


@torch.no_grad()
def input_norms(layer: MoE, calls: list, scored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kept expert, the input-feature norms ``‖X_j‖₂`` Wanda scores with: ``[E, D]`` over
    the tokens routed to each expert, ``[E, F]`` over their hidden activations (ones where
    ``scored`` is False: magnitude pruning)."""
    experts = layer.experts
    w13, w2 = experts.w13_EDF2.detach(), experts.w2_EFD.detach()
    sq_ED = torch.zeros(w13.shape[0], w13.shape[1], dtype=torch.float64)
    sq_EF = torch.zeros(w2.shape[0], w2.shape[1], dtype=torch.float64)
    if not scored:
        return sq_ED + 1, sq_EF + 1
    for call in calls:
        x_TD = call.x.reshape(-1, layer.d_model)
        valid = None if call.token_mask is None else call.token_mask.reshape(-1).bool()
        decision = layer.router(x_TD, valid, call.context).decision
        for e in range(layer.num_experts):
            x_nD = x_TD[decision.token_idx_N[decision.expert_idx_N == e]].to(w13.dtype)
            if x_nD.shape[0]:
                h_nF = activate(x_nD @ w13[e], experts.activation)
                sq_ED[e] += x_nD.double().square().sum(0).cpu()
                sq_EF[e] += h_nF.double().square().sum(0).cpu()
    return sq_ED.sqrt(), sq_EF.sqrt()


def zero_lowest(w_EIO: torch.Tensor, norm_EI: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``w`` with, for each expert and output ``o``, the ``⌊sparsity·I⌋`` inputs of lowest
    ``|w[e, i, o]|·norm[e, i]`` set to 0 (ties: the lower input index goes first)."""
    n = int(sparsity * w_EIO.shape[1])
    if n == 0:
        return w_EIO.clone()
    score = w_EIO.abs().double() * norm_EI.to(w_EIO.device)[:, :, None]
    order = torch.argsort(score, dim=1, stable=True)[:, :n, :]
    out = w_EIO.clone()
    out.scatter_(1, order, 0.0)
    return out


@register_method
class Stun(CompressMethod):
    name = "stun"
    summary = (
        "expert pruning by router-row clustering, then Wanda unstructured pruning inside the "
        "kept experts (STUN, Lee et al. 2024); zeros in dense weights"
    )
    capability = "prunable"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--expert-ratio",
            type=float,
            default=None,
            help="stun: fraction of experts kept by the structured stage, in [ratio, 1] "
            "(default: the square root of --ratio)",
        )
        parser.add_argument(
            "--unstructured",
            choices=UNSTRUCTURED,
            default="wanda",
            help="stun: score of the unstructured stage (default wanda)",
        )

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        super().__init__(ratio, options)
        ratio = self.require_ratio()
        expert_ratio = self.options.get("expert_ratio")
        if expert_ratio is None:
            expert_ratio = math.sqrt(ratio)
        if isinstance(expert_ratio, bool) or not ratio <= expert_ratio <= 1:
            raise ValueError(
                f"--expert-ratio: must be a number from --ratio ({ratio}) to 1, "
                f"got {expert_ratio!r}"
            )
        if self.options.get("unstructured", "wanda") not in UNSTRUCTURED:
            raise ValueError(
                f"--unstructured: must be one of {', '.join(UNSTRUCTURED)}, "
                f"got {self.options.get('unstructured')!r}"
            )
        self.expert_ratio = float(expert_ratio)

    def keep(self, model: TransformerLM) -> int:
        total = model.cfg.ffn.num_experts * model.cfg.ffn.granularity
        if self.expert_ratio >= 1:
            return total
        return keep_for_ratio(model, self.expert_ratio)

    def check(self, model: TransformerLM) -> None:
        self.keep(model)

    @torch.no_grad()
    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        keep, ratio = self.keep(model), self.require_ratio()
        usage = expert_usage(model, calib.batches)
        kept, clusters = {}, {}
        for i, moe in moe_blocks(model).items():
            rows = moe.router.weight.detach()[moe.router.gate_rows(torch.arange(moe.num_experts))]
            clusters[i] = router_clusters(rows.cpu(), keep)
            best = [max(c, key=lambda e, u=usage[i]: (int(u[e]), -e)) for c in clusters[i]]
            kept[i] = torch.tensor(sorted(best))
        pruned = prune_to(model, kept).eval()
        total = moe_blocks(model)[next(iter(kept))].num_experts
        sparsity = max(0.0, 1.0 - ratio * total / keep)
        calls = layer_inputs(pruned, calib.batches)
        scored = self.options.get("unstructured", "wanda") == "wanda"
        for i, layer in moe_blocks(pruned).items():
            norm_ED, norm_EF = input_norms(layer, calls[i], scored)
            experts = layer.experts
            experts.w13_EDF2.copy_(zero_lowest(experts.w13_EDF2, norm_ED, sparsity))
            experts.w2_EFD.copy_(zero_lowest(experts.w2_EFD, norm_EF, sparsity))
        pruned.train(model.training)
        changes = layer_changes(
            model, pruned, params_after=lambda _, moe: module_params(moe, nonzero=True)
        )
        experts_before = [m.experts for m in moe_blocks(model).values()]
        experts_after = [m.experts for m in moe_blocks(pruned).values()]
        before = sum(p.numel() for e in experts_before for p in e.parameters())
        nonzero = sum(int(torch.count_nonzero(p)) for e in experts_after for p in e.parameters())
        details = {
            "keep": keep,
            "expert_ratio": self.expert_ratio,
            "unstructured": self.options.get("unstructured", "wanda"),
            "unstructured_sparsity": sparsity,
            "expert_params_nonzero_fraction": nonzero / before,
            "clusters": {str(i): c for i, c in clusters.items()},
            "kept_experts": {str(i): ids.tolist() for i, ids in kept.items()},
            "params": "nonzero parameters (the zeros are stored: bytes are dense)",
        }
        return CompressOutcome(pruned, changes, details)
