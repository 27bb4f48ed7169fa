"""``demo``: a page in the browser to draw digits for a model and look inside it (Gradio)."""

import os
from pathlib import Path
from typing import Annotated

import typer

from mnist_vae.cli.common import ModelOption, ParamsOption, busy, default_model, load_model
from mnist_vae.config import load_params


def demo(
    model: ModelOption = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on; the default keeps the page on this machine."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="The MNIST .npz whose test digits a score is ranked among; without it the page says so.",
        ),
    ] = Path("data/mnist.npz"),
    auth_env: Annotated[
        str | None,
        typer.Option(
            "--auth-env",
            metavar="VAR",
            help="Ask for a login: the environment variable VAR holds user:password (never printed).",
            show_default=False,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="torch threads. Default: one per core this process may use."),
    ] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Serve a page to draw or upload digits for a model and look inside it, until Ctrl-C or SIGTERM.

    The page shows a digit prepared as `reconstruct` prepares it, its reconstruction, its negative
    ELBO and how unusual that is among the test digits; sliders for the latent units the model uses
    most, an interpolation between two digits, samples from the prior and the model card.

    Offline and private: every asset is served by the page itself, Gradio's analytics are off, it
    listens on 127.0.0.1 unless --host says otherwise, and --auth-env asks for a login.

    Example: mnist-vae demo --model models:/mnist-vae/3 --port 8080
    """
    from mnist_vae.demo.server import check_port, login_from_env

    # The checks a person can fix come first, before the slow imports and the model.
    login = login_from_env(auth_env)
    check_port(host, port)
    import torch

    from mnist_vae.demo.card import card_markdown, model_card
    from mnist_vae.demo.latents import latent_model
    from mnist_vae.demo.page import open_page
    from mnist_vae.demo.server import serve

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    reference = model or default_model(load_params(params), None)
    vae = load_model(reference)
    latents = latent_model(vae)
    with busy(f"scoring the test digits of {data}"):
        page = open_page(latents, data)
    card = card_markdown(model_card(reference, vae, latents.describe()))
    serve(page, card, host, port, login)
