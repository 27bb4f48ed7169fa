"""The demo room: a Gradio page on a trained model, for a person to draw digits and look inside it.

- :mod:`.latents`: the latent layers of a model family, as the page reads and writes them (the VAE
  has one; a family with several layers adds its adapter there and the page shows each layer);
- :mod:`.page`: the page's work as plain functions on arrays, testable without a server: preparing
  a drawing or an upload as ``mnist-vae reconstruct`` does, its reconstruction, its negative ELBO and
  its percentile among the test digits' scores, the latent sliders, interpolation, samples;
- :mod:`.card`: the model card, from the model and, for a registry reference, the MLflow registry;
- :mod:`.app`: the Gradio Blocks layout and its event handlers (the only module importing gradio);
- :mod:`.server`: the checks before start-up (port, login) and serving until Ctrl-C or SIGTERM.

May import the top-level modules, :mod:`mnist_vae.data`, :mod:`mnist_vae.models`,
:mod:`mnist_vae.evaluation`, :mod:`mnist_vae.serving` (the ``score`` numbers) and
:mod:`mnist_vae.registry` (references and aliases); never the stages, training, tuning, bench or the
CLI, which calls it.
"""
