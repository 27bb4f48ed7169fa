"""The mathematics of the two-layer family (:mod:`mnist_vae.models.hvae`), checked as
tests/unit/test_objectives_math.py checks the one-layer VAE:

- the ELBO's terms and the importance weights against ``torch.distributions`` (Normal, Bernoulli) on
  a tiny float64 HVAE with random weights, at the same draws of both layers, to 1e-5;
- the importance-weighted estimator, which samples the whole hierarchy, against the exact log p(x)
  of a model with a one-dimensional latent in each layer, found by numerical integration over both
  on a grid: it tightens towards log p(x) as k grows, and at k = 1 its mean (and the negative
  ELBO's) is the exact ELBO, itself integrated on the grid.
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

from mnist_vae.models.hvae import HVAE
from mnist_vae.models.networks import N_PIXELS, Architecture
from mnist_vae.models.objectives import elbo_terms, iw_log_likelihood, log_importance_weights, neg_elbo

F64 = torch.float64
TOL = 1e-5


def tiny_hvae(latent: int, latent2: int, seed: int) -> HVAE:
    """An HVAE with MLPs 784-8 (image side), 8 units between the layers, tanh, float64."""
    torch.manual_seed(seed)
    arch = Architecture(
        hidden=(8,),
        latent=latent,
        activation="tanh",
        likelihood="bernoulli",
        sigma_head=False,
        kind="hvae",
        latent2=latent2,
        hidden2=8,
    )
    return HVAE(arch).to(F64).eval()


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return Bernoulli(logits=logits, validate_args=False).log_prob(x.expand_as(logits)).sum(-1)


@dataclass
class Reference:
    """One draw of both layers computed step by step, and its densities from torch.distributions."""

    logits: torch.Tensor
    log_w: torch.Tensor  # log p(x | z1, z2) + log p(z1 | z2) + log p(z2) - log q(z1 | x, z2) - log q(z2 | x)
    kl: torch.Tensor  # KL(q(z2 | x) || p(z2)) + KL(q(z1 | x, z2) || p(z1 | z2)) at the drawn z2


def reference(model: HVAE, x: torch.Tensor, eps: torch.Tensor) -> Reference:
    l2 = model.arch.latent2
    h = model.trunk(x)
    mu2, logvar2 = model.up(h).chunk(2, dim=-1)
    q2 = Normal(mu2, (0.5 * logvar2).exp())
    z2 = mu2 + q2.scale * eps[..., :l2]
    t = model.down(z2)
    mu_p, logvar_p = model.prior1(t).chunk(2, dim=-1)
    shift_mu, shift_logvar = (model.shift_h(h) + model.shift_t(t)).chunk(2, dim=-1)
    p1 = Normal(mu_p, (0.5 * logvar_p).exp())
    q1 = Normal(mu_p + shift_mu, (0.5 * (logvar_p + shift_logvar)).exp())
    z1 = q1.loc + q1.scale * eps[..., l2:]
    logits = model.decoder(torch.cat([z1, t], dim=-1))
    prior2 = Normal(torch.zeros_like(z2), torch.ones_like(z2))
    log_w = (
        bernoulli_log_prob(logits, x)
        + prior2.log_prob(z2).sum(-1)
        + p1.log_prob(z1).sum(-1)
        - q2.log_prob(z2).sum(-1)
        - q1.log_prob(z1).sum(-1)
    )
    kl = torch_kl(q2, Normal(torch.zeros_like(mu2), torch.ones_like(mu2))).sum(-1) + torch_kl(q1, p1).sum(-1)
    return Reference(logits=logits, log_w=log_w, kl=kl)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "grey"])
def test_elbo_and_weights_match_torch_distributions(binary: bool) -> None:
    """For one draw per image, elbo_terms is -log Bernoulli(x; decoder) plus both layers' KL (the
    lower one against p(z1 | z2) at the drawn z2); for k = 5 draws, the log weights are the five
    densities of the hierarchy at the same draws."""
    model = tiny_hvae(latent=3, latent2=2, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, N_PIXELS, generator=gen, dtype=F64)
    x = torch.bernoulli(x, generator=gen) if binary else x
    eps = torch.randn(5, 4, model.noise_dim, generator=gen, dtype=F64)
    with torch.no_grad():
        ref_one = reference(model, x, eps[0])
        terms = elbo_terms(model, x, eps[0])
        assert torch.allclose(terms.out, ref_one.logits, rtol=0, atol=1e-12)
        assert torch.allclose(terms.recon, -bernoulli_log_prob(ref_one.logits, x), rtol=0, atol=TOL)
        assert torch.allclose(terms.kl, ref_one.kl, rtol=0, atol=TOL)
        assert torch.allclose(neg_elbo(model, x, eps[0]), terms.recon + ref_one.kl, rtol=0, atol=TOL)

        ref = reference(model, x, eps)
        got = log_importance_weights(model, x, model.draw(model.posterior(x), eps))
        assert got.shape == (5, 4)
        assert torch.allclose(got, ref.log_w, rtol=0, atol=TOL)
        assert torch.allclose(model.log_weights(model.posterior(x), eps, x), ref.log_w, rtol=0, atol=TOL)
    # Both layers carry weight in the comparison: the lower layer's KL is not negligible.
    assert (ref_one.kl > 0.01).all()


# ---------------------------------------------------------------------------------------------------
# The estimator against the exact marginal likelihood, one latent unit per layer
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    model: HVAE
    x: torch.Tensor  # (B, 784)
    log_px: torch.Tensor  # (B,)
    elbo: torch.Tensor  # (B,)


def _trapezoid(grid: torch.Tensor) -> torch.Tensor:
    """The trapezoid rule's weights on an evenly spaced grid."""
    w = torch.full_like(grid, float(grid[1] - grid[0]))
    w[[0, -1]] /= 2
    return w


