"""The tuning room: the hyperparameter search (``mnist-vae tune``).

- :mod:`.space`: the search space file (``search_space.yaml``), checked against params.yaml;
- :mod:`.search`: Optuna trials as MLflow child runs, on a journal file or a shared database.

May import every room below it (data, models, training, the top-level modules); no stage depends on
it, so editing the search never reruns the pipeline.
"""
