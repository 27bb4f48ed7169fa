"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

``train.nproc: N`` makes the train stage start itself again under ``torchrun --nproc_per_node N``
(NCCL on GPUs, gloo on CPU); running ``torchrun ... pipeline/train.py`` by hand, on one machine or
several with torchrun's rendezvous, works the same. The global batch is ``train.batch_size`` whatever
the number of processes: each process takes an equal shard of every step's batch, DDP averages the
gradients, so the learning rate needs no change and N processes follow the same curve as one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, script: str, argv: list[str]) -> int:
    """Runs ``script argv`` under torchrun with ``nproc`` processes; returns its exit code.

    A SIGTERM or SIGHUP to this process is passed on to torchrun, which sends the same signal to its
    workers; this process waits for them. On SIGTERM rank 0 stops as a single-process training does
    (checkpoint kept, run KILLED) and the other ranks, which write nothing, end at once. The workers
    do not handle SIGHUP: they all end at once, the last finished epoch's checkpoint stays and the
    MLflow run is left RUNNING. Ctrl-C at a terminal reaches them all without help.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        *argv,
    ]
    process = subprocess.Popen(command)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C reached torchrun too: let it stop its workers
            return process.wait()  # (a second Ctrl-C does not wait)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def init(device: str = "auto") -> tuple[int, int]:
    """Joins the process group when started by torchrun; returns (rank, world size).

    ``device`` is ``train.device``: the ranks train on CUDA, over NCCL, only where it resolves to
    CUDA; ``cpu`` trains over gloo whatever the machine has.
    """
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        chosen = backend(device)
        if chosen == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(chosen)
    return dist.get_rank(), dist.get_world_size()


def backend(device: str) -> str:
    """The process group's backend for ``train.device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