@pytest.fixture(scope="module")
def exact() -> Exact:
    """Three images drawn from the model itself (ancestral draws of z2, z1, then the pixels), and
    their exact log p(x) and ELBO by the trapezoid rule over a 2-D grid: z2 in [-8, 8] (401 points),
    z1 in [-12, 12] (961 points).

    log p(x | z1, z2) is written as ``x . logits - sum softplus(logits)``, independent of the
    module's formula; the densities of both layers come from torch.distributions.
    """
    model = tiny_hvae(latent=1, latent2=1, seed=20)
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        logits = model.sample(3, generator=gen).to(F64)
        x = torch.bernoulli(torch.sigmoid(logits), generator=gen)

        z2 = torch.linspace(-8.0, 8.0, 401, dtype=F64)
        z1 = torch.linspace(-12.0, 12.0, 961, dtype=F64)
        w2, w1 = _trapezoid(z2), _trapezoid(z1)
        h = model.trunk(x)
        mu2, logvar2 = model.up(h).chunk(2, dim=-1)  # (B, 1)
        q2 = Normal(mu2.T, (0.5 * logvar2).exp().T)  # (1, B)
        log_joint = []  # per z2: log of the integral over z1 of p(x | z1, z2) p(z1 | z2), (B,)
        expected = []  # per z2: E_q(z1 | x, z2)[log p(x | z1, z2)] - KL(q(z1 | x, z2) || p(z1 | z2)), (B,)
        for value in z2:
            t = model.down(value.reshape(1, 1))  # (1, width)
            mu_p, logvar_p = model.prior1(t).chunk(2, dim=-1)
            p1 = Normal(mu_p.squeeze(), (0.5 * logvar_p).exp().squeeze())
            out = model.decoder(torch.cat([z1[:, None], t.expand(len(z1), -1)], dim=-1))  # (n1, 784)
            log_lik = out @ x.T - F.softplus(out).sum(-1, keepdim=True)  # (n1, B)
            log_joint.append(torch.logsumexp(log_lik + p1.log_prob(z1)[:, None] + w1.log()[:, None], 0))
            shift_mu, shift_logvar = (model.shift_h(h) + model.shift_t(t)).chunk(2, dim=-1)  # (B, 1)
            q1 = Normal((mu_p + shift_mu).T, (0.5 * (logvar_p + shift_logvar)).exp().T)  # (1, B)
            mass = q1.log_prob(z1[:, None]).exp() * w1[:, None]  # (n1, B)
            assert torch.allclose(mass.sum(0), torch.ones(3, dtype=F64), atol=1e-8)
            expected.append((mass * log_lik).sum(0) - torch_kl(q1, p1).squeeze(0))
        log_prior2 = Normal(0.0, 1.0).log_prob(z2)[:, None]
        log_px = torch.logsumexp(torch.stack(log_joint) + log_prior2 + w2.log()[:, None], 0)
        mass2 = q2.log_prob(z2[:, None]).exp() * w2[:, None]  # (n2, B)
        assert torch.allclose(mass2.sum(0), torch.ones(3, dtype=F64), atol=1e-8)
        kl2 = torch_kl(q2, Normal(0.0, 1.0)).squeeze(0)
        elbo = (mass2 * torch.stack(expected)).sum(0) - kl2
    assert (elbo < log_px - 0.05).all(), (elbo, log_px)
    return Exact(model=model, x=x, log_px=log_px, elbo=elbo)


def _mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return values.mean(0), values.std(0) / math.sqrt(len(values))


def test_k1_estimate_and_neg_elbo_have_the_exact_elbo_as_mean(exact: Exact) -> None:
    """At k = 1 the estimator's mean over its own random draws of both layers is the ELBO, and so is
    the mean of -neg_elbo (whose KL terms are in closed form): each within 4 standard errors."""
    model, x, n = exact.model, exact.x, 4000
    torch.manual_seed(22)
    estimates = iw_log_likelihood(model, x.repeat(n, 1), 1).reshape(n, len(x))
    mean, se = _mean_and_se(estimates)
    assert (se < 0.2).all(), se
    assert ((mean - exact.elbo).abs() < 4 * se).all(), (mean, exact.elbo, se)
    eps = torch.randn(n, len(x), model.noise_dim, dtype=F64, generator=torch.Generator().manual_seed(23))
    with torch.no_grad():
        elbos = -neg_elbo(model, x.expand(n, -1, -1).reshape(-1, N_PIXELS), eps.reshape(-1, model.noise_dim))
    mean, se = _mean_and_se(elbos.reshape(n, len(x)))
    assert ((mean - exact.elbo).abs() < 4 * se).all(), (mean, exact.elbo, se)


def test_estimate_tightens_towards_exact_log_likelihood(
    exact: Exact, assert_iw_tightens: Callable[..., None]
) -> None:
    """The gap log p(x) - estimate falls from k = 1 to 10 to 100 by more than 3 standard errors at
    each step, is never below -4 standard errors, and at k = 1000 is within 0.05 nats of zero."""
    model, x = exact.model, exact.x
    assert_iw_tightens(model, x, exact.log_px, {1: 500, 10: 400, 100: 60, 1000: 10}, seed=24)
