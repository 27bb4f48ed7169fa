"""The ``mnist-vae`` command line: one thin command per library function.

Each module of this package holds one group of commands, named after the room of the library it
calls: :mod:`.pipeline` (``download``, ``train``, ``run``, ``profile``: :mod:`mnist_vae.stages`, the
same functions that ``dvc repro`` and ``MLproject`` run), :mod:`.evaluation` (``evaluate``,
``compare``), :mod:`.images` (``reconstruct``, ``sample``), :mod:`.scoring` (``score``),
:mod:`.registry` (``models``, ``promote``, ``rollback``), :mod:`.tuning` (``tune``), :mod:`.bench`
(``bench``, ``serve-bench``), :mod:`.stack` (``stack``) and :mod:`.demo` (``demo``, the Gradio
page: :mod:`mnist_vae.demo`); :mod:`.common` holds what they share.
Failures a user can fix end with one line ``error: ...`` on stderr and exit code 1, never a
traceback.

This module names the commands, in the order that ``mnist-vae --help`` lists them, and gives each
the one-line error handling.
"""

from collections.abc import Callable

import typer

from mnist_vae.cli import bench, demo, evaluation, images, pipeline, registry, scoring, stack, tuning
from mnist_vae.cli.common import help_text, reports_errors, setup_logging

COMMANDS: dict[str, Callable[..., None]] = {
    "download": pipeline.download,
    "train": pipeline.train,
    "run": pipeline.run,
    "evaluate": evaluation.evaluate,
    "compare": evaluation.compare,
    "reconstruct": images.reconstruct,
    "sample": images.sample,
    "models": registry.models,
    "promote": registry.promote,
    "rollback": registry.rollback,
    "bench": bench.bench,
    "profile": pipeline.profile,
    "tune": tuning.tune,
    "stack": stack.stack,
    "serve-bench": bench.serve_bench,
    "score": scoring.score,
    "demo": demo.demo,
}

app = typer.Typer(
    name="mnist-vae",
    help="Train, evaluate and use a variational autoencoder on MNIST or Fashion-MNIST, tracked with "
    "MLflow.\n\n"
    "Example: mnist-vae run --set train.epochs=5",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main() -> None:
    setup_logging()


for _name, _command in COMMANDS.items():
    app.command(_name, help=help_text(_command.__doc__))(reports_errors(_command))
