"""The registry room: what happens to a trained model in MLflow's model registry.

- :mod:`.references`: what a model reference names (a registry URI, a run, a file) and fetching it;
- :mod:`.aliases`: ``candidate`` and ``champion``, every move of ``champion`` and its record,
  promote and rollback by hand;
- :mod:`.gate`: the promotion gate, like with like (:class:`~.gate.Protocol`);
- :mod:`.registration`: logging the pyfunc model and creating a version, all or nothing;
- :mod:`.provenance`: the git commit of the code a run used.

May import the top-level modules, :mod:`mnist_vae.models`, :mod:`mnist_vae.evaluation` (the gate
measures) and :mod:`mnist_vae.serving.pyfunc` (the pyfunc flavour it logs); never the stages, tuning, bench
or the CLI. The connection to MLflow itself is :mod:`mnist_vae.tracking`, shared by every room.
"""
