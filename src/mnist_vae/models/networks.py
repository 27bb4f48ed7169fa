"""The networks of the presets and what rebuilds them: :class:`Architecture`, the MLP of ``seed``
and ``mlp``, and the convolutional encoder and decoder of ``conv``.

Every network takes and returns flat (..., features) tensors; :class:`mnist_vae.models.vae.VAE` puts an
encoder and a decoder together.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from mnist_vae.config import ModelConfig

N_PIXELS = 28 * 28

Likelihood = Literal["bernoulli", "gaussian"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a :class:`VAE`; saved beside its weights.

    ``kind`` mlp uses ``hidden``; conv uses ``channels``, ``blocks``, ``dense`` and
    ``pixel_bias``; hvae (:class:`mnist_vae.models.hvae.HVAE`) those of conv (or, without
    ``channels``, mlp's ``hidden``) for its image-side networks, plus ``latent2`` and ``hidden2``.
    Files written before the conv preset existed lack the conv keys and load as mlp;
    conv files written before ``pixel_bias`` existed load without it.
    """

    hidden: tuple[int, ...]
    latent: int
    activation: str | None
    likelihood: Likelihood
    sigma_head: bool
    kind: Literal["mlp", "conv", "hvae"] = "mlp"
    channels: tuple[int, ...] = ()
    blocks: int = 0
    dense: int = 0
    pixel_bias: bool = False  # conv: a learned bias per output pixel on the decoder's logits
    latent2: int = 0  # hvae: units of the top latent layer z2 (``latent`` is z1's)
    hidden2: int = 0  # hvae: width of the layers between z2 and the rest

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Architecture:
        return cls(
            **{**values, "hidden": tuple(values["hidden"]), "channels": tuple(values.get("channels", ()))}
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Architecture:
        if cfg.preset == "seed":
            # The tutorial: Linear 784-256-64-20 (mu and sigma, 10 each), Linear 10-64-256-784,
            # ReLU between hidden layers, raw output compared to the pixels by MSE. (A purely
            # linear version levels off at a loss of 0.0512, above the tutorial's 0.0477.)
            return cls(hidden=(256, 64), latent=10, activation="relu", likelihood="gaussian", sigma_head=True)
        if cfg.preset in ("conv", "hvae"):
            hvae = cfg.preset == "hvae"
            return cls(
                hidden=(),
                latent=cfg.latent,
                activation=cfg.activation,
                likelihood="bernoulli",
                sigma_head=False,
                kind="hvae" if hvae else "conv",
                channels=cfg.channels,
                blocks=cfg.blocks,
                dense=cfg.dense,
                pixel_bias=True,
                latent2=cfg.latent2 if hvae else 0,
                hidden2=cfg.hidden2 if hvae else 0,
            )
        return cls(
            hidden=cfg.hidden,
            latent=cfg.latent,
            activation=cfg.activation,
            likelihood="bernoulli",
            sigma_head=False,
        )


def mlp(widths: list[int], activation: str | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if activation is not None and i < len(widths) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    """``x + conv(act(conv(act(x))))`` at constant width and size (He et al. 2016, pre-activation).

    The second convolution starts at zero, so each block begins as the identity and a deeper
    network trains as stably as a shallow one.
    """

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        act = _ACTIVATIONS[activation]
        first = nn.Conv2d(channels, channels, 3, padding=1)
        last = nn.Conv2d(channels, channels, 3, padding=1)
        assert last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(act(), first, act(), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _conv_activation(arch: Architecture) -> str:
    assert arch.activation is not None, "the conv preset needs an activation"
    return arch.activation


@functools.cache
def _phase_index(device: torch.device) -> torch.Tensor:
    """Where each pixel of :meth:`ConvDecoder.phase_logits`' order is in a flat image: one gather
    puts a batch in that order, 5x faster than the same permutation as a strided copy."""
    with torch.inference_mode(False):  # a normal tensor, which autograd may save, wherever made
        return torch.arange(N_PIXELS, device=device).reshape(14, 2, 14, 2).transpose(1, 2).reshape(N_PIXELS)


def _side(arch: Architecture) -> int:
    """Height and width of the last convolution stage: 28 halved once per stage (14 or 7)."""
    return 28 >> len(arch.channels)


def conv_trunk(arch: Architecture) -> tuple[list[nn.Module], int]:
    """The convolutional encoder up to its last hidden layer: the layers and their output width."""
    activation = _conv_activation(arch)
    act = _ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    width = 1
    for channels in arch.channels:
        layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), act()]
        layers += [_Residual(channels, activation) for _ in range(arch.blocks)]
        width = channels
    features = width * _side(arch) ** 2
    layers.append(nn.Flatten())
    if arch.blocks:  # the last block ends on a convolution: activate before the dense layer
        layers.append(act())
    if arch.dense:
        layers += [nn.Linear(features, arch.dense), act()]
        features = arch.dense
    return layers, features


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Flat (..., 784) images as a channels-last (N, 1, 28, 28) batch for the convolutions."""
    return x.reshape(-1, 1, 28, 28).contiguous(memory_format=torch.channels_last)


class ConvEncoder(nn.Module):
    """(B, 784) -> (B, 2 * latent): stride-2 convolutions, each followed by ``blocks`` residual blocks
    (none by default), then an optional dense layer."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        layers, features = conv_trunk(arch)
        layers.append(nn.Linear(features, 2 * arch.latent))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(as_images(x)).reshape(*x.shape[:-1], -1)


class ConvDecoder(nn.Module):
    """(..., latent) -> (..., 784) logits: the encoder mirrored (its optional dense layer and ``blocks``
    residual blocks included), upsampling by transposed convolutions, the last one sub-pixel, plus a
    bias per pixel when ``pixel_bias`` is set.

    A convolution's bias is the same at every position, while MNIST's pixels are not: the border
    is always blank, the centre often ink. The MLP's last linear layer has a bias per pixel; this
    gives the conv decoder one too (:meth:`mnist_vae.models.vae.VAE.start_at_mean` sets it to the
    training images' mean at the start of training).
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        activation = _conv_activation(arch)
        act = _ACTIVATIONS[activation]
        widths = list(reversed(arch.channels))
        side = _side(arch)
        head: list[nn.Module] = []
        features = arch.latent
        if arch.dense:
            head += [nn.Linear(features, arch.dense), act()]
            features = arch.dense
        head += [nn.Linear(features, widths[0] * side * side), act()]
        self.head = nn.Sequential(*head)
        self.shape = (widths[0], side, side)
        body: list[nn.Module] = []
        for i, channels in enumerate(widths):
            body += [_Residual(channels, activation) for _ in range(arch.blocks)]
            if arch.blocks:
                body.append(act())
            out = widths[i + 1] if i + 1 < len(widths) else 1
            if out == 1:
                # The last layer, to one channel of logits, upsamples sub-pixel (Shi et al. 2016):
                # a 3x3 convolution to 4 channels, each group of 4 becoming a 2x2 block. A
                # transposed convolution to one channel is the decoder's slowest layer on a CPU;
                # this runs 2-2.6x faster and also covers every output pixel evenly.
                body += [nn.Conv2d(channels, 4, 3, padding=1), nn.PixelShuffle(2)]
            else:
                # Kernel 4, stride 2, padding 1 doubles the side exactly and covers every output
                # pixel evenly (no checkerboard from uneven overlap).
                body += [nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1), act()]
        self.body = nn.Sequential(*body)
        self.pixel_bias = nn.Parameter(torch.zeros(N_PIXELS)) if arch.pixel_bias else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self.shape)
        h = self.body(h.contiguous(memory_format=torch.channels_last))
        logits = h.reshape(*z.shape[:-1], N_PIXELS)
        return logits if self.pixel_bias is None else logits + self.pixel_bias

    @staticmethod
    def to_phase_order(images: torch.Tensor) -> torch.Tensor:
        """Flat (..., 784) images with their pixels in :meth:`phase_logits`' order: pixel
        (2i + a, 2j + b) at ((i * 14 + j) * 2 + a) * 2 + b, the 2x2 block of each position together.
        """
        return images.index_select(-1, _phase_index(images.device))

    def phase_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The logits of :meth:`forward`, pixels in the order of :meth:`to_phase_order`.

        The last convolution writes each position's 2x2 block as 4 channels, and a channels-last
        batch already holds them in this order: without the pixel shuffle, that rearranges every
        decoded image, a sum over the pixels (the Bernoulli log-likelihood) costs one
        rearrangement of the images it is compared with, made once for all their draws.
        """
        assert isinstance(self.body[-1], nn.PixelShuffle), "the last layer upsamples sub-pixel"
        # The layers may hold another dtype than z (bfloat16 in :func:`.estimate.for_estimate`):
        # they compute in theirs, the logits come back in z's, the pixel bias added in that.
        dtype = cast(nn.Linear, self.head[0]).weight.dtype
        h = self.head(z.reshape(-1, z.shape[-1]).to(dtype)).reshape(-1, *self.shape)
        h = self.body[:-1](h.contiguous(memory_format=torch.channels_last))
        logits = h.permute(0, 2, 3, 1).reshape(*z.shape[:-1], N_PIXELS).to(z.dtype)
        return logits if self.pixel_bias is None else logits + self.to_phase_order(self.pixel_bias)
