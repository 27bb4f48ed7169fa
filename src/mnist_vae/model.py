"""The variational autoencoder and the terms of its objective.

Three presets share every line below but the networks. ``seed`` is the tutorial's model: ReLU MLPs,
an encoder whose second half is a raw sigma and a squared-error likelihood, its loss scaled per pixel.
``mlp`` is a nonlinear MLP and ``conv`` (the default) a convolutional network with residual blocks;
both have a log-variance head and a Bernoulli likelihood on logits, their loss the negative ELBO in
nats per image (Kingma & Welling 2014, eq. 10 and appendix B). Every model takes and returns flat
(..., 784) images, so the trainer, the estimators and serving never see the difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from mnist_vae.atomic import atomic_write
from mnist_vae.config import ModelConfig
from mnist_vae.errors import UserError

N_PIXELS = 28 * 28
# Floor under the decoder's pixel probabilities where the seed model's unbounded output is read as a
# Bernoulli mean; without it a single pixel outside (0, 1) makes the BCE infinite.
_PROB_FLOOR = 1e-4

Likelihood = Literal["bernoulli", "gaussian"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}


class ModelFileError(UserError):
    """A model file is missing or is not one that :func:`save_model` wrote."""


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a :class:`VAE`; saved beside its weights.

    ``kind`` mlp uses ``hidden``; conv uses ``channels``, ``blocks`` and ``dense``. Files written
    before the conv preset existed lack the conv keys and load as mlp.
    """

    hidden: tuple[int, ...]
    latent: int
    activation: str | None
    likelihood: Likelihood
    sigma_head: bool
    kind: Literal["mlp", "conv"] = "mlp"
    channels: tuple[int, ...] = ()
    blocks: int = 0
    dense: int = 0

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
        if cfg.preset == "conv":
            return cls(
                hidden=(),
                latent=cfg.latent,
                activation=cfg.activation,
                likelihood="bernoulli",
                sigma_head=False,
                kind="conv",
                channels=cfg.channels,
                blocks=cfg.blocks,
                dense=cfg.dense,
            )
        return cls(
            hidden=cfg.hidden,
            latent=cfg.latent,
            activation=cfg.activation,
            likelihood="bernoulli",
            sigma_head=False,
        )


class VAE(nn.Module):
    """A VAE with a diagonal Gaussian posterior and a standard normal prior, on flat images."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        if arch.kind == "conv":
            self.encoder: nn.Module = _ConvEncoder(arch)
            self.decoder: nn.Module = _ConvDecoder(arch)
            # Channels-last lets oneDNN run the convolutions without reordering every batch:
            # 1.2-1.3x faster training on a 2-core CPU; on CUDA cuDNN prefers it as well.
            self.to(memory_format=torch.channels_last)
        else:
            self.encoder = _mlp([N_PIXELS, *arch.hidden, 2 * arch.latent], arch.activation)
            self.decoder = _mlp([arch.latent, *reversed(arch.hidden), N_PIXELS], arch.activation)

    @property
    def latent_dim(self) -> int:
        return self.arch.latent

    @property
    def loss_scale(self) -> float:
        """What the summed per-image loss is divided by: pixels for the seed, 1 (nats) otherwise."""
        return float(N_PIXELS) if self.arch.likelihood == "gaussian" else 1.0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the posterior's mean and log-variance for images ``x`` of shape (B, 784)."""
        mu, second = self.encoder(x).chunk(2, dim=-1)
        if self.arch.sigma_head:
            # The tutorial's head emits sigma itself and takes log(1e-8 + sigma^2) in its KL; the same
            # quantity as a log-variance keeps one reparameterisation and one KL for both presets.
            return mu, torch.log(1e-8 + second.square())
        return mu, second

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Draws z = mu + sigma * eps with eps ~ N(0, I), differentiable in mu and sigma."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Returns the decoder's raw output: logits (Bernoulli) or pixel means (Gaussian)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, samples: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encodes, draws z and decodes: returns (decoder output, mu, logvar, eps).

        With ``samples`` k > 1, eps and the output get a leading dimension of k posterior draws.
        """
        mu, logvar = self.encode(x)
        shape = mu.shape if samples == 1 else (samples, *mu.shape)
        eps = torch.randn(shape, device=mu.device, dtype=mu.dtype)
        return self.decode(mu + torch.exp(0.5 * logvar) * eps), mu, logvar, eps

    def pixel_means(self, out: torch.Tensor) -> torch.Tensor:
        """Turns decoder output into grey levels in [0, 1]."""
        if self.arch.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out.clamp(0.0, 1.0)

    def reconstruction_loss(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The training likelihood term per image: BCE in nats, or the tutorial's squared error."""
        if self.arch.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        return (out - x).square().sum(-1)

    def bernoulli_nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats per image under a Bernoulli likelihood on grey levels.

        This is the measure every preset is compared on; the seed's output is read as pixel
        probabilities, clamped away from 0 and 1.
        """
        if self.arch.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        p = out.clamp(_PROB_FLOOR, 1.0 - _PROB_FLOOR)
        return F.binary_cross_entropy(p, x, reduction="none").sum(-1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, in nats.

    Closed form of Kingma & Welling (2014), appendix B:
    ``-0.5 * sum(1 + log sigma^2 - mu^2 - sigma^2)``.
    """
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).sum(-1)


