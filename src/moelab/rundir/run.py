"""The run directory type, :class:`RunDir` (the layout is in :mod:`moelab.rundir`'s docstring)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moelab.config import Config, ConfigError, dump_yaml, load_config
from moelab.data import TokenDataset, load_tokenizer
from moelab.data.tokenizer import TextTokenizer, file_sha256
from moelab.rundir.checkpoints import CheckpointFiles
from moelab.rundir.claim import DirectoryLock, check_not_source, clear_entries, foreign_entries
from moelab.rundir.records import MetricsWriter, decode, dumps, has_nonfinite

__all__ = ["RunDir"]

C = TypeVar("C", bound=Config)


class RunDir(CheckpointFiles):
    """The files of one training run (see :mod:`moelab.rundir` for the layout), and the rules
    for writing them (:mod:`moelab.rundir.claim`): which directory may become a run, what
    ``--overwrite`` removes, and the lock a writing process holds."""

    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.json"
    ACCOUNTING = "accounting.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    PROVENANCE = "provenance.json"
    ROUTING = "routing.npz"  # routing statistics of the analysis pass (analysis.routing_file)
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"  # W&B's offline files (logging.wandb)
    LOCK = DirectoryLock.NAME  # present while a process writes the run
    # Everything a run consists of: what --overwrite removes, and all a directory may hold to be
    # taken for a run (with the metrics file's temporary copy, see truncate_metrics).
    ENTRIES = frozenset(
        {
            CONFIG,
            TOKENIZER,
            ACCOUNTING,
            METRICS,
            METRICS + ".tmp",
            SUMMARY,
            PROVENANCE,
            ROUTING,
            ".tmp-" + ROUTING,
            TENSORBOARD,
            WANDB,
            CheckpointFiles.CHECKPOINTS,
            LOCK,
        }
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ---- what is there --------------------------------------------------------------------------

    @property
    def holds_run(self) -> bool:
        """A run was started here (its config is written before the first step)."""
        return (self.path / self.CONFIG).is_file()

    @property
    def has_summary(self) -> bool:
        """The run completed (the summary is written last)."""
        return (self.path / self.SUMMARY).is_file()

    @property
    def has_metrics(self) -> bool:
        return (self.path / self.METRICS).is_file()

    # ---- who may write here ---------------------------------------------------------------------

    def check_new_run(self, *, overwrite: bool, field: str = "run_dir") -> bool:
        """Whether a new run may be laid out here (see :mod:`moelab.rundir.claim`); returns
        whether an earlier run is to be replaced. ConfigError on ``field``, nothing touched,
        for a dataset, a directory holding anything but a run, or a run without ``overwrite``."""
        earlier = foreign_entries(
            self.path,
            self.ENTRIES,
            what="a run",
            overwrite=overwrite,
            field=field,
            keep_hint=f"continue it with --resume {self.path}" if self.holds_run else "",
        )
        return bool(earlier)

    def check_new_run_from(
        self,
        source: str | Path,
        *,
        overwrite: bool,
        field: str = "OUT_RUN_DIR",
        source_field: str = "RUN_DIR",
    ) -> bool:
        """:meth:`check_new_run` for a run written from ``source`` (``prune``, ``upcycle``,
        ``convert-hf``): also refuses this directory being ``source`` or containing it."""
        check_not_source(self.path, source, field=field, source_field=source_field)
        return self.check_new_run(overwrite=overwrite, field=field)

    def lock(self) -> DirectoryLock:
        """Hold this run for the calling process until :meth:`DirectoryLock.release` (creates
        the directory); ConfigError naming the holder's pid when another process writes it."""
        self.path.mkdir(parents=True, exist_ok=True)
        return DirectoryLock(self.path).acquire()

    def remove_run(self) -> None:
        """Remove what a run consists of (:attr:`ENTRIES`, the lock aside), nothing else;
        refuses, removing nothing, when the directory holds anything else."""
        earlier = foreign_entries(self.path, self.ENTRIES, what="a run", overwrite=True, field="")
        clear_entries(self.path, earlier)

    def create(
        self, config: Config, dataset: TokenDataset, accounting: dict[str, Any], *, replace: bool
    ) -> None:
        """Lay out a new run: its config, its dataset's tokenizer and its model's accounting.
        ``replace`` first removes the run already here (:meth:`remove_run`)."""
        if replace:
            self.remove_run()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        if dataset.tokenizer_file.is_file():
            shutil.copyfile(dataset.tokenizer_file, self.path / self.TOKENIZER)
        (self.path / self.ACCOUNTING).write_text(json.dumps(accounting, indent=2))

    # ---- config ---------------------------------------------------------------------------------

    def write_config(self, config: Config) -> None:
        dump_yaml(config, self.path / self.CONFIG)

    def read_config(self, cls: type[C]) -> C:
        """The run's config as ``cls`` (validated); ConfigError when this is not a run."""
        path = self.path / self.CONFIG
        if not path.is_file():
            raise ConfigError(
                "run_dir", f"{str(self.path)!r} is not a moelab run (no {self.CONFIG})"
            )
        return load_config(cls, path)

    def raw_config(self) -> dict[str, Any]:
        """The config as plain data, unvalidated (``{}`` when missing or unreadable): analysis
        reads hand-written or older runs whose config would not validate today."""
        path = self.path / self.CONFIG
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text("utf-8")) or {}
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    # ---- tokenizer ------------------------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / self.TOKENIZER).is_file()

    def tokenizer(self, dataset: TokenDataset | None = None) -> TextTokenizer:
        """The tokenizer the run was trained with: its own copy, else ``dataset``'s, else the
        shipped one."""
        if self.has_tokenizer:
            return load_tokenizer(self.path / self.TOKENIZER)
        return dataset.tokenizer() if dataset is not None else load_tokenizer()

    def tokenizer_sha256(self) -> str | None:
        """Hash of the run's tokenizer copy (None without one): what identifies its token ids."""
        return file_sha256(self.path / self.TOKENIZER) if self.has_tokenizer else None

    def check_same_tokenizer(self, dataset: TokenDataset, field: str = "--data") -> None:
        """Refuse a dataset tokenised with another tokenizer than the run's (meaningless losses)."""
        own = self.tokenizer_sha256()
        theirs = dataset.meta.get("tokenizer_sha256")
        if own and theirs and own != theirs:
            raise ValueError(
                f"{field}: {dataset.path} was tokenised with {dataset.meta.get('tokenizer')} "
                f"(sha256 {theirs[:12]}), but run {self.path} was trained with another "
                f"tokenizer (sha256 {own[:12]}); prepare the data with the run's {self.TOKENIZER}"
            )

    # ---- provenance -----------------------------------------------------------------------------

    def add_provenance(self, record: dict[str, Any]) -> None:
        """Append the provenance of one training process (start and each resume) to the run."""
        records = self.provenance() + [record]
        (self.path / self.PROVENANCE).write_text(json.dumps(records, indent=2))

    def set_origin(self, origin: dict[str, Any]) -> None:
        """Record, in the run's first provenance record, the run or checkpoint whose weights this
        run started from and how they were changed (``convert-hf``, ``upcycle``, ``prune``)."""
        records = self.provenance()
        if not records:
            raise ValueError(f"{self.path}: no provenance record to attach an origin to")
        records[0]["origin"] = origin
        (self.path / self.PROVENANCE).write_text(json.dumps(records, indent=2))

    def provenance(self) -> list[dict[str, Any]]:
        """One record per training process of this run, oldest first (``[]`` for older runs)."""
        path = self.path / self.PROVENANCE
        if not path.is_file():
            return []
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return records if isinstance(records, list) else [records]

    def recorded_preset(self) -> str | None:
        """The preset the run was started from (its first training process records it; older
        runs: the summary's), so a resumed run's summary keeps it."""
        for record in self.provenance():
            if isinstance(record, dict) and record.get("preset"):
                return str(record["preset"])
        return self.read_summary().get("preset")

    # ---- summary --------------------------------------------------------------------------------

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / self.SUMMARY).write_text(dumps(summary, indent=2))

    def remove_summary(self) -> None:
        """A resumed run is not complete until it writes a new summary (suites treat a run with a
        summary as finished)."""
        (self.path / self.SUMMARY).unlink(missing_ok=True)

    def read_summary(self) -> dict[str, Any]:
        """The summary (``{}`` while the run has none); ValueError naming the file if malformed."""
        path = self.path / self.SUMMARY
        if not path.is_file():
            return {}
        try:
            summary = decode(json.loads(path.read_text("utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(summary, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return summary

    # ---- metrics --------------------------------------------------------------------------------

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    def metrics_writer(self) -> MetricsWriter:
        """Appends to the run's metrics (a resumed run continues the same file)."""
        return MetricsWriter(self.path / self.METRICS)

    def read_metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The metrics records in order (only those of ``kind`` when given; ``[]`` without a
        metrics file). ValueError naming the file and line for a line that is not JSON. Non-finite
        numbers, written as strings (:mod:`moelab.rundir.records`), come back as floats."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                obj = decode(obj) if has_nonfinite(line) else obj
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
            if isinstance(obj, dict) and (kind is None or obj.get("kind") == kind):
                records.append(obj)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run rewrites what followed its checkpoint)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)
