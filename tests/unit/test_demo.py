"""The demo page's functions on a tiny model, without a server or Gradio: the digit prepared as
`mnist-vae reconstruct` prepares a file, its score and percentile against an independent
computation, the sliders' units ranked by KL, interpolation, samples, the model card from a real
registry, and the checks before start-up (port, login)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mnist_vae.config import ModelConfig
from mnist_vae.data.pictures import load_digit
from mnist_vae.demo import card as cards
from mnist_vae.demo import page as work
from mnist_vae.demo.latents import LatentLayer, OneLayer, UnknownFamilyError, latent_model
from mnist_vae.demo.server import DemoStartError, check_port, login_from_env
from mnist_vae.evaluation.figures import reconstruct, sample
from mnist_vae.models.families import build_model
from mnist_vae.models.vae import VAE
from mnist_vae.serving.scores import image_noise


@pytest.fixture(scope="module")
def vae() -> VAE:
    return build_model(ModelConfig(preset="mlp", hidden=(16,), latent=4), seed=0).eval()


@pytest.fixture
def page(vae: VAE, tiny_npz: Path) -> work.Page:
    return work.open_page(latent_model(vae), tiny_npz)


def _canvas(path: Path, paper: tuple[int, ...] = (0, 0, 0, 0)) -> Path:
    """A 280x280 RGBA canvas with a black 7, as the sketchpad sends it (transparent by default)."""
    picture = Image.new("RGBA", (280, 280), paper)
    ImageDraw.Draw(picture).line([(90, 60), (190, 60), (120, 230)], fill=(0, 0, 0, 255), width=24)
    picture.save(path)
    return path


def _drawn(path: Path) -> dict:
    """The sketchpad's unprocessed value, as Gradio hands it over (file data of the picture)."""
    return {"background": None, "layers": [], "composite": {"path": str(path), "orig_name": "composite.png"}}


def _neg_elbo(vae: VAE, pixels: np.ndarray, seed: int = 0) -> np.ndarray:
    """One-draw negative ELBO written out: Bernoulli log-likelihood and the closed-form KL, at each
    image's own draw (as ``score`` draws it)."""
    x = torch.from_numpy(pixels.reshape(len(pixels), 784)).float() / 255.0
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        eps = image_noise(x, seed, vae.latent_dim)
        logits = vae.decode(mu + torch.exp(0.5 * logvar) * eps)
        recon = -torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)
        posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
        kl = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    return (recon + kl).numpy()


def test_the_test_split_is_scored_as_score_does_and_sorted(page: work.Page, vae: VAE, tiny_npz: Path) -> None:
    x_test = np.load(tiny_npz)["x_test"]
    assert page.test is not None and page.missing == ""
    np.testing.assert_allclose(page.test.scores, np.sort(_neg_elbo(vae, x_test)), rtol=1e-5)
    assert len(page.test.images) == len(x_test) == 64


def test_without_the_data_file_the_page_says_why_instead_of_a_percentile(vae: VAE, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.npz"
    page = work.open_page(latent_model(vae), missing)
    assert page.test is None
    assert str(missing) in page.missing and "dvc repro download" in page.missing
    text = work.score_text(page, 123.4)
    assert "123.4 nats" in text and "No test digits to compare with" in text and str(missing) in text
    assert len(page.dims) == 4  # ranked on the model's own samples instead
    empty = tmp_path / "empty.npz"
    none = np.zeros((0, 28, 28), dtype=np.uint8)
    np.savez(empty, x_train=none, y_train=none[:, 0, 0], x_test=none, y_test=none[:, 0, 0])
    assert work.open_page(latent_model(vae), empty).missing == f"{empty}: its test split holds no images"
    with pytest.raises(work.PageInputError, match="No test digits to pick from"):
        work.pick_test_digit(page, 0)


def test_the_percentile_counts_the_test_scores_strictly_below() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    assert [work.percentile(scores, s) for s in (0.5, 2.0, 2.5, 4.0, 9.0)] == [0.0, 25.0, 50.0, 75.0, 100.0]


def test_the_score_reads_as_a_share_of_test_digits_rounded_down(page: work.Page) -> None:
    assert page.test is not None
    # 64 distinct scores (the tiny test split repeats images, whose scores then tie).
    test = dataclasses.replace(page.test, scores=np.arange(64, dtype=np.float32))
    page = dataclasses.replace(page, test=test)
    assert "More unusual than all 64 MNIST test images." in work.score_text(page, 64.0)
    # 63 of 64 below: 98.4375%, shown as 98.4% (never rounded up to a share it did not reach)
    assert "More unusual than 98.4% of the 64 MNIST test images." in work.score_text(page, 63.0)
    assert "More unusual than 0.0% of the 64" in work.score_text(page, -1.0)


def test_sliders_go_to_the_units_with_the_largest_mean_kl(vae: VAE, tiny_images) -> None:
    images, _ = tiny_images(200)
    x = torch.from_numpy(images.reshape(200, 784)).float() / 255.0
    with torch.no_grad():
        mu, logvar = vae.encode(x)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0)).mean(0)
    dims = work.active_dimensions(latent_model(vae), x, per_layer=3)
    assert [d.unit for d in dims] == kl.argsort(descending=True)[:3].tolist()
    np.testing.assert_allclose([d.kl for d in dims], kl.sort(descending=True).values[:3].numpy(), rtol=1e-5)
    assert {d.layer for d in dims} == {0}


