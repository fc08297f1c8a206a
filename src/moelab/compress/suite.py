"""``moelab compare --suite compress``: trained runs compressed by every registered method at the
settings each method declares, each compressed run evaluated on the whole validation split.

A different kind of suite from the training suites of :data:`~moelab.analysis.suite_catalog.SUITES`
(which stays the only list of those): nothing is trained from scratch. It reads source runs (by
default the ``paper`` suite's ``remoe-seed0`` and ``topk-seed0``), runs
:func:`~moelab.compress.run.compress_run` for every method of
:func:`~moelab.compress.methods.method_names` at every :meth:`CompressMethod.suite_settings`
(three ratios of expert parameters kept, or a method's own settings such as quantize's int8 and
int4), optionally heals each compressed run for a few training steps, and writes under ``OUT``:

* ``runs/<source>-<method>-<setting>/``: the compressed runs (never inside a source, which is
  only read);
* ``rows/<same name>.json``: one table row each, written once the run is evaluated (or refused),
  so an interrupted suite resumes and keeps finished rows; ``rows/<source>.json`` the source;
* ``compress_suite.json``: the command, sources (path, checkpoint), settings and provenance.

A method that refuses a source (a router without the capability, a ratio too low for its
router, a width no quantization group divides) is a row with the one-line reason, not a crash.

Here, in the compress package, so that it may drive :func:`compress_run` (the analysis package
may not import it); the command passes the rows to
:func:`moelab.analysis.compress_report.write_compress_report` for the table and plots.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moelab import provenance
from moelab.compress.methods import SUITE_RATIOS, SuiteSetting, get_method, method_names
from moelab.compress.run import compress_run
from moelab.rundir import RunDir
from moelab.train import evaluate_run, load_run, load_run_config, train

__all__ = [
    "DEFAULT_SOURCES",
    "RECORD_FILE",
    "ROWS_SUBDIR",
    "CompressJob",
    "plan_compress",
    "run_compress_suite",
    "shown_path",
]

RUNS_SUBDIR = "runs"  # as a training suite's OUT/runs
DEFAULT_SOURCES = {"remoe": "remoe-seed0", "topk": "topk-seed0"}  # label → run of --from DIR/runs
ROWS_SUBDIR = "rows"
RECORD_FILE = "compress_suite.json"  # not suite.json: the training-suite tools read those


@dataclass(frozen=True)
class CompressJob:
    """One compressed run of the suite: ``source`` label, method and setting, output directory."""

    source: str
    source_dir: Path
    method: str
    setting: SuiteSetting
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace(" ", "_"))


def resolve_sources(
    from_dir: str | Path | None, sources: dict[str, str | Path] | None
) -> dict[str, Path]:
    """``label → run directory``: ``sources`` (a path, or a run name under ``from_dir/runs``)
    or, when None, :data:`DEFAULT_SOURCES` under ``from_dir/runs``. Each must hold a run with a
    checkpoint; one-line errors before any work."""
    chosen = dict(sources) if sources else dict(DEFAULT_SOURCES)
    base = Path(from_dir).expanduser() / RUNS_SUBDIR if from_dir is not None else None
    out: dict[str, Path] = {}
    for label, where in chosen.items():
        if not label or _slug(label) != label:
            raise ValueError(f"--source: label {label!r} must be letters, digits, '-', '_', '.'")
        path = Path(where).expanduser()
        if not path.is_dir() and base is not None and (base / str(where)).is_dir():
            path = base / str(where)
        if not path.is_dir():
            if base is None:
                raise ValueError(f"--from: give the suite directory holding runs/{where}")
            raise ValueError(f"--source: {label}: no run directory {str(path)!r}")
        if not RunDir(path).holds_run or not RunDir(path).has_latest:
            raise ValueError(f"--source: {label}: {str(path)!r} holds no run with a checkpoint")
        out[label] = path
    return out


def plan_compress(
    sources: dict[str, Path],
    out_dir: str | Path,
    methods: list[str] | None = None,
    ratios: tuple[float, ...] | None = None,
) -> list[CompressJob]:
    """Every (source, method, setting) in order, each method's settings from its own
    :meth:`~moelab.compress.methods.CompressMethod.suite_settings` on the source model."""
    names = method_names() if methods is None else list(methods)
    if not names:
        raise ValueError("--methods: give at least one method")
    classes = [get_method(n) for n in names]  # unknown names: one line listing the methods
    ratios = SUITE_RATIOS if ratios is None else tuple(ratios)
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r < 1:
            raise ValueError(f"--ratios: each must be a number in (0, 1), got {r!r}")
    runs = Path(out_dir).expanduser() / RUNS_SUBDIR
    jobs = []
    for label, src in sources.items():
        model, _ = load_run(src)
        for cls in classes:
            for setting in cls.suite_settings(model, ratios):
                name = f"{label}-{cls.name}-{_slug(setting.label)}"
                jobs.append(CompressJob(label, src, cls.name, setting, runs / name))
    return jobs


def _check_out(out: Path, sources: dict[str, Path]) -> None:
    """The suite never writes inside a source run (nor over one)."""
    for label, src in sources.items():
        s, o = src.resolve(), out.resolve()
        if o == s or s in o.parents or o in s.parents:
            raise ValueError(f"--out: {str(out)!r} must lie outside source {label} ({src})")


def _params(origin: dict[str, Any]) -> tuple[int, int]:
    layers = origin.get("layers", [])
    return sum(c["params_before"] for c in layers), sum(c["params_after"] for c in layers)


def _eval(run_dir: Path) -> dict[str, Any]:
    t = time.time()
    res = evaluate_run(run_dir, max_batches=None)  # the whole validation split
    return {
        "val_loss": res["val_loss"],
        "val_ppl": res["val_ppl"],
        "val_tokens": res["tokens"],
        "val_loss_by_domain": res["val_loss_by_domain"],
        "eval_seconds": round(time.time() - t, 1),
    }


def _heal(run_dir: Path, steps: int) -> dict[str, Any]:
    """Continue the compressed run for ``steps`` steps, then evaluate it again; a run that cannot
    train (quantized experts) says so."""
    config = load_run_config(run_dir)
    t = time.time()
    try:
        train(config, run_dir, resume=True)
    except ValueError as err:
        return {"heal_refused": str(err)}
    healed = _eval(run_dir)
    return {
        "healed_val_loss": healed["val_loss"],
        "heal_seconds": round(time.time() - t - healed["eval_seconds"], 1),
    }


def _heal_overrides(steps: int) -> list[str]:
    if steps <= 0:
        return ["data.eval_max_batches=null"]
    return [
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"checkpoint.every={steps}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        "data.eval_max_batches=null",
    ]


def shown_path(path: str | Path) -> str:
    """``path`` as a record spells it: relative to the working directory (the repository root,
    where the suite is run) when inside it, so a committed record names no machine's paths."""
    full, here = Path(path).expanduser().resolve(), Path.cwd().resolve()
    return full.relative_to(here).as_posix() if full.is_relative_to(here) else str(full)


