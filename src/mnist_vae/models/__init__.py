"""The models room: the two model families, their networks, their objectives and the weights file.

- :mod:`.networks`: the encoders and decoders of each preset and :class:`~.networks.Architecture`,
  everything needed to rebuild one;
- :mod:`.vae`: :class:`~.vae.VAE`, an encoder and a decoder around a Gaussian latent;
- :mod:`.hvae`: :class:`~.hvae.HVAE`, two stochastic layers (z2 -> z1 -> x) with top-down
  inference, the second family, a subclass that shares the VAE's interface;
- :mod:`.families`: which class an architecture builds (``build_model``, ``from_architecture``);
- :mod:`.estimate`: the decoder the importance-weighted estimate runs, rewritten for a CPU, in
  FP32 or bfloat16;
- :mod:`.objectives`: every term of the objective in one copy (the KL term, the likelihood term,
  the negative ELBO of one image, the importance weights and their estimate of log p(x)): training,
  validation, evaluation, serving and scoring all call these functions;
- :mod:`.weights`: the weights file (``models/model.pt``), saved atomically and loaded without
  unpickling code.

May import the top-level modules (config, errors, atomic) and nothing else of the project: every
other room builds on this one. Another model family goes here beside :mod:`.vae` and :mod:`.hvae`.
"""
