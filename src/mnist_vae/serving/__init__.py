"""The serving room: a trained model answering requests, one at a time or in bulk.

- :mod:`.pyfunc`: the MLflow pyfunc flavour (what ``mlflow models serve`` loads and answers with),
  logged or saved with its signature and requirements;
- :mod:`.inputs`: what a request or a file of images must hold, checked once for both;
- :mod:`.scores`: the per-image scores (negative ELBO with a draw fixed by the image, posterior
  means, the complexity-corrected score), one function for serving and bulk scoring;
- :mod:`.worker`: a serving process's torch threads and socket settings;
- :mod:`.server`: ``mlflow models serve`` started and stopped as a process group;
- :mod:`.scoring`: ``mnist-vae score``, per-image negative ELBO of many images without a server.

May import the top-level modules, :mod:`mnist_vae.data` and :mod:`mnist_vae.models`. The registry
logs this room's flavour, so this room never imports the registry; resolving a model reference to a
folder is :func:`mnist_vae.registry.references.model_folder`.
"""


def _load_pyfunc(data_path: str) -> object:
    """MLflow's entry point for versions logged before the flavour moved to :mod:`.pyfunc`: their
    MLmodel names ``loader_module: mnist_vae.serving``."""
    from mnist_vae.serving.pyfunc import _load_pyfunc as load

    return load(data_path)