def test_a_drawing_is_prepared_as_reconstruct_prepares_the_same_picture(tmp_path: Path) -> None:
    canvas = _canvas(tmp_path / "composite.png")
    # What reconstruct reads for the same drawing on paper: flattened onto white, saved as a file.
    on_paper = Image.alpha_composite(Image.new("RGBA", (280, 280), "white"), Image.open(canvas))
    on_paper.convert("RGB").save(tmp_path / "paper.png")
    prepared = work.drawing(_drawn(canvas))
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8 and prepared.max() == 255
    np.testing.assert_array_equal(prepared, load_digit(tmp_path / "paper.png"))
    # The white canvas the page starts with gives the same digit as a transparent one.
    white = _canvas(tmp_path / "white.png", paper=(255, 255, 255, 255))
    np.testing.assert_array_equal(work.drawing(_drawn(white)), prepared)


@pytest.mark.parametrize("paper", [(0, 0, 0, 0), (255, 255, 255, 255)], ids=["transparent", "white"])
def test_an_empty_canvas_is_said_in_words(tmp_path: Path, paper: tuple[int, ...]) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (280, 280), paper).save(blank)
    for value in (_drawn(blank), {"background": None, "layers": [], "composite": None}, None):
        with pytest.raises(work.EmptyCanvasError, match="^The canvas is empty: draw a digit"):
            work.drawing(value)
    with pytest.raises(work.EmptyCanvasError, match="^The first canvas is empty"):
        work.drawing(None, "the first canvas")


def test_an_upload_is_prepared_as_reconstruct_prepares_it(tmp_path: Path, stroke_picture) -> None:
    picture = stroke_picture(tmp_path / "seven.jpg")
    value = {"path": str(picture), "orig_name": "my seven.jpg"}
    np.testing.assert_array_equal(work.upload(value), load_digit(picture))


def test_a_refused_upload_names_the_file_as_the_person_called_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "gradio-cache-3f2a"
    cache.mkdir()
    notes = cache / "notes.txt"
    notes.write_text("not a picture")
    blank = cache / "blank.png"
    Image.new("L", (60, 60), 255).save(blank)
    cases = [
        (notes, "notes.txt", "^notes.txt: not an image Pillow can read"),
        (blank, "blank.png", "^blank.png: no digit found"),
    ]
    for path, name, message in cases:
        with pytest.raises(work.PageInputError, match=message) as caught:
            work.upload({"path": str(path), "orig_name": name})
        assert str(cache) not in str(caught.value)
    # A picture over Pillow's decompression-bomb limit (made small here; the end-to-end test sends
    # a real one) is refused before it is decoded.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = cache / "huge.png"
    Image.new("L", (100, 100), 255).save(big)
    with pytest.raises(work.PageInputError, match="^huge.png: image too large"):
        work.upload({"path": str(big), "orig_name": "huge.png"})
    with pytest.raises(work.PageInputError, match="^No picture"):
        work.upload(None)


def test_a_digit_gets_its_reconstruction_score_and_posterior_means(
    page: work.Page, vae: VAE, tiny_images
) -> None:
    images, _ = tiny_images(1, seed=5)
    digit = work.analyse(page, images[0])
    np.testing.assert_allclose(digit.reconstruction, reconstruct(vae, images)[0], atol=1e-6)
    assert digit.neg_elbo == pytest.approx(float(_neg_elbo(vae, images)[0]), rel=1e-5)
    with torch.no_grad():
        mu, _ = vae.encode(torch.from_numpy(images.reshape(1, 784)).float() / 255.0)
    np.testing.assert_allclose(digit.code[0], mu[0].numpy(), atol=1e-6)


