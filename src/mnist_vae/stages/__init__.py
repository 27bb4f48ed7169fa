"""The pipeline's stages, one module each: ``download``, ``train``, ``evaluate``.

Each module's ``run`` is the stage as a library function, called by ``pipeline/<stage>.py`` (DVC),
``MLproject`` and the ``mnist-vae`` CLI alike; its ``main`` is the stage's command line. A stage
module imports only what that stage runs, and ``dvc.yaml`` lists exactly those modules as its
dependencies (tests/unit/test_layout.py checks it), so editing evaluation never retrains.
"""
