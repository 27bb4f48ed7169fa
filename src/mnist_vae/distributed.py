"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

``train.nproc: N`` makes the train stage start itself again under ``torchrun --nproc_per_node N``
(NCCL on GPUs, gloo on CPU); running ``torchrun ... pipeline/train.py`` by hand, on one machine or
several with torchrun's rendezvous, works the same. The global batch is ``train.batch_size`` whatever
the number of processes: each process takes an equal shard of every step's batch, DDP averages the
gradients, so the learning rate needs no change and N processes follow the same curve as one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, script: str, argv: list[str]) -> int:
    """Runs ``script argv`` under torchrun with ``nproc`` processes; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, *argv]
    return subprocess.run(command, check=False).returncode


def init() -> tuple[int, int]:
    """Joins the process group when started by torchrun; returns (rank, world size)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
