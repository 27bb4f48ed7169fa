"""The models room: the VAE family, its networks, its objectives and its weights file.

- :mod:`.networks`: the encoders and decoders of each preset and :class:`~.networks.Architecture`,
  everything needed to rebuild one;
- :mod:`.vae`: :class:`~.vae.VAE`, an encoder and a decoder around a Gaussian latent;
- :mod:`.objectives`: every term of the objective in one copy (the KL term, the likelihood term,
  the negative ELBO of one image, the importance weights and their estimate of log p(x)): training,
  validation, evaluation, serving and scoring all call these functions;
- :mod:`.weights`: the weights file (``models/model.pt``), saved atomically and loaded without
  unpickling code.

May import the top-level modules (config, errors, atomic) and nothing else of the project: every
other room builds on this one. A second model family goes here beside :mod:`.vae`.
"""