def test_the_sliders_start_at_the_posterior_mean_and_decode_what_they_say(page: work.Page, vae: VAE) -> None:
    code = [np.array([0.5, -5.0, 1.234, 4.5], dtype=np.float32)]
    values = work.slider_values(page, code)
    assert values == [{0: 0.5, 1: -4.0, 2: 1.23, 3: 4.0}[d.unit] for d in page.dims]
    moved = [2.0, -1.0, 0.25, 3.0]
    z = torch.tensor(code[0]).reshape(1, 4)
    for dim, value in zip(page.dims, moved, strict=True):
        z[0, dim.unit] = value
    with torch.no_grad():
        expected = torch.sigmoid(vae.decode(z))[0].numpy()
    np.testing.assert_allclose(work.explore(page, code, moved), expected, atol=1e-6)
    # Before any digit the sliders act on the prior's mean.
    with torch.no_grad():
        at_zero = torch.sigmoid(vae.decode(torch.zeros(1, 4)))[0].numpy()
    np.testing.assert_allclose(work.explore(page, None, [0.0] * 4), at_zero, atol=1e-6)
    with pytest.raises(work.PageInputError, match="expected 4 slider values, got 2"):
        work.explore(page, None, [0.0, 1.0])


def test_an_interpolation_runs_from_one_reconstruction_to_the_other(page: work.Page, vae: VAE) -> None:
    first, last = work.pick_test_digit(page, 0), work.pick_test_digit(page, 63)
    strip = work.interpolate(page, first, last, 5.0)
    assert strip.shape == (5, 784)
    np.testing.assert_allclose(strip[[0, -1]], reconstruct(vae, np.stack([first, last])), atol=1e-6)
    with torch.no_grad():
        mu, _ = vae.encode(torch.from_numpy(np.stack([first, last]).reshape(2, 784)).float() / 255.0)
        middle = torch.sigmoid(vae.decode(mu.mean(0, keepdim=True)))[0].numpy()
    np.testing.assert_allclose(strip[2], middle, atol=1e-6)
    for steps in (1, 17, 2.5, "9"):
        with pytest.raises(work.PageInputError, match="^steps: expected a whole number from 2 to 16"):
            work.interpolate(page, first, last, steps)


@pytest.mark.parametrize("index", [-1, 64, 1.5, "3", True, float("nan")])
def test_a_test_digit_that_does_not_exist_is_refused(page: work.Page, index: object) -> None:
    with pytest.raises(work.PageInputError, match="^test digit: expected a whole number from 0 to 63"):
        work.pick_test_digit(page, index)


def test_samples_are_the_priors_draws_for_the_seed(page: work.Page, vae: VAE) -> None:
    drawn = work.samples(page, 6.0, 3.0)
    np.testing.assert_array_equal(drawn, sample(vae, 6, seed=3))
    assert not np.allclose(drawn, work.samples(page, 6, 4))
    with pytest.raises(work.PageInputError, match="^samples: expected a whole number from 1 to 64"):
        work.samples(page, 65, 0)
    with pytest.raises(work.PageInputError, match="^seed: expected a whole number"):
        work.samples(page, 4, -1)


def test_pictures_are_enlarged_with_square_pixels() -> None:
    digit = np.arange(784, dtype=np.float32).reshape(28, 28) / 783.0
    shown = work.picture(digit)
    assert shown.shape == (168, 168) and shown.dtype == np.uint8
    np.testing.assert_array_equal(shown[::6, ::6], np.rint(digit * 255).astype(np.uint8))
    np.testing.assert_array_equal(shown[5::6, 5::6], shown[::6, ::6])
    grid = work.picture(np.zeros((6, 784), dtype=np.float32), columns=3, scale=1)
    assert grid.shape == (2 + 2 * 30, 2 + 3 * 30)  # torchvision's grid: 2 px of padding around each


def test_only_a_known_family_is_shown() -> None:
    with pytest.raises(UnknownFamilyError, match="knows no latent layers of a Linear"):
        latent_model(torch.nn.Linear(2, 2))


def test_the_one_layer_vae_shows_one_layer() -> None:
    model = OneLayer(build_model(ModelConfig(preset="mlp", hidden=(8,), latent=3), seed=0))
    assert [(layer.name, layer.size) for layer in model.layers] == [("z", 3)]
    assert model.describe() == "VAE, one latent layer z of 3 units"


def test_the_card_of_a_weights_file_says_it_has_no_registry_entry(vae: VAE) -> None:
    card = cards.model_card("models/model.pt", vae, "VAE, one latent layer z of 4 units")
    assert (card.preset, card.registered, card.run_id) == ("mlp", "", "")
    assert card.parameters == sum(p.numel() for p in vae.parameters())
    text = cards.card_markdown(card)
    assert "`models/model.pt`" in text and "no registry entry" in text and "mlp, " in text


