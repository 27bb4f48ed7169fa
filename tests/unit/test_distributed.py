"""Which backend the ranks of a multi-process training join (the ranks themselves, on 2 CPU
processes: tests/e2e/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from mnist_vae.training.distributed import backend


@pytest.mark.parametrize("cuda", [True, False], ids=["with a GPU", "without"])
def test_cpu_training_joins_gloo_whatever_the_machine_has(
    cuda: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert backend("cpu") == "gloo"  # NCCL cannot carry CPU tensors
    assert backend("auto") == backend("cuda") == ("nccl" if cuda else "gloo")
