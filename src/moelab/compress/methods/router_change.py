"""``--method router_change``: prune the experts whose router row moved least in training.

Chowdhury et al., "A Provably Effective Method for Pruning Experts in Fine-tuned Sparse
Mixture-of-Experts" (ICML 2024, arXiv 2405.16646): after fine-tuning, rank the experts of each
MoE layer by the change of their router weight row, ``‖w_e^(fine-tuned) − w_e^(pre-trained)‖₂``,
and prune those with the smallest change (the paper proves that for a fine-tuned binary
classification task the experts whose router row barely moved are the task-irrelevant ones).
Here "pre-trained → fine-tuned" is an earlier checkpoint of the run → the chosen checkpoint:
``--reference-checkpoint`` (step number or ``step_*`` name), by default the earliest kept
checkpoint before the chosen one, else the run's step-0 initialisation regenerated from its
``train.seed`` (the trainer's own ``torch.manual_seed(seed)`` then ``TransformerLM(cfg)``); the
provenance says which. A run that started from other weights (convert-hf, upcycle, prune,
compress) with no earlier checkpoint kept is refused: its init is not its start. Needs no
calibration tokens. The kept experts' router rows are sliced by the router itself; the router
normalises over the kept experts as it does over all (nothing is renormalised beyond that, as in
the paper, which drops the pruned experts' rows).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from moelab.compress.methods._pruning import ranked_keep
from moelab.compress.methods.base import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    SourceRun,
    layer_changes,
    register_method,
)
from moelab.compress.prune import keep_for_ratio, moe_blocks, prune_to
from moelab.model import TransformerLM
from moelab.provenance import source_path
from moelab.rundir import RunDir
from moelab.train.config import RunConfig


def router_change(model: TransformerLM, reference: TransformerLM) -> dict[int, torch.Tensor]:
    """Per MoE block, ``‖w_e − w_e^ref‖₂`` of each routed expert's router row (float64)."""
    ref_blocks = moe_blocks(reference)
    scores = {}
    for i, moe in moe_blocks(model).items():
        rows = moe.router.gate_rows(torch.arange(moe.num_experts))
        now = moe.router.weight.detach().double()[rows]
        before = ref_blocks[i].router.weight.detach().double().to(now.device)[rows]
        scores[i] = torch.linalg.vector_norm(now - before, dim=1).cpu()
    return scores


def seeded_init(config: RunConfig) -> TransformerLM:
    """The run's step-0 weights as the trainer makes them: ``torch.manual_seed(train.seed)``,
    then ``TransformerLM(model)`` (on CPU); the caller's RNG state is left as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(config.train.seed)
        return TransformerLM(config.model)
    finally:
        torch.random.set_rng_state(state)


@register_method
class RouterChange(CompressMethod):
    name = "router_change"
    summary = (
        "prune the experts whose router row changed least between an earlier checkpoint and "
        "this one (Chowdhury et al., ICML 2024)"
    )
    capability = "prunable"
    needs_calibration = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--reference-checkpoint",
            default=None,
            metavar="STEP",
            help="router_change: the earlier checkpoint (step or step_* name; default: the "
            "earliest kept one, else the step-0 init regenerated from train.seed)",
        )

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        super().__init__(ratio, options)
        self.require_ratio()
        self.reference: TransformerLM | None = None  # Python callers may set it instead

    def check(self, model: TransformerLM) -> None:
        keep_for_ratio(model, self.require_ratio())
        if self.reference is None:
            self._reference_checkpoint(self._source())

    def _source(self) -> SourceRun:
        if self.source is None:
            raise ValueError(
                "router_change: needs the run's earlier weights (method.source or .reference)"
            )
        return self.source

    def _reference_checkpoint(self, source: SourceRun) -> RunDir | None:
        """The reference checkpoint's directory (None: regenerate the init), refusing a
        reference that is not earlier, and a regenerated init that is not the run's start."""
        run = RunDir(source.path)
        chosen = run.step_of(source.checkpoint)
        wanted = self.options.get("reference_checkpoint")
        if wanted is not None:
            try:
                ref = run.find_checkpoint(wanted)
            except ValueError as err:
                raise ValueError(f"--reference-checkpoint: {err}") from None
            if run.step_of(ref) >= chosen:
                raise ValueError(
                    f"--reference-checkpoint: {ref.name} is not earlier than the compressed "
                    f"checkpoint {source.checkpoint.name}"
                )
            return ref
        earlier = [c for c in run.checkpoints() if run.step_of(c) < chosen]
        if earlier:
            return earlier[0]
        origin = next((r["origin"] for r in run.provenance() if "origin" in r), None)
        if origin is not None:
            raise ValueError(
                f"--reference-checkpoint: run {source.path} started from the weights of "
                f"{source_path(source.path, origin.get('source', '?')).resolve()} "
                f"({origin.get('command')}), so its seeded init is not "
                "its start, and it keeps no checkpoint earlier than "
                f"{source.checkpoint.name}; compress a later checkpoint"
            )
        return None

    def _load_reference(self) -> tuple[TransformerLM, str]:
        if self.reference is not None:
            return self.reference, "given reference model"
        source = self._source()
        ref = self._reference_checkpoint(source)
        run = RunDir(source.path)
        if ref is not None:
            return run.load_model(source.config.model, ref), f"checkpoint {ref.name}"
        model = seeded_init(source.config)
        return model, f"step-0 init regenerated from train.seed={source.config.train.seed}"

    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        keep = keep_for_ratio(model, self.require_ratio())
        reference, described = self._load_reference()
        scores = router_change(model, reference)
        kept = {i: ranked_keep(s, keep) for i, s in scores.items()}
        pruned = prune_to(model, kept)
        details = {
            "keep": keep,
            "reference": described,
            "router_change": {str(i): s.tolist() for i, s in scores.items()},
            "kept_experts": {str(i): ids.tolist() for i, ids in kept.items()},
        }
        return CompressOutcome(pruned, layer_changes(model, pruned), details)
