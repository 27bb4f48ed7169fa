"""The variational autoencoder and the terms of its objective.

Three presets share every line below; only their networks (:mod:`mnist_vae.networks`) differ.
``seed`` is the tutorial's model: ReLU MLPs, an encoder whose second half is a raw sigma and a
squared-error likelihood, its loss scaled per pixel. ``mlp`` is a nonlinear MLP and ``conv`` (the
default) a convolutional network (stride-2 convolutions, residual blocks only if ``model.blocks`` asks,
none by default, and a dense layer); both have a log-variance head and a Bernoulli
likelihood on logits, their loss the negative ELBO in nats per image (Kingma & Welling 2014, eq. 10
and appendix B). Every model takes and returns flat (..., 784) images, so the trainer, the estimators
and serving never see the difference.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from mnist_vae.atomic import atomic_write
from mnist_vae.config import ModelConfig
from mnist_vae.errors import UserError
from mnist_vae.networks import N_PIXELS, Architecture, ConvDecoder, ConvEncoder, mlp

# Floor under the decoder's pixel probabilities where the seed model's unbounded output is read as a
# Bernoulli mean; without it a single pixel outside (0, 1) makes the BCE infinite.
_PROB_FLOOR = 1e-4
# Bounds on the mean pixel that starts the output bias (a logit of -6.9 to 6.9): the border pixels
# of MNIST are 0 in every image.
_MEAN_FLOOR = 1e-3


class ModelFileError(UserError):
    """A model file is missing or is not one that :func:`save_model` wrote."""


class VAE(nn.Module):
    """A VAE with a diagonal Gaussian posterior and a standard normal prior, on flat images."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        if arch.kind == "conv":
            self.encoder: nn.Module = ConvEncoder(arch)
            self.decoder: nn.Module = ConvDecoder(arch)
            # Channels-last lets oneDNN run the convolutions without reordering every batch:
            # 1.2-1.3x faster training on a 2-core CPU; on CUDA cuDNN prefers it as well.
            self.to(memory_format=torch.channels_last)
        else:
            self.encoder = mlp([N_PIXELS, *arch.hidden, 2 * arch.latent], arch.activation)
            self.decoder = mlp([arch.latent, *reversed(arch.hidden), N_PIXELS], arch.activation)

    @property
    def latent_dim(self) -> int:
        return self.arch.latent

    @property
    def loss_scale(self) -> float:
        """What the summed per-image loss is divided by: pixels for the seed, 1 (nats) otherwise."""
        return float(N_PIXELS) if self.arch.likelihood == "gaussian" else 1.0

    @torch.no_grad()
    def start_at_mean(self, images: torch.Tensor) -> None:
        """Sets the conv decoder's per-pixel output bias to the logit of ``images``' mean grey
        level (uint8, (N, 784)); other networks are left as they are.

        The decoder then starts at the average digit instead of grey everywhere: at 12 epochs the
        conv default's validation negative ELBO was 1.2 nats lower than with a zero start.
        """
        bias = getattr(self.decoder, "pixel_bias", None)
        if bias is None:
            return
        mean = images.sum(0, dtype=torch.float64) / (255.0 * len(images))
        mean = mean.clamp(_MEAN_FLOOR, 1.0 - _MEAN_FLOOR)
        bias.copy_(torch.log(mean) - torch.log1p(-mean))

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
    ckpt = _read_weights_only(path, device)
    if not (isinstance(ckpt, dict) and {"architecture", "state_dict"} <= ckpt.keys()):
        what = f"a dict of {sorted(ckpt)}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ModelFileError(f"{path} is not a mnist-vae model: it holds {what}; {_EXPECTED}")
    try:
        model = VAE(Architecture.from_dict(ckpt["architecture"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a foreign or damaged state
        raise ModelFileError(
            f"{path} is not a mnist-vae model: its architecture or weights do not fit "
            f"({type(exc).__name__}: {_first_line(exc)}); {_EXPECTED}"
        ) from None
    return model.to(device).eval()


_EXPECTED = (
    "expected the weights file that mnist-vae writes (models/model.pt: 'architecture' and 'state_dict')"
)


def _read_weights_only(path: Path, device: str | torch.device) -> object:
    """``torch.load`` of tensors and plain containers only, its failures said in our words.

    torch's own message for a file holding other objects advises loading it with
    ``weights_only=False``, which runs whatever code the file carries: it never reaches the user.
    """
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a mnist-vae model: it is not a torch zip archive (or a truncated one); "
            f"{_EXPECTED}"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelFileError(
            f"{path} is not a mnist-vae model: it holds objects other than tensors and plain "
            f"containers, which are never unpickled; {_EXPECTED}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError):
        raise ModelFileError(
            f"{path} is not a mnist-vae model: a damaged torch archive; {_EXPECTED}"
        ) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
