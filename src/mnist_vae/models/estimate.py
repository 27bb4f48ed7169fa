"""The decoder that the importance-weighted estimate runs: the conv decoder's function, rewritten
for a CPU, in FP32 or, where the CPU computes it natively, bfloat16.

The k-sample estimate decodes k rows per image (5000 on the paper's protocol), so the decoder takes
nearly all of an evaluation's time, and on a CPU most of that went to the transposed convolution
(32 to 16 channels), the last convolution (16 to 4) and the copies between them: layers too narrow
for oneDNN's kernels to run near the machine's peak. :class:`BlockDecoder` computes the same
logits with two wider convolutions and no copy between them:

- the transposed convolution (kernel 4, stride 2, padding 1) as a 2x2 convolution to 4 x 16
  channels on the 7x7 grid padded by one: each of its 8x8 outputs is a 2x2 block of the upsampled
  14x14 image padded by one (space-to-depth), the blocks on the border being that padding, set to 0;
- the last 3x3 convolution on that padded image as a 2x2 convolution from those 64 channels to
  4 x 4 (each 2x2 block of the 14x14 grid, times the 4 sub-pixels of the 28x28 image).

About 16% more multiply-adds than the plain layers (1.54 M against 1.33 M a row on the
binarized-conv network), in shapes that oneDNN runs about twice as fast per multiply-add. The
logits come out in the decoder's own pixel order (:meth:`BlockDecoder.to_phase_order`); the images
are put in that order once per batch, as :meth:`~.networks.ConvDecoder.phase_logits` does.

``bf16``: on a CPU with native bfloat16 dot products (AVX512-BF16 or AMX) the decoder's layers hold
bf16 weights and compute with float32 accumulation inside each layer, about 1.6x as fast again;
the pixel bias (with the last convolution's bias folded in) stays float32, as do the encoder (run
once per image), the latents, the log-likelihood sum and the log-sum-exp. On the binarized-conv
model the estimate moves by 0.0025 nats on the same draws (the mean over 1000 images;
docs/performance.md). ``auto`` (the default) is ``bf16`` on such a CPU and ``fp32`` elsewhere:
without native support bf16 is emulated, and slower.

The rewrite covers the conv decoder of the conv and hvae profiles and of the default (two stages, no residual
blocks); any other conv decoder runs its own layers, in the asked precision; the MLP presets run in
FP32 whatever is asked.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import itertools
import typing
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from mnist_vae.config import EstimatePrecision
from mnist_vae.models.networks import N_PIXELS, ConvDecoder
from mnist_vae.models.vae import VAE

PRECISIONS: tuple[str, ...] = typing.get_args(EstimatePrecision)  # auto, fp32, bf16


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` is a CPU with bfloat16 dot products in hardware (AVX512-BF16 or AMX).

    GPUs answer False: they evaluate fast enough in FP32.
    """
    if torch.device(device).type != "cpu":
        return False
    checks = [
        getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    if all(callable(check) for check in checks):
        return any(check() for check in checks)  # type: ignore[misc]
    try:  # a torch without those checks: the flags Linux reports
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: torch.device | str = "cpu") -> Literal["fp32", "bf16"]:
    """``fp32`` or ``bf16``: what ``precision`` (one of :data:`PRECISIONS`) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def _rewritable(decoder: ConvDecoder) -> bool:
    """Two stages without residual blocks: a 7x7 head, the transposed convolution, its activation,
    the 3x3 convolution to the 4 sub-pixels and their shuffle."""
    body = list(decoder.body)
    if len(body) != 4 or decoder.shape[1:] != (7, 7):
        return False
    up, _, last, shuffle = body
    return (
        isinstance(up, nn.ConvTranspose2d)
        and (up.kernel_size, up.stride, up.padding, up.output_padding) == ((4, 4), (2, 2), (1, 1), (0, 0))
        and up.groups == 1
        and up.dilation == (1, 1)
        and isinstance(last, nn.Conv2d)
        and (last.kernel_size, last.stride, last.padding, last.out_channels) == ((3, 3), (1, 1), (1, 1), 4)
        and last.groups == 1
        and last.dilation == (1, 1)
        and isinstance(shuffle, nn.PixelShuffle)
        and shuffle.upscale_factor == 2
    )


class BlockDecoder(nn.Module):
    """A two-stage :class:`~.networks.ConvDecoder` rewritten as described in the module's docstring:
    the same logits (to float rounding in FP32), layers in ``dtype``, logits and pixel bias in
    float32. For inference only: its activations work in place."""

    up_weight: torch.Tensor
    up_bias: torch.Tensor
    last_weight: torch.Tensor
    pixel_bias: torch.Tensor

    def __init__(self, decoder: ConvDecoder, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        assert _rewritable(decoder), "a two-stage conv decoder without residual blocks"
        up = cast(nn.ConvTranspose2d, decoder.body[0])
        last = cast(nn.Conv2d, decoder.body[2])
        cin, cout = up.in_channels, up.out_channels
        self.cout = cout
        self.dtype = dtype
        self.head = copy.deepcopy(decoder.head).to(dtype)
        self.act = copy.deepcopy(decoder.body[1]).to(dtype)
        for module in (*self.head, self.act):
            # In place where the activation can: a fresh output of 8 MB per 1000 rows costs
            # more in page faults than the activation itself. Inference only, then.
            if hasattr(module, "inplace"):
                module.inplace = True
        with torch.no_grad():
            # The head's last linear layer writes its features (channel, row, column); in (row,
            # column, channel) order its output is a channels-last 7x7 image as it stands.
            linear = cast(nn.Linear, self.head[-2])
            order = torch.arange(cin * 49).reshape(cin, 7, 7).permute(1, 2, 0).reshape(-1)
            linear.weight.copy_(linear.weight[order])
            linear.bias.copy_(linear.bias[order])
            # Up: output block (p, q), sub-position (s, t) is pixel (2p + s - 1, 2q + t - 1) of
            # the 14x14 image; of window row dp in {0, 1} (input row p - 1 + dp) it takes kernel
            # row s + 2 - 2 dp of the transposed convolution, likewise for columns.
            w = up.weight.detach()  # (cin, cout, 4, 4)
            up_w = w.new_zeros(2, 2, cout, cin, 2, 2)
            for s, t, dp, dq in itertools.product(range(2), repeat=4):
                up_w[s, t, :, :, dp, dq] = w[:, :, s + 2 - 2 * dp, t + 2 - 2 * dq].T
            # Last: output block (r, c) of the 14x14 image, its pixel (a, b) and sub-pixel
            # channel u * 2 + v; kernel row dy of the 3x3 reads padded row 2r + a + dy, which is
            # block r + e, sub-row s with 2e + s = a + dy.
            w3 = last.weight.detach()  # (4, cout, 3, 3)
            last_w = w3.new_zeros(2, 2, 4, 2, 2, cout, 2, 2)
            for a, b, dy, dx in itertools.product(range(2), range(2), range(3), range(3)):
                e, s = divmod(a + dy, 2)
                f, t = divmod(b + dx, 2)
                last_w[a, b, :, s, t, :, e, f] = w3[:, :, dy, dx]
            # The last bias with the pixel bias, in the model's dtype (float32) and this order.
            assert last.bias is not None and up.bias is not None
            bias = last.bias.detach().reshape(2, 2).repeat(14, 14).reshape(N_PIXELS)
            if decoder.pixel_bias is not None:
                bias = bias + decoder.pixel_bias.detach()
        channels_last = torch.channels_last
        self.register_buffer(
            "up_weight", up_w.reshape(4 * cout, cin, 2, 2).to(dtype).contiguous(memory_format=channels_last)
        )
        self.register_buffer("up_bias", up.bias.detach().repeat(4).to(dtype))
        self.register_buffer(
            "last_weight",
            last_w.reshape(16, 4 * cout, 2, 2).to(dtype).contiguous(memory_format=channels_last),
        )
        self.register_buffer("pixel_bias", self.to_phase_order(bias))

    @staticmethod
    def to_phase_order(images: torch.Tensor) -> torch.Tensor:
        """Flat (..., 784) images in :meth:`phase_logits`' order: pixel (4r + 2a + u, 4c + 2b + v)
        at ((((r * 7 + c) * 2 + a) * 2 + b) * 2 + u) * 2 + v."""
        return images.index_select(-1, _block_index(images.device))

    def phase_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The logits of the conv decoder at ``z`` (..., latent), in :meth:`to_phase_order`'s order
        and ``z``'s dtype."""
        rows = z.reshape(-1, z.shape[-1]).to(self.dtype)
        h = self.head(rows).reshape(-1, 7, 7, self.up_weight.shape[1]).permute(0, 3, 1, 2)
        blocks = self.act(F.conv2d(h, self.up_weight, self.up_bias, padding=1))  # (n, 64, 8, 8)
        # The border blocks' outer sub-positions are the zero padding of the 3x3 convolution.
        grid = blocks.permute(0, 2, 3, 1).view(-1, 8, 8, 2, 2, self.cout)
        grid[:, 0, :, 0] = 0
        grid[:, 7, :, 1] = 0
        grid[:, :, 0, :, 0] = 0
        grid[:, :, 7, :, 1] = 0
        out = F.conv2d(blocks, self.last_weight)  # (n, 16, 7, 7), channels-last
        # bf16 plus the float32 bias is float32, in one pass.
        return (out.permute(0, 2, 3, 1).reshape(*z.shape[:-1], N_PIXELS) + self.pixel_bias).to(z.dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The logits in the usual pixel order, for whoever calls the decoder itself."""
        return self.phase_logits(z).index_select(-1, _block_index(z.device).argsort())


@functools.cache
def _block_index(device: torch.device) -> torch.Tensor:
    """Where each pixel of :meth:`BlockDecoder.phase_logits`' order is in a flat image."""
    with torch.inference_mode(False):  # a normal tensor, which autograd may save, wherever made
        pixels = torch.arange(N_PIXELS, device=device).reshape(7, 2, 2, 7, 2, 2)  # (r, a, u, c, b, v)
        return pixels.permute(0, 3, 1, 4, 2, 5).reshape(N_PIXELS)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def reuse_freed_memory() -> bool:
    """Asks the C library's malloc to serve blocks up to 32 MB from its heap and to keep up to
    256 MB of freed memory for reuse, for the rest of the process; True where it agreed (glibc).

    Each piece of the estimate allocates and frees layer outputs of several MB (8 MB for the
    upsampled blocks of 1000 rows). glibc maps such blocks fresh from the kernel by default, and
    zero-filling their pages on first touch cost more than the layers that wrote them: the
    binarized-conv estimate ran 1.45x (bf16) faster with this on a 2-core VM (docs/performance.md).
    Elsewhere (macOS, musl) nothing changes.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def for_estimate(model: VAE, precision: str) -> VAE:
    """The model the estimate decodes with: a copy whose conv decoder is a :class:`BlockDecoder`
    (or its own layers in bf16, where the rewrite does not apply), or ``model`` itself for a
    decoder without a faster path (the MLP presets, a Gaussian likelihood). The copy shares
    ``model``'s encoder and latent networks; ``model`` is not changed. ``fp32`` keeps the model's
    own dtype (float64 in the tests). Calls :func:`reuse_freed_memory` where it returns a copy."""
    weight = next(model.parameters())
    lower = resolve(precision, weight.device) == "bf16"
    if not isinstance(model.decoder, ConvDecoder) or model.arch.likelihood != "bernoulli":
        return model
    if not _rewritable(model.decoder) and not lower:
        return model
    dtype = torch.bfloat16 if lower else weight.dtype
    if _rewritable(model.decoder):
        decoder: nn.Module = BlockDecoder(model.decoder, dtype)
    else:
        decoder = copy.deepcopy(model.decoder)
        decoder.head.to(dtype)
        decoder.body.to(dtype)
    reuse_freed_memory()
    fast = copy.copy(model)  # the same encoder and latent networks, another decoder
    fast._modules = {**model._modules, "decoder": decoder.eval()}
    return fast


def precision_of(model: VAE) -> Literal["fp32", "bf16"]:
    """The precision ``model``'s decoder computes in: what :func:`for_estimate` gave it."""
    return "bf16" if any(p.dtype == torch.bfloat16 for p in model.decoder.parameters()) else "fp32"
