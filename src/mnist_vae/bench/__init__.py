"""The bench room: how fast the project trains and serves, measured and reported.

- :mod:`.training`: ``mnist-vae bench``, the trainer against the tutorial's loop;
- :mod:`.serving`: ``mnist-vae serve-bench``, ``mlflow models serve`` under concurrent clients;
- :mod:`.load`: the HTTP load generator and the in-process timings that serve-bench runs;
- :mod:`.report`: what both share: the machine, the tables, the JSON and the MLflow run.

May import every room but the stages and the CLI; no stage depends on it, so editing a benchmark
never reruns the pipeline.
"""
