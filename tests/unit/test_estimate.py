"""The decoder of the importance-weighted estimate (:mod:`mnist_vae.models.estimate`): the block
rewrite gives the conv decoder's logits, the summed Bernoulli likelihood gives BCE's sum, bf16
moves the estimate by little, and ``auto`` picks bf16 only where the CPU has it.

Exactness in float64 with random weights (every layer counts, the pixel bias and the last
convolution's bias included); bf16 on a float32 model against its FP32 estimate on the same draws.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mnist_vae.config import ModelConfig
from mnist_vae.models import estimate
from mnist_vae.models.estimate import BlockDecoder, for_estimate, precision_of, resolve
from mnist_vae.models.families import build_model, from_architecture
from mnist_vae.models.networks import N_PIXELS, ConvDecoder
from mnist_vae.models.objectives import bernoulli_nll, iw_log_likelihood, summed_bernoulli_nll
from mnist_vae.models.vae import VAE

F64 = torch.float64


def _randomised(model: VAE, scale: float = 0.3) -> VAE:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model.eval()


def _conv(activation: str = "silu", pixel_bias: bool = True, blocks: int = 0, channels=(4, 8)) -> VAE:
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="conv", channels=channels, blocks=blocks, dense=16, latent=3, activation=activation
    )
    model = build_model(cfg)
    if not pixel_bias:
        model = from_architecture(dataclasses.replace(model.arch, pixel_bias=False))
    return model


def _hvae() -> VAE:
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="hvae", channels=(4, 8), dense=16, latent=3, latent2=2, hidden2=8))


REWRITABLE = {
    "conv-silu": lambda: _conv(),
    "conv-relu-no-pixel-bias": lambda: _conv("relu", pixel_bias=False),
    "conv-tanh": lambda: _conv("tanh"),
    "hvae": _hvae,
}


def _images(binary: bool, n: int = 5, dtype: torch.dtype = F64) -> torch.Tensor:
    grey = torch.rand(n, N_PIXELS, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return torch.bernoulli(grey, generator=torch.Generator().manual_seed(3)) if binary else grey


@pytest.mark.parametrize("name", list(REWRITABLE))
def test_the_block_decoder_gives_the_conv_decoders_logits(name: str) -> None:
    model = _randomised(REWRITABLE[name]().to(F64))
    fast = for_estimate(model, "fp32")
    assert isinstance(fast.decoder, BlockDecoder) and precision_of(fast) == "fp32"
    z = torch.randn(
        3, 4, model.decoder.head[0].in_features, generator=torch.Generator().manual_seed(4), dtype=F64
    )
    with torch.inference_mode():
        want = model.decoder(z)
        assert torch.allclose(fast.decoder(z), want, rtol=0, atol=1e-10)
        assert torch.allclose(
            fast.decoder.phase_logits(z), BlockDecoder.to_phase_order(want), rtol=0, atol=1e-10
        )
        for binary in (True, False):
            x = _images(binary, 4)
            assert torch.allclose(fast.likelihood_nll(z, x), bernoulli_nll(want, x), rtol=0, atol=1e-9)


def test_the_block_order_is_the_two_pixel_shuffles() -> None:
    """Channel (a * 2 + b) * 4 + u * 2 + v at block (r, c) is pixel (4r + 2a + u, 4c + 2b + v)."""
    channels = torch.randn(2, 16, 7, 7)
    image = F.pixel_shuffle(
        F.pixel_shuffle(channels.reshape(2, 4, 4, 7, 7).transpose(1, 2).reshape(2, 16, 7, 7), 2), 2
    )
    # The inner shuffle turns the 2x2 blocks (a, b) of the 14x14 grid into one image per sub-pixel
    # (u, v); the outer one interleaves those.
    assert torch.equal(
        BlockDecoder.to_phase_order(image.reshape(2, N_PIXELS)), channels.permute(0, 2, 3, 1).reshape(2, -1)
    )


def test_the_estimate_is_the_plain_decoders_on_the_same_draws() -> None:
    model = _randomised(_hvae().to(F64))
    x = _images(True)
    torch.manual_seed(5)
    want = iw_log_likelihood(model, x, 9, chunk_rows=15)
    torch.manual_seed(5)
    got = iw_log_likelihood(for_estimate(model, "fp32"), x, 9, chunk_rows=15)
    assert torch.allclose(got, want, rtol=0, atol=1e-9)


def test_the_copy_shares_the_encoder_and_leaves_the_model_alone() -> None:
    model = _randomised(_conv())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_estimate(model, "bf16")
    assert fast.encoder is model.encoder and fast.decoder is not model.decoder
    assert isinstance(model.decoder, ConvDecoder) and precision_of(model) == "fp32"
    assert precision_of(fast) == "bf16" and fast.decoder.pixel_bias.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["conv-silu", "hvae"])
def test_bf16_moves_the_estimate_by_little(name: str) -> None:
    """The same draws through the bf16 decoder: another computation (the estimates differ), within
    0.01 nats of FP32 on average and 0.1 for any image. A wrong weight layout or a lost bias moves
    it by nats."""
    model = _randomised(REWRITABLE[name](), scale=0.15)
    x = _images(True, 20, torch.float32)
    torch.manual_seed(6)
    exact = iw_log_likelihood(model, x, 50).double()
    torch.manual_seed(6)
    lowered = iw_log_likelihood(for_estimate(model, "bf16"), x, 50).double()
    assert 0 < (lowered - exact).abs().max().item() < 0.1
    assert abs((lowered - exact).mean().item()) < 0.01


def test_other_conv_decoders_run_their_own_layers_in_bf16() -> None:
    model = _randomised(_conv(blocks=1), scale=0.15)
    assert for_estimate(model, "fp32") is model
    fast = for_estimate(model, "bf16")
    assert isinstance(fast.decoder, ConvDecoder) and precision_of(fast) == "bf16"
    x = _images(True, 20, torch.float32)
    torch.manual_seed(7)
    exact = iw_log_likelihood(model, x, 20).double()
    torch.manual_seed(7)
    assert abs((iw_log_likelihood(fast, x, 20).double() - exact).mean().item()) < 0.01


def test_the_mlp_presets_stay_in_fp32() -> None:
    model = build_model(ModelConfig(preset="mlp", hidden=(8,), latent=2))
    assert for_estimate(model, "bf16") is model and precision_of(model) == "fp32"


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_summed_likelihood_is_bces_sum(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(8)
    logits = (12 * torch.randn(3, 7, N_PIXELS, generator=generator, dtype=F64)).clamp(-40, 40)
    logits[..., :5] = torch.tensor([0.0, 40.0, -40.0, 1e-6, -1e-6], dtype=F64)
    for x in (_images(True, 7), _images(False, 7)):
        want = bernoulli_nll(logits, x)
        got = summed_bernoulli_nll(logits.to(dtype), x.to(dtype)).double()
        assert torch.allclose(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-9)


def test_the_summed_likelihood_has_bces_gradient() -> None:
    logits = torch.randn(4, N_PIXELS, dtype=F64, requires_grad=True)
    x = _images(False, 4)
    (want,) = torch.autograd.grad(bernoulli_nll(logits, x).sum(), logits)
    (got,) = torch.autograd.grad(summed_bernoulli_nll(logits, x).sum(), logits)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve("fp32") == "fp32" and resolve("bf16") == "bf16"
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert resolve("auto") == ("bf16" if native else "fp32")
    assert resolve("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="expected one of auto, fp32, bf16"):
        resolve("fp16")


def test_without_torchs_checks_auto_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    flags = tmp_path / "cpuinfo"
    monkeypatch.setattr(estimate, "Path", lambda _: flags)
    flags.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert estimate.native_bf16()
    flags.write_text("flags\t\t: fpu avx2 fma\n")
    assert not estimate.native_bf16()
