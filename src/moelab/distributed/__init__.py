"""Training on several processes with ``torch.distributed`` (launched by ``torchrun``).

Parallelism is applied to a built model from outside, as torchtitan's parallelize functions do:
the layers never test whether they run distributed. :func:`setup_parallel` gives the trainer its
parallel setting (:class:`SingleProcess` outside ``torchrun``, which changes nothing);
:func:`apply_expert_parallel` splits the experts of the MoE layers over a group of ranks;
:func:`save_checkpoint` / :func:`load_checkpoint` write and read sharded checkpoints with
``torch.distributed.checkpoint``; :func:`run_guarded` makes a failing rank end the launch;
:func:`rank0_choice` gives every rank rank 0's value (the default run directory). See
``docs/distributed.md``.
"""

from moelab.distributed.checkpoint import load_checkpoint, save_checkpoint
from moelab.distributed.config import DistributedConfig, LaunchConfig
from moelab.distributed.expert_parallel import (
    ExpertParallelDispatcher,
    ShardedParam,
    all_to_all,
    apply_expert_parallel,
)
from moelab.distributed.launch import (
    LaunchEnv,
    Topology,
    check_layout,
    init_topology,
    run_guarded,
)
from moelab.distributed.parallel import DataParallel, SingleProcess
from moelab.distributed.parallel import setup as setup_parallel
from moelab.distributed.rank_sum import GroupSum
from moelab.distributed.rendezvous import rank0_choice

__all__ = [
    "DataParallel",
    "DistributedConfig",
    "LaunchConfig",
    "ExpertParallelDispatcher",
    "GroupSum",
    "LaunchEnv",
    "ShardedParam",
    "SingleProcess",
    "Topology",
    "all_to_all",
    "apply_expert_parallel",
    "check_layout",
    "init_topology",
    "load_checkpoint",
    "rank0_choice",
    "run_guarded",
    "save_checkpoint",
    "setup_parallel",
]