def test_the_card_of_a_registered_version_reads_the_registry(
    vae: VAE, mlflow_store: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_store, mlflow_store)
    experiment = client.create_experiment("mnist-vae")
    run = client.create_run(experiment, run_name="bold-fox-42")
    client.create_registered_model("mnist-vae")
    tags = {
        "test_neg_elbo": "93.3566",
        "test_nll_iw": "90.3713",
        "test_mse_digit_3": "0.0069",
        "preset": "conv",
    }
    client.create_model_version("mnist-vae", source=str(tmp_path), run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias("mnist-vae", "champion", "1")
    for reference in ("models:/mnist-vae@champion", "models:/mnist-vae/1", f"runs:/{run.info.run_id}/model"):
        card = cards.model_card(reference, vae, "VAE", client)
        assert card.registered == "mnist-vae version 1" and card.aliases == ("champion",)
        assert card.metrics == {"neg_elbo": "93.3566", "nll_iw": "90.3713"}
        assert (card.preset, card.run_id, card.run_name) == ("conv", run.info.run_id, "bold-fox-42")
        assert card.experiment == "mnist-vae"
    text = cards.card_markdown(card)
    for shown in ("mnist-vae version 1, aliases: champion", "neg_elbo 93.3566 nats", run.info.run_id):
        assert shown in text
    missing = cards.model_card("models:/mnist-vae@nobody", vae, "VAE", client)
    assert missing.note.startswith("the registry could not be read") and missing.registered == ""


def test_the_login_comes_from_the_variable_and_its_value_is_never_said() -> None:
    assert login_from_env(None) is None
    assert login_from_env("LOGIN", {"LOGIN": "ada:pa:ss word"}) == ("ada", "pa:ss word")
    for value in ("", "no-colon-secret", ":only-secret", "ada:"):
        with pytest.raises(DemoStartError, match="--auth-env LOGIN") as caught:
            login_from_env("LOGIN", {"LOGIN": value})
        assert not value or value not in str(caught.value)


def test_a_port_in_use_or_an_address_not_of_this_machine_is_refused_at_once() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DemoStartError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again
    with pytest.raises(DemoStartError, match="cannot listen on 192.0.2.1"):
        check_port("192.0.2.1", port)  # TEST-NET-1: never an address of this machine


class _TwoLayers:
    """A stand-in for a family with two latent layers: the tiny VAE's four units split into a layer
    ``top`` of one unit and a layer ``bottom`` of three, as a ladder VAE would present them."""

    def __init__(self, vae: VAE) -> None:
        self.inner = OneLayer(vae)
        self.layers = (LatentLayer("top", 1), LatentLayer("bottom", 3))

    def describe(self) -> str:
        return "two layers"

    def _split(self, code: torch.Tensor) -> list[torch.Tensor]:
        return [code[:, :1], code[:, 1:]]

    def posterior_means(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._split(self.inner.posterior_means(x)[0])

    def kl_per_unit(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._split(self.inner.kl_per_unit(x)[0])

    def decode(self, code) -> torch.Tensor:
        return self.inner.decode([torch.cat(list(code), dim=-1)])

    def neg_elbo(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        return self.inner.neg_elbo(pixels, seed)

    def sample(self, n: int, seed: int) -> np.ndarray:
        return self.inner.sample(n, seed)


def test_a_family_with_several_layers_gets_sliders_on_each(vae: VAE, tiny_npz: Path, tiny_images) -> None:
    """The page's functions take any number of layers: sliders per layer, each layer's code."""
    page = work.open_page(_TwoLayers(vae), tiny_npz)
    assert [d.layer for d in page.dims] == [0, 1, 1, 1]
    images, _ = tiny_images(2, seed=7)
    digit = work.analyse(page, images[0])
    assert [c.shape for c in digit.code] == [(1,), (3,)]
    values = work.slider_values(page, digit.code)
    moved = [v + 1.0 for v in values]
    z = torch.from_numpy(np.concatenate(digit.code)).reshape(1, 4)
    for dim, value in zip(page.dims, moved, strict=True):
        z[0, dim.unit + (1 if dim.layer == 1 else 0)] = value
    with torch.no_grad():
        expected = torch.sigmoid(vae.decode(z))[0].numpy()
    np.testing.assert_allclose(work.explore(page, digit.code, moved), expected, atol=1e-6)
    strip = work.interpolate(page, images[0], images[1], 3)
    np.testing.assert_allclose(strip[[0, -1]], reconstruct(vae, images), atol=1e-6)
