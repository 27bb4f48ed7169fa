"""The mathematics of :mod:`mnist_vae.models.objectives`, checked against independent references.

- every term of the ELBO and of the importance weights against ``torch.distributions`` (Normal,
  Bernoulli) on a tiny MLP VAE with random weights, at the same draws, to 1e-5;
- the importance-weighted estimator against the exact log p(x) of a model with a one-dimensional
  latent, found by numerical integration on a fine grid: it tightens towards log p(x) as k grows,
  and at k = 1 its mean is the ELBO;
- the seed preset's per-pixel scaling against the tutorial's own formula, computed from the raw
  encoder output.

Models run in float64 so that the references agree to rounding; a dropped term or a flipped sign
moves every comparison by far more than its tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal
from torch.distributions import kl_divergence as torch_kl

from mnist_vae.config import ModelConfig
from mnist_vae.models.families import build_model
from mnist_vae.models.networks import N_PIXELS, Architecture
from mnist_vae.models.objectives import (
    bernoulli_nll,
    elbo_terms,
    iw_bound,
    iw_log_likelihood,
    kl_divergence,
    kl_per_unit,
    log_importance_weights,
    neg_elbo,
    posterior_log_prob,
    posterior_sample,
    reconstruction_nll,
    standard_normal_log_prob,
    training_loss,
)
from mnist_vae.models.vae import VAE

F64 = torch.float64
TOL = 1e-5  # absolute, in nats: what the issue asks of the torch.distributions comparisons


def assert_close(got: torch.Tensor, want: torch.Tensor, *, rtol: float, atol: float) -> None:
    """``|got - want| <= atol + rtol |want|`` elementwise, shapes equal. (torch.testing.assert_close
    would do, but its first call imports sympy, half a second of this file's budget.)"""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got - want).abs()
    worst = int(diff.argmax())
    assert bool((diff <= atol + rtol * want.abs()).all()), (
        f"got {got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r} "
        f"(|diff| {diff.max().item():.3g}; allowed {atol:g} + {rtol:g} |want|)"
    )


def tiny_vae(latent: int, seed: int = 0) -> VAE:
    """An MLP VAE 784-8-(2 latent) / latent-8-784 with tanh and Bernoulli logits, random weights, float64."""
    torch.manual_seed(seed)
    arch = Architecture(
        hidden=(8,), latent=latent, activation="tanh", likelihood="bernoulli", sigma_head=False
    )
    return VAE(arch).to(F64)


def images(n: int, binary: bool, seed: int) -> torch.Tensor:
    """``n`` random flat images: pixels 0 or 1, or grey levels uniform in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    grey = torch.rand(n, N_PIXELS, generator=gen, dtype=F64)
    return torch.bernoulli(grey, generator=gen) if binary else grey


def normal_draws(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z) summed over pixels by torch.distributions. Its support check accepts only 0 and 1,
    so it is switched off for grey levels, where the same formula is the likelihood being measured."""
    return Bernoulli(logits=logits, validate_args=False).log_prob(x.expand_as(logits)).sum(-1)


def reference_log_weights(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """log p(x | z) + log p(z) - log q(z | x), each density from torch.distributions."""
    prior = Normal(torch.zeros_like(mu), torch.ones_like(sigma))
    return bernoulli_log_prob(logits, x) + prior.log_prob(z).sum(-1) - Normal(mu, sigma).log_prob(z).sum(-1)


# ---------------------------------------------------------------------------------------------------
# The ELBO and the importance weights against torch.distributions, at the same draws
# ---------------------------------------------------------------------------------------------------


def test_kl_matches_torch_distributions() -> None:
    """kl_per_unit and kl_divergence equal torch's closed-form KL(N(mu, sigma^2) || N(0, 1)), per unit
    and summed, over a wide range of means and variances."""
    mu = 3.0 * normal_draws(5, 4, seed=1)
    logvar = 2.0 * normal_draws(5, 4, seed=2)
    want = torch_kl(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    assert_close(kl_per_unit(mu, logvar), want, rtol=0, atol=TOL)
    assert_close(kl_divergence(mu, logvar), want.sum(-1), rtol=0, atol=TOL)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
def test_neg_elbo_matches_torch_distributions(binary: bool) -> None:
    """neg_elbo and elbo_terms equal -log Bernoulli(x; decoder(z)) + KL(q || N(0, 1)) with
    z = mu + sigma * eps at the same eps: the reconstruction term, the KL term, their sum and the
    decoder output."""
    model = tiny_vae(latent=3)
    x = images(6, binary, seed=3)
    eps = normal_draws(6, 3, seed=4)
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        sigma = (0.5 * logvar).exp()
        z = mu + sigma * eps
        logits = model.decoder(z)
        want_recon = -bernoulli_log_prob(logits, x)
        want_kl = torch_kl(Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)

        terms = elbo_terms(model, x, eps)
        got = neg_elbo(model, x, eps)
    assert_close(posterior_sample(mu, logvar, eps), z, rtol=0, atol=1e-12)
    assert_close(terms.out, logits, rtol=0, atol=1e-12)
    assert_close(terms.recon, want_recon, rtol=0, atol=TOL)
    assert_close(reconstruction_nll(model, logits, x), want_recon, rtol=0, atol=TOL)
    assert_close(terms.kl, want_kl, rtol=0, atol=TOL)
    assert_close(terms.neg_elbo, want_recon + want_kl, rtol=0, atol=TOL)
    assert_close(got, want_recon + want_kl, rtol=0, atol=TOL)


def test_log_densities_match_torch_distributions() -> None:
    """standard_normal_log_prob is log N(z; 0, I) and posterior_log_prob(eps, logvar) is
    log N(mu + sigma * eps; mu, sigma^2), both summed over units, with a leading dimension of k draws."""
    mu = normal_draws(3, 4, seed=5)
    logvar = normal_draws(3, 4, seed=6)
    sigma = (0.5 * logvar).exp()
    eps = normal_draws(7, 3, 4, seed=7)
    z = mu + sigma * eps
    prior = Normal(torch.zeros_like(z), torch.ones_like(z))
    assert_close(standard_normal_log_prob(z), prior.log_prob(z).sum(-1), rtol=0, atol=TOL)
    assert_close(posterior_log_prob(eps, logvar), Normal(mu, sigma).log_prob(z).sum(-1), rtol=0, atol=TOL)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
def test_log_importance_weights_match_torch_distributions(binary: bool) -> None:
    """For k = 5 draws per image, log_importance_weights equals log Bernoulli(x; decoder(z))
    + log N(z; 0, I) - log N(z; mu, sigma^2), and the Bernoulli term alone is bernoulli_nll's negative."""
    model = tiny_vae(latent=3)
    x = images(4, binary, seed=8)
    eps = normal_draws(5, 4, 3, seed=9)
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        sigma = (0.5 * logvar).exp()
        z = mu + sigma * eps
        logits = model.decoder(z)
        got = log_importance_weights(model, x, model.draw((mu, logvar), eps))
    assert got.shape == (5, 4)
    assert_close(-bernoulli_nll(logits, x), bernoulli_log_prob(logits, x), rtol=0, atol=TOL)
    assert_close(got, reference_log_weights(logits, x, mu, sigma, z), rtol=0, atol=TOL)


def test_iw_bound_is_the_log_of_the_mean_weight() -> None:
    """iw_bound is log((1/k) sum_i exp(log w_i)), computed here by exponentiating directly; k equal
    weights give back that weight."""
    log_w = 3.0 * normal_draws(6, 5, seed=10)
    assert_close(iw_bound(log_w), log_w.exp().mean(0).log(), rtol=0, atol=1e-10)
    same = torch.full((9, 2), -523.25, dtype=F64)
    assert_close(iw_bound(same), same[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk_rows", [1 << 16, 12, 1], ids=["one-chunk", "chunks-of-3", "chunks-of-1"])
def test_iw_log_likelihood_matches_torch_distributions_at_its_draws(chunk_rows: int) -> None:
    """iw_log_likelihood(k=8) equals log((1/k) sum_i w_i) of torch.distributions' weights at the draws
    it makes: one ``torch.randn(chunk, B, latent)`` per chunk of ``max(1, chunk_rows // B)`` samples,
    reproduced here after re-seeding (the last chunk of 3-sample chunks is short).

    The same seed with another chunking is not compared: torch's CPU generator fills a tensor of 16
    or more numbers in blocks of 16, so one call of (8, 4, 3) and two of (4, 4, 3) draw different
    numbers. The log weights are stored in float32 whatever the model's dtype, hence the relative
    tolerance (1e-6 of ~540 nats is 5e-4, far below what any dropped term moves).
    """
    model = tiny_vae(latent=3)
    x = images(4, binary=True, seed=11)
    k = 8
    torch.manual_seed(12)
    got = iw_log_likelihood(model, x, k, chunk_rows=chunk_rows)

    torch.manual_seed(12)
    chunk = max(1, chunk_rows // len(x))
    eps = torch.cat(
        [torch.randn(min(chunk, k - start), len(x), 3, dtype=F64) for start in range(0, k, chunk)]
    )
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        sigma = (0.5 * logvar).exp()
        z = mu + sigma * eps
        log_w = reference_log_weights(model.decoder(z), x, mu, sigma, z)
    want = torch.logsumexp(log_w, 0) - math.log(k)
    assert got.shape == (4,)
    assert_close(got.to(F64), want, rtol=1e-6, atol=TOL)


@pytest.mark.parametrize("k", [1, 5])
def test_training_loss_is_the_negative_bound_for_bernoulli_models(k: int) -> None:
    """For a Bernoulli model, training_loss's ``loss`` is the batch mean of the negative ELBO at k = 1
    and of minus the importance-weighted bound at k = 5, both from torch.distributions at the draws
    VAE.forward makes (one ``torch.randn`` of (B, latent), or (k, B, latent))."""
    model = tiny_vae(latent=3)
    x = images(4, binary=False, seed=13)
    torch.manual_seed(14)
    with torch.no_grad():
        terms = training_loss(model, x, iw_samples=k)

    torch.manual_seed(14)
    eps = torch.randn(*(() if k == 1 else (k,)), len(x), 3, dtype=F64)
    with torch.no_grad():
        mu, logvar = model.encoder(x).chunk(2, dim=-1)
        sigma = (0.5 * logvar).exp()
        z = mu + sigma * eps
        logits = model.decoder(z)
    if k == 1:
        kl = torch_kl(Normal(mu, sigma), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)
        want = (-bernoulli_log_prob(logits, x) + kl).mean()
    else:
        log_w = reference_log_weights(logits, x, mu, sigma, z)
        want = -(torch.logsumexp(log_w, 0) - math.log(k)).mean()
    assert_close(terms.loss, want, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------------
# The estimator against the exact marginal likelihood of a model with a one-dimensional latent
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    """A 1-D latent model, a few images, and their exact log p(x) and ELBO by numerical integration."""

    model: VAE
    x: torch.Tensor  # (B, 784)
    log_px: torch.Tensor  # (B,)
    elbo: torch.Tensor  # (B,) E_q[log p(x | z)] - KL(q || p)


def _trapezoid_log_weights(grid: torch.Tensor) -> torch.Tensor:
    """log of the trapezoid rule's weights on an evenly spaced grid."""
    w = torch.full_like(grid, float(grid[1] - grid[0]))
    w[[0, -1]] /= 2
    return w.log()


@pytest.fixture(scope="module")
def exact() -> Exact:
    """Three images: two drawn from the model's own Bernoulli likelihood at prior draws of z (so each
    has a posterior of its own) and one grey, the model's mean image at another draw.

    log p(x | z) on the grid is written as ``x . logits - sum softplus(logits)``, a formula independent
    of the module's; the grid spans [-10, 10] in steps of 0.0025, fine against posteriors whose
    standard deviations are 0.25 or more, and the prior's mass outside is below 1e-22.
    """
    model = tiny_vae(latent=1, seed=20)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        means = torch.sigmoid(model.decoder(torch.randn(3, 1, generator=gen, dtype=F64)))
        x = torch.cat([torch.bernoulli(means[:2], generator=gen), means[2:]])

        z = torch.linspace(-10.0, 10.0, 8001, dtype=F64)
        logits = model.decoder(z[:, None])  # (n, 784)
        log_lik = logits @ x.T - F.softplus(logits).sum(-1, keepdim=True)  # (n, B)
        log_dz = _trapezoid_log_weights(z)[:, None]
        log_prior = Normal(0.0, 1.0).log_prob(z)[:, None]
        log_px = torch.logsumexp(log_lik + log_prior + log_dz, 0)

        mu, logvar = model.encoder(x).chunk(2, dim=-1)  # (B, 1)
        q = Normal(mu.T, (0.5 * logvar).exp().T)  # batch shape (1, B) against the grid's (n, 1)
        q_mass = (q.log_prob(z[:, None]) + log_dz).exp()
        assert_close(q_mass.sum(0), torch.ones(3, dtype=F64), rtol=0, atol=1e-9)
        expected_log_lik = (q_mass * log_lik).sum(0)
        kl = torch_kl(q, Normal(0.0, 1.0)).squeeze(0)
        elbo = expected_log_lik - kl
    # The ELBO's gap to log p(x) is KL(q || p(z | x)) >= 0; with random encoder weights it is large.
    assert (elbo < log_px - 0.1).all(), (elbo, log_px)
    return Exact(model=model, x=x, log_px=log_px, elbo=elbo)


def _mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over the first dimension."""
    return values.mean(0), values.std(0) / math.sqrt(len(values))


def test_iw_estimate_at_k1_has_the_elbo_as_its_mean(exact: Exact) -> None:
    """At k = 1 the estimate's mean over its draw is the exact ELBO: by quadrature over eps (the mean of
    log_importance_weights and of -neg_elbo at a grid of draws, to 1e-6), and by Monte Carlo
    (iw_log_likelihood's own random draws, within 4 standard errors)."""
    model, x = exact.model, exact.x
    eps = torch.linspace(-9.0, 9.0, 1201, dtype=F64)
    log_weight = (Normal(0.0, 1.0).log_prob(eps) + _trapezoid_log_weights(eps))[:, None]
    with torch.no_grad():
        mu, logvar = model.encode(x)
        draws = eps[:, None, None].expand(-1, len(x), 1)  # (n, B, 1)
        log_w = log_importance_weights(model, x, model.draw((mu, logvar), draws))  # (n, B)
        minus_neg_elbo = -neg_elbo(model, x.expand(len(eps), -1, -1), draws)
    assert_close((log_weight.exp() * log_w).sum(0), exact.elbo, rtol=0, atol=1e-6)
    assert_close((log_weight.exp() * minus_neg_elbo).sum(0), exact.elbo, rtol=0, atol=1e-6)

    n = 2000
    torch.manual_seed(22)
    estimates = iw_log_likelihood(model, x.repeat(n, 1), 1).reshape(n, len(x)).to(F64)
    mean, se = _mean_and_se(estimates)
    assert (se < 0.5).all(), se  # sharp enough that a misplaced prior or log k shows
    assert ((mean - exact.elbo).abs() < 4 * se).all(), (mean, exact.elbo, se)


def test_iw_estimate_tightens_towards_exact_log_likelihood(
    exact: Exact, assert_iw_tightens: Callable[..., None]
) -> None:
    """The gap log p(x) - estimate, averaged over images and repeated draws, falls from k = 1 to 10 to
    100 by more than 3 standard errors at each step, is never below -4 standard errors (the estimate
    is a lower bound on average; 4 rather than 3 as the error is itself estimated from as few as 10
    repeats of a skewed estimator), and at k = 1000 is within 0.05 nats of zero."""
    model, x = exact.model, exact.x
    assert_iw_tightens(model, x, exact.log_px, {1: 500, 10: 600, 100: 60, 1000: 10}, seed=23)


# ---------------------------------------------------------------------------------------------------
# The seed preset's per-pixel scaling against the tutorial's formula
# ---------------------------------------------------------------------------------------------------


def test_seed_training_loss_is_the_tutorials_per_pixel_loss() -> None:
    """For the seed preset, training_loss is the tutorial's ``MSE(mean) + KL / (batch * 784)``, with
    the KL ``-0.5 sum(1 + log(1e-8 + sigma^2) - mu^2 - sigma^2)`` over the batch and mu and sigma
    the two raw halves of the encoder's output, at the same draw eps as VAE.forward's.

    The model reads sigma's magnitude (its log-variance is log(1e-8 + sigma^2)), so the reference
    draw is mu + |sigma| eps: the tutorial's mu + sigma eps in law, as eps is symmetric.
    """
    model = build_model(ModelConfig(preset="seed"), seed=30).to(F64)
    assert model.arch.likelihood == "gaussian" and model.arch.sigma_head
    x = images(5, binary=False, seed=31)
    torch.manual_seed(32)
    with torch.no_grad():
        terms = training_loss(model, x)

    latent = model.arch.latent
    torch.manual_seed(32)
    eps = torch.randn(len(x), latent, dtype=F64)
    with torch.no_grad():
        mu, sigma = model.encoder(x).split(latent, dim=-1)
        mean = model.decoder(mu + sigma.abs() * eps)
    kl = -0.5 * (1 + torch.log(1e-8 + sigma.square()) - mu.square() - sigma.square()).sum()
    mse = F.mse_loss(mean, x, reduction="mean")
    want = mse + kl / (len(x) * N_PIXELS)
    # Both terms must weigh in for the check to tell a per-pixel KL from one per image or unscaled.
    assert kl / (len(x) * N_PIXELS) > 0.01 * mse, (float(kl), float(mse))
    assert_close(terms.loss, want, rtol=1e-9, atol=0)
    # exp(logvar) is 1e-8 + sigma^2 where the tutorial has sigma^2: 5e-9 nats per unit apart.
    assert_close(terms.kl.sum(), kl, rtol=0, atol=1e-6)
