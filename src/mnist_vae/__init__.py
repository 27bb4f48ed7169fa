"""mnist-vae: a reproducible DVC + MLflow pipeline for a variational autoencoder on MNIST."""

__version__ = "0.1.0"