def _source_row(label: str, src: Path) -> dict[str, Any]:
    ckpt = RunDir(src).find_checkpoint(None)
    return {
        "source": label,
        "method": "none",
        "setting": "source",
        "run": shown_path(src),
        "checkpoint": ckpt.name,
        "status": "ok",
        "kept": 1.0,
        "weights_bytes": (ckpt / RunDir.WEIGHTS).stat().st_size,
        **_eval(src),
    }


def _job_row(job: CompressJob, heal_steps: int, calib_batches: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "source": job.source,
        "method": job.method,
        "setting": job.setting.label,
        "ratio": job.setting.ratio,
        "options": job.setting.options,
        "run": f"{RUNS_SUBDIR}/{job.name}",
    }
    t = time.time()
    try:
        compress_run(
            job.source_dir,
            job.run_dir,
            job.method,
            job.setting.ratio,
            job.setting.options,
            calib_batches=calib_batches,
            overrides=_heal_overrides(heal_steps),
            overwrite=RunDir(job.run_dir).holds_run,  # a run left by an interrupted suite
            command="compare --suite compress",
        )
    except (ValueError, ImportError) as err:  # a refusal: one line, nothing written
        return row | {"status": "refused", "reason": str(err).splitlines()[0]}
    origin = RunDir(job.run_dir).provenance()[0]["origin"]
    before, after = _params(origin)
    row |= {
        "status": "ok",
        "moe_params_before": before,
        "moe_params_after": after,
        "kept": after / before if before else None,
        "weights_bytes": origin["weights_bytes"]["compressed"],
        "compress_seconds": round(time.time() - t, 1),
        **_eval(job.run_dir),
    }
    if heal_steps > 0:
        row |= _heal(job.run_dir, heal_steps)
    return row


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n", "utf-8")
    tmp.replace(path)  # a row file is whole or absent: resumption trusts it


