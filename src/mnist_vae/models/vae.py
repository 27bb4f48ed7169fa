"""The variational autoencoder: an encoder and a decoder around a diagonal Gaussian latent.

Three presets share every line below; only their networks (:mod:`.networks`) differ. ``seed`` is
the tutorial's model: ReLU MLPs, an encoder whose second half is a raw sigma and a squared-error
likelihood, its loss scaled per pixel. ``mlp`` is a nonlinear MLP and ``conv`` (the default) a
convolutional network (stride-2 convolutions, residual blocks only if ``model.blocks`` asks, none by
default, and a dense layer); both have a log-variance head and a Bernoulli likelihood on logits,
their loss the negative ELBO in nats per image (Kingma & Welling 2014, eq. 10 and appendix B). Every
model takes and returns flat (..., 784) images, so the trainer, the estimators and serving never see
the difference. What a model is trained and measured by lives in :mod:`.objectives`.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from torch import nn

from mnist_vae.models.networks import N_PIXELS, Architecture, ConvDecoder, ConvEncoder, mlp
from mnist_vae.models.objectives import (
    Draw,
    Latents,
    kl_divergence,
    kl_per_unit,
    posterior_log_prob,
    posterior_sample,
    reconstruction_nll,
    standard_normal_log_prob,
    summed_bernoulli_nll,
)

# Rows decoded at once by likelihood_nll: small enough for each layer's output to stay in the
# CPU's caches. The binarized-conv estimate in batches of 100 images, 2 cores: 1024 rows 1.5x
# (FP32) and 1.4x (bf16) as fast as 4096; 512 rows no faster. The draws do not depend on it.
DECODE_ROWS = 1024


class _PhaseDecoder(Protocol):
    """A decoder whose logits come in its own pixel order, and the images put in that order."""

    def phase_logits(self, z: torch.Tensor) -> torch.Tensor: ...

    def to_phase_order(self, images: torch.Tensor) -> torch.Tensor: ...


# Bounds on the mean pixel that starts the output bias (a logit of -6.9 to 6.9): the border pixels
# of MNIST are 0 in every image.
_MEAN_FLOOR = 1e-3

__all__ = ["N_PIXELS", "VAE"]


class VAE(nn.Module):
    """A VAE with a diagonal Gaussian posterior and a standard normal prior, on flat images."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self._build(arch)

    def _build(self, arch: Architecture) -> None:
        """Makes the networks: :class:`mnist_vae.models.hvae.HVAE` has its own."""
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
        """Units of the code (:meth:`encode`, the served ``latent`` output)."""
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

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Returns the decoder's raw output: logits (Bernoulli) or pixel means (Gaussian)."""
        return self.decoder(z)

    @property
    def noise_dim(self) -> int:
        """Standard normal numbers per posterior draw (eps of :meth:`draw`)."""
        return self.arch.latent

    @property
    def layers(self) -> tuple[tuple[str, int], ...]:
        """The latent layers, each (name, units), the code of :meth:`encode` first."""
        return (("z", self.arch.latent),)

    def posterior(self, x: torch.Tensor) -> Any:
        """What the encoder says of images ``x``, computed once for any number of draws."""
        return self.encode(x)

    def latents(self, posterior: object, eps: torch.Tensor) -> Latents:
        """The draw ``z = mu + sigma * eps`` (eps (..., B, latent) may hold k draws per image), as
        the decoder's input, with its KL term and latent log ratio; nothing decoded yet."""
        mu, logvar = cast(tuple[torch.Tensor, torch.Tensor], posterior)
        z = posterior_sample(mu, logvar, eps)
        log_ratio = standard_normal_log_prob(z) - posterior_log_prob(eps, logvar)
        return Latents(
            decoder_input=z, kl=kl_divergence(mu, logvar).expand(eps.shape[:-1]), log_ratio=log_ratio
        )

    def draw(self, posterior: object, eps: torch.Tensor) -> Draw:
        """The draws of :meth:`latents`, decoded."""
        latents = self.latents(posterior, eps)
        return Draw(out=self.decoder(latents.decoder_input), kl=latents.kl, log_ratio=latents.log_ratio)

    def likelihood_nll(self, decoder_input: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats of images ``x`` (B, 784) at the decoder's inputs (..., B, inputs):
        the cost of the importance-weighted estimate, written for speed where the family allows.

        A conv decoder's logits are compared with the images in the decoder's own pixel order
        (:meth:`ConvDecoder.phase_logits`, or the :class:`~mnist_vae.models.estimate.BlockDecoder`
        of an estimate's copy): the same sum over the pixels, without rearranging each of the k
        draws' images, decoded about :data:`DECODE_ROWS` rows at a time; the Bernoulli sum is
        :func:`summed_bernoulli_nll`'s."""
        if self.arch.likelihood != "bernoulli":
            return reconstruction_nll(self, self.decoder(decoder_input), x)
        if not hasattr(self.decoder, "phase_logits"):
            return summed_bernoulli_nll(self.decoder(decoder_input), x)
        decoder = cast(_PhaseDecoder, self.decoder)
        target = decoder.to_phase_order(x)
        if decoder_input.dim() == target.dim():  # one draw per image: pieces of images
            pieces = zip(decoder_input.split(DECODE_ROWS), target.split(DECODE_ROWS), strict=True)
            return torch.cat([summed_bernoulli_nll(decoder.phase_logits(z), t) for z, t in pieces])
        draws = max(1, DECODE_ROWS // target[..., 0].numel())  # draws of every image per piece
        return torch.cat(
            [summed_bernoulli_nll(decoder.phase_logits(z), target) for z in decoder_input.split(draws)]
        )

    def log_weights(self, posterior: object, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x, z) - log q(z | x)`` of the draws eps (k, B, noise_dim): (k, B)."""
        latents = self.latents(posterior, eps)
        return latents.log_ratio - self.likelihood_nll(latents.decoder_input, x)

    def forward(self, x: torch.Tensor, samples: int = 1) -> Draw:
        """Encodes and draws: one draw per image, or with ``samples`` k > 1 a leading dimension of
        k draws. Training calls the model through this method (DistributedDataParallel needs it to).
        """
        posterior = self.posterior(x)
        shape = (*x.shape[:-1], self.noise_dim) if samples == 1 else (samples, *x.shape[:-1], self.noise_dim)
        return self.draw(posterior, torch.randn(shape, device=x.device, dtype=x.dtype))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output at the posterior mean of every latent layer: the reconstruction a
        user sees."""
        return self.decode(self.encode(x)[0])

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The decoder's output at ``n`` draws of the code from its prior."""
        dtype = next(self.parameters()).dtype
        return self.decode(torch.randn(n, self.arch.latent, generator=generator, device=device, dtype=dtype))

    def decode_layers(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """The decoder's output at a code of each latent layer, in the order of :attr:`layers`."""
        (z,) = codes
        return self.decode(z)

    def layer_posteriors(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each latent layer's posterior (mean, log-variance), in the order of :attr:`layers`."""
        return [self.encode(x)]

    def layer_kl(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's KL term per image, layer by layer: (B, units) each."""
        return [kl_per_unit(*self.encode(x))]

    def pixel_means(self, out: torch.Tensor) -> torch.Tensor:
        """Turns decoder output into grey levels in [0, 1]."""
        if self.arch.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out.clamp(0.0, 1.0)