@dataclass
class LossTerms:
    """One batch's objective and its parts, per image unless named otherwise."""

    loss: torch.Tensor  # scalar that is minimised
    recon: torch.Tensor  # (B,) training likelihood term
    kl: torch.Tensor  # (B,) nats
    out: torch.Tensor  # (B, 784) decoder output


def loss_terms(model: nn.Module, x: torch.Tensor, iw_samples: int = 1) -> LossTerms:
    """The training objective of a batch: the negative ELBO, or the IWAE bound with k samples.

    For the default preset ``loss`` is the mean over the batch of BCE + KL (nats per image). For the
    seed it is the tutorial's ``MSE(mean) + KL / (batch * 784)``; both are ``mean(recon + kl) / scale``.
    With ``iw_samples`` k > 1 (Bernoulli likelihood only) it is minus the importance-weighted bound
    of Burda et al. (2015), eq. 8, which the ELBO equals at k = 1.

    ``model`` may be a :class:`VAE` or a DistributedDataParallel wrapper of one: the forward pass
    goes through ``model(...)`` so that DDP sees it.
    """
    vae = cast(VAE, getattr(model, "module", model))
    out, mu, logvar, eps = model(x, iw_samples)
    if iw_samples > 1:
        return _iwae_terms(vae, x, out, mu, logvar, eps)
    recon = vae.reconstruction_loss(out, x)
    kl = kl_divergence(mu, logvar)
    loss = (recon + kl).mean() / vae.loss_scale
    return LossTerms(loss=loss, recon=recon, kl=kl, out=out)


def _iwae_terms(
    model: VAE, x: torch.Tensor, out: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> LossTerms:
    assert model.arch.likelihood == "bernoulli", "the IWAE bound needs the Bernoulli likelihood"
    k = eps.shape[0]
    z = mu + torch.exp(0.5 * logvar) * eps  # (k, B, latent), the draws the decoder saw
    nll = F.binary_cross_entropy_with_logits(out, x.expand(k, -1, -1), reduction="none").sum(-1)
    log_w = -nll + _standard_normal_log_prob(z) - (_standard_normal_log_prob(eps) - 0.5 * logvar.sum(-1))
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return LossTerms(loss=-bound.mean(), recon=nll[0], kl=kl_divergence(mu, logvar), out=out[0])


@torch.no_grad()
def importance_weighted_log_likelihood(
    model: VAE, x: torch.Tensor, k: int, chunk_rows: int = 1 << 16
) -> torch.Tensor:
    """Estimates log p(x) per image with k importance samples (Burda et al. 2015, eq. 8).

    ``log (1/k) sum_i p(x | z_i) p(z_i) / q(z_i | x)`` with z_i ~ q(z | x); a lower bound that
    tightens as k grows and equals the ELBO's estimate at k = 1.
    """
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    log_w = torch.empty(k, x.shape[0], device=x.device)
    chunk = max(1, chunk_rows // x.shape[0])  # samples decoded at once, to bound memory
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), *mu.shape, device=x.device, dtype=mu.dtype)
        z = mu + std * eps
        log_px_z = -model.bernoulli_nll(model.decode(z), x.expand(len(eps), -1, -1))
        log_qz = _standard_normal_log_prob(eps) - 0.5 * logvar.sum(-1)
        log_w[start : start + len(eps)] = log_px_z + _standard_normal_log_prob(z) - log_qz
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)


def _mlp(widths: list[int], activation: str | None) -> nn.Sequential:
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


def _side(arch: Architecture) -> int:
    """Height and width of the last convolution stage: 28 halved once per stage (14 or 7)."""
    return 28 >> len(arch.channels)


class _ConvEncoder(nn.Module):
    """(B, 784) -> (B, 2 * latent): stride-2 convolutions, residual blocks, a dense layer."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
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
        layers.append(nn.Linear(features, 2 * arch.latent))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        return self.net(images).reshape(*x.shape[:-1], -1)


class _ConvDecoder(nn.Module):
    """(..., latent) -> (..., 784) logits: the encoder mirrored, upsampling by transposed
    convolutions, the last one sub-pixel."""

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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self.shape)
        h = self.body(h.contiguous(memory_format=torch.channels_last))
        return h.reshape(*z.shape[:-1], N_PIXELS)


def build_model(cfg: ModelConfig, seed: int | None = None) -> VAE:
    """Builds the VAE that ``model`` in params.yaml describes; ``seed`` fixes its initial weights."""
    if seed is not None:
        torch.manual_seed(seed)
    return VAE(Architecture.from_config(cfg))


def save_model(model: VAE, path: Path) -> None:
    """Saves weights and architecture, atomically (temp file, then rename)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda fh: torch.save({"architecture": model.arch.to_dict(), "state_dict": state}, fh))


def load_model(path: Path, device: str | torch.device = "cpu") -> VAE:
    """Loads a model saved by :func:`save_model` without unpickling arbitrary objects.

    Raises:
        ModelFileError: ``path`` does not exist or is not a model saved by :func:`save_model`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = VAE(Architecture.from_dict(ckpt["architecture"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # torch raises many types for a foreign file
        raise ModelFileError(
            f"{path}: not an mnist-vae checkpoint (expected a dict with 'architecture' and "
            f"'state_dict', saved by mnist_vae.model.save_model): {exc}"
        ) from None
    return model.to(device).eval()
