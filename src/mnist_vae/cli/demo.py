"""``demo``: a page in the browser to draw digits for a model and look inside it (Gradio)."""

import os
from pathlib import Path
from typing import Annotated

import typer

from mnist_vae.cli.common import DataOption, ModelOption, ParamsOption, busy, default_model, load_model
from mnist_vae.config import load_params


def demo(
    model: ModelOption = None,
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on; the default keeps the page on this machine."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 7860,
    data: DataOption = Path("data/mnist.npz"),
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
    """Serve a page to draw or upload digits for a model: the prepared input, its reconstruction,
    its negative ELBO and how unusual that is among the test digits; latent sliders, an
    interpolation, samples from the prior and the model card. Stops on Ctrl-C or SIGTERM.

    Offline and private: every asset is served by the page itself, Gradio's analytics are off, and
    it listens on 127.0.0.1 unless --host says otherwise.

    Example: MNIST_VAE_LOGIN=me:secret mnist-vae demo --model models:/mnist-vae/3 --auth-env MNIST_VAE_LOGIN
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
