"""The training room: the loop that fits a model, and what it needs to be fast and to survive.

- :mod:`.trainer`: :class:`~.trainer.Trainer`, the epochs on CPU or CUDA, one process or many;
- :mod:`.checkpoint`: what a killed run resumes from, and only the run that wrote it;
- :mod:`.distributed`: DistributedDataParallel under ``torchrun`` (NCCL on CUDA, gloo on the CPU);
- :mod:`.threads`: torch's CPU threads, shared fairly between trainings on one machine;
- :mod:`.precision`: mixed precision and ``torch.compile``, each with its fallback;
- :mod:`.flops`: a training run's budget in floating-point operations, counted on one batch.

May import the top-level modules, :mod:`mnist_vae.data` and :mod:`mnist_vae.models`. The objective it
minimises is :func:`mnist_vae.models.objectives.training_loss`; MLflow and DVC are the train
stage's business (:mod:`mnist_vae.stages.train`), not this room's.
"""
