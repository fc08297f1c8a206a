"""A run directory: the one place that knows what a run keeps where.

::

    RUN_DIR/
      config.yaml          the resolved run config (re-read by --resume, eval, generate, analysis)
      tokenizer.json       copy of the dataset's tokenizer (the ids of every file below)
      accounting.json      params / active params / FLOPs of the model
      metrics.jsonl        one JSON object per line: train and eval records (strict JSON:
                           non-finite numbers as "NaN" / "Infinity" strings, see records.py)
      summary.json         written when the run completes
      provenance.json      per training process: code (git commit, dirty), torch, CPU/GPU,
                           threads, data checksum, the step it started at (moelab.provenance)
      routing.npz          written by the analysis pass of `moelab compare` (or `analyze
                           --save-routing`): the per-token routing its numbers are computed from
      tensorboard/         only with logging.tensorboard
      wandb/               only with logging.wandb
      .lock                while a process writes the run: its pid (claim.py)
      checkpoints/
        latest             text: the newest checkpoint's name
        step_XXXXXXXX/     model.safetensors (weights) + state.pt (everything a resume needs);
                           a run trained on several processes (torchrun): sharded/ (weights and
                           optimizer state, torch.distributed.checkpoint) + state.pt (the rest)

Training, evaluation, analysis and the commands reach these files through :class:`RunDir` only, so
the layout can change in one place. The package has one module per responsibility: ``run``
(:class:`RunDir`: config, tokenizer, provenance, summary, metrics), ``checkpoints`` (finding,
writing and reading checkpoints; how the bytes are written safely is
:mod:`moelab.checkpoint_io`'s job), ``claim`` (which directory a command may write, what
``--overwrite`` removes, the writer's lock) and ``records`` (strict JSON for metrics and summary).

``RunDir`` sits below :mod:`moelab.train`: it reads and writes any typed :class:`~moelab.config.
Config` and the caller names the class (``moelab.train.RunConfig``), so the training, evaluation
and analysis packages can all use it without importing one another.
"""

from moelab.checkpoint_io import CheckpointError
from moelab.rundir.claim import DirectoryLock, check_not_source, clear_entries, foreign_entries
from moelab.rundir.records import MetricsWriter
from moelab.rundir.run import RunDir

__all__ = [
    "CheckpointError",
    "DirectoryLock",
    "MetricsWriter",
    "RunDir",
    "check_not_source",
    "clear_entries",
    "foreign_entries",
]
