"""The evaluation room: a trained model measured and drawn.

- :mod:`.metrics`: test-set measurements (negative ELBO and its terms, the importance-weighted
  -log p(x), reconstruction errors per digit) as :class:`~.metrics.Evaluation`;
- :mod:`.figures`: reconstructions, samples, latent traversals and the latent space as PNG files;
- :mod:`.plots`: the offline page template that ``dvc plots show`` renders into.

May import the top-level modules, :mod:`mnist_vae.data` and :mod:`mnist_vae.models`.
"""
