"""The training loop's speed switches, ``train.precision`` and ``train.compile``: each falls back to
plain fp32 eager training with one warning where the hardware or platform lacks it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from mnist_vae.errors import first_line

log = logging.getLogger(__name__)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """Sets up ``train.precision``; returns the context the forward pass runs in.

    tf32 speeds up float32 matrix products on Ampere and newer GPUs; bf16 runs the forward pass under
    autocast. Where a choice is unavailable it falls back to fp32 with one warning.
    """
    if precision == "tf32":
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:
            log.warning("train.precision tf32 needs CUDA; training in fp32 on %s", device)
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16; training in fp32")
        else:
            return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


class Compiled:
    """``torch.compile`` of the loss (CUDA graphs on a GPU), falling back to eager with one warning
    when compiling fails: at construction, or on the first call, where dynamo traces and inductor
    compiles. Only torch's compiler errors fall back; any other error (out of memory, a bug in the
    model, an error on a later step) propagates, so training never changes path silently mid-run."""

    def __init__(self, fn: Callable, device: torch.device) -> None:
        self.fn = fn
        self.first_call = True
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        try:
            self.compiled: Callable | None = torch.compile(fn, mode=mode, dynamic=False)
        except Exception as exc:  # torch.compile itself unavailable on this platform
            log.warning("torch.compile unavailable (%s); training without it", first_line(exc))
            self.compiled = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.fn(*args)
        if not self.first_call:
            return self.compiled(*args)
        from torch._dynamo.exc import TorchDynamoException  # inductor's errors derive from it

        try:
            out = self.compiled(*args)
        except TorchDynamoException as exc:
            # A bug in the model itself fails the same way in eager mode below, with its traceback.
            log.warning("torch.compile failed (%s); training without it", first_line(exc))
            self.compiled = None
            return self.fn(*args)
        self.first_call = False
        return out
