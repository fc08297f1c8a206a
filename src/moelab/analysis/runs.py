"""Reading run directories (``docs/CONTRACTS.md`` "Runs": metrics and summary) into arrays.

Only the files are read here - no model is built - so loss tables and training curves work for any
run, including runs with no routed layer and runs whose checkpoints were deleted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.model import ModelConfig
from moelab.rundir import RunDir


@dataclass
class RunRecord:
    """One run directory's logged data: the summary, the train and eval lines of its metrics."""

    path: Path
    summary: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    # 1-based line of each eval record in metrics.jsonl (None when it cannot be told), so a report
    # can link a number to the line it was logged on
    eval_lines: list[int | None] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or "unknown")

    @property
    def group(self) -> str:
        """The run's name without a trailing seed tag (``remoe-seed1`` → ``remoe``), used to
        average seeds in reports."""
        return re.sub(r"[-_.]?seed[-_]?\d+$", "", self.name) or self.name

    def final_val(self) -> dict[str, Any]:
        """Final validation numbers: the summary's, else the last eval line's."""
        s = self.summary
        last = self.evals[-1] if self.evals else {}
        loss = s.get("final_val_loss", last.get("val_loss"))
        ppl = s.get("final_val_ppl", last.get("val_ppl"))
        if ppl is None and loss is not None and math.isfinite(float(loss)):
            ppl = math.exp(float(loss))
        by_domain = s.get("val_loss_by_domain") or last.get("val_loss_by_domain") or {}
        return {"val_loss": loss, "val_ppl": ppl, "val_loss_by_domain": dict(by_domain)}

    def final_eval_line(self) -> int | None:
        """The metrics line holding the final validation loss: the last eval line, when the
        summary's ``final_val_loss`` is that line's value (``build_summary`` copies it from there);
        None otherwise."""
        if not self.evals or not self.eval_lines or self.eval_lines[-1] is None:
            return None
        final = self.summary.get("final_val_loss")
        if final is not None and final != self.evals[-1].get("val_loss"):
            return None
        return self.eval_lines[-1]


def read_run(run_dir: str | Path) -> RunRecord:
    """Read the summary and the metrics of a run directory.

    Raises ValueError naming the directory when it is not a run: missing, not a directory, or
    holding neither file (either one alone is enough: a crashed run has metrics but no summary),
    or with a malformed line. A run laid out at step 0 (``moelab compress``, ``prune``,
    ``upcycle``: a config and a checkpoint, nothing trained yet) reads as a run without lines, so
    its routing can be analysed before it trains.
    """
    run = RunDir(run_dir)
    path = run.path
    if not path.is_dir():
        raise ValueError(f"{path}: not a run directory (does not exist or is not a directory)")
    if not run.has_summary and not run.has_metrics and not (run.holds_run and run.has_latest):
        raise ValueError(
            f"{path}: not a run directory (no {RunDir.SUMMARY} or {RunDir.METRICS}; expected a "
            "directory written by `moelab train`)"
        )
    rec = RunRecord(path=path, summary=run.read_summary())
    records = run.read_metrics()
    lines = _record_lines(path / RunDir.METRICS, len(records))
    for obj, line in zip(records, lines, strict=True):
        if obj.get("kind") == "train":
            rec.train.append(obj)
        elif obj.get("kind") == "eval":
            rec.evals.append(obj)
            rec.eval_lines.append(line)
    return rec


def _record_lines(path: Path, n_records: int) -> list[int | None]:
    """Line numbers of the records ``RunDir.read_metrics`` returned: its non-blank lines, when
    their count matches (every line a JSON object, as the writer writes them); else unknown."""
    if not path.is_file():
        return [None] * n_records
    lines = [n for n, line in enumerate(path.read_text("utf-8").splitlines(), 1) if line.strip()]
    return list(lines) if len(lines) == n_records else [None] * n_records


def _series(lines: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([_num(line.get(key)) for line in lines], dtype=np.float64)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class RunAnalysis:
    """Everything computed for one run (JSON-able ``results``, plus a note on what was skipped)."""

    record: RunRecord
    results: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    z_primes: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class TrainingCurves:
    """Training-line series aligned on ``steps`` (NaN where a line lacks a value)."""

    steps: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    aux: dict[str, np.ndarray]
    sparsity: np.ndarray
    lam: np.ndarray
    tokens_per_s: np.ndarray
    layer_sparsity: dict[str, np.ndarray]
    layer_active_mean: dict[str, np.ndarray]
    last_tokens_per_expert: dict[str, list[int]]
    eval_steps: np.ndarray
    eval_tokens: np.ndarray
    val_loss: np.ndarray

    @property
    def has_sparsity(self) -> bool:
        return bool(np.isfinite(self.sparsity).any())


def training_curves(rec: RunRecord) -> TrainingCurves:
    """Series of a run's metrics: LM loss, aux losses, sparsity and λ (ReMoE), per-layer sparsity,
    and the last logged tokens-per-expert of each layer."""
    tr = rec.train
    aux_names = sorted({k for line in tr for k in (line.get("aux") or {})})
    aux = {n: np.array([_num((line.get("aux") or {}).get(n)) for line in tr]) for n in aux_names}
    layer_keys = sorted(
        {k for line in tr for k in (line.get("layers") or {})}, key=lambda k: (len(k), k)
    )

    def layer_series(key: str) -> dict[str, np.ndarray]:
        return {
            lk: np.array([_num(((line.get("layers") or {}).get(lk) or {}).get(key)) for line in tr])
            for lk in layer_keys
        }

    last_tpe: dict[str, list[int]] = {}
    for line in tr:
        for lk, st in (line.get("layers") or {}).items():
            if isinstance(st, dict) and st.get("tokens_per_expert") is not None:
                last_tpe[lk] = list(st["tokens_per_expert"])
    layer_sp = {k: v for k, v in layer_series("sparsity").items() if np.isfinite(v).any()}
    layer_act = {k: v for k, v in layer_series("active_mean").items() if np.isfinite(v).any()}
    return TrainingCurves(
        steps=_series(tr, "step"),
        tokens=_series(tr, "tokens"),
        loss=_series(tr, "loss"),
        aux=aux,
        sparsity=_series(tr, "sparsity"),
        lam=_series(tr, "lambda"),
        tokens_per_s=_series(tr, "tokens_per_s"),
        layer_sparsity=layer_sp,
        layer_active_mean=layer_act,
        last_tokens_per_expert=last_tpe,
        eval_steps=_series(rec.evals, "step"),
        eval_tokens=_series(rec.evals, "tokens"),
        val_loss=_series(rec.evals, "val_loss"),
    )


def sparsity_target(rec: RunRecord) -> float | None:
    """ReMoE's target ``1 − k/E`` of a run, read from its summary (``sparsity_target``) or its
    config (``model.ffn`` with ``router: relu``); None for runs without one."""
    t = rec.summary.get("sparsity_target")
    if t is not None:
        return float(t)
    ffn = _config_ffn(rec.path)
    if not ffn:
        return None
    try:  # the typed FFN config asks its router (no router name or default repeated here)
        return ModelConfig.from_dict({"ffn": ffn}).ffn.sparsity_target
    except ValueError:  # a hand-written or older config that no longer validates
        return None


def _config_ffn(path: Path) -> dict[str, Any] | None:
    cfg = RunDir(path).raw_config()
    model = cfg.get("model", cfg)
    ffn = model.get("ffn") if isinstance(model, dict) else None
    return ffn if isinstance(ffn, dict) else None