def run_compress_suite(
    out_dir: str | Path,
    *,
    from_dir: str | Path | None = None,
    sources: dict[str, str | Path] | None = None,
    methods: list[str] | None = None,
    ratios: tuple[float, ...] | None = None,
    heal_steps: int = 0,
    calib_batches: int = 16,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compress and evaluate every planned job into ``out_dir`` (see the module doc); rows
    already in ``out_dir/rows`` are kept. Returns ``{"rows", "seconds"}``; ``compress_suite.json``
    says when it finished."""
    if isinstance(heal_steps, bool) or not isinstance(heal_steps, int) or heal_steps < 0:
        raise ValueError(f"--heal-steps: must be an integer >= 0, got {heal_steps!r}")
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise ValueError(f"--calib-batches: must be a positive integer, got {calib_batches!r}")
    out = Path(out_dir).expanduser()
    src = resolve_sources(from_dir, sources)
    _check_out(out, src)
    plan = plan_compress(src, out, methods, ratios)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    record = {
        "suite": "compress",
        "command": command,
        "sources": {
            k: {"run": shown_path(p), "checkpoint": RunDir(p).find_checkpoint(None).name}
            for k, p in src.items()
        },
        "methods": sorted({j.method for j in plan}),
        "jobs": [
            {"run": f"{RUNS_SUBDIR}/{j.name}", "source": j.source, "method": j.method}
            | {"setting": j.setting.label, "ratio": j.setting.ratio, "options": j.setting.options}
            for j in plan
        ],
        "heal_steps": heal_steps,
        "calib_batches": calib_batches,
        "provenance": provenance.collect(),
        "started": now(),
    }
    _write_json(out / RECORD_FILE, record)
    rows_dir = out / ROWS_SUBDIR
    rows = []
    steps = [(label, None) for label in src] + [(j.source, j) for j in plan]
    for i, (label, job) in enumerate(steps, 1):
        name = label if job is None else job.name
        path = rows_dir / f"{name}.json"
        if path.is_file():
            log(f"[{i}/{len(steps)}] {name}: done already, kept")
            rows.append(json.loads(path.read_text("utf-8")))
            continue
        t = time.time()
        row = (
            _source_row(label, src[label])
            if job is None
            else _job_row(job, heal_steps, calib_batches)
        )
        _write_json(path, row)
        rows.append(row)
        said = row.get("reason") or f"val loss {row['val_loss']:.4f}"
        log(f"[{i}/{len(steps)}] {name}: {said} ({time.time() - t:.0f} s)")
    record |= {"finished": now(), "seconds": round(time.time() - t0, 1), "rows": len(rows)}
    _write_json(out / RECORD_FILE, record)
    return {"rows": rows, "seconds": time.time() - t0}
