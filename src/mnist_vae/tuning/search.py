"""Hyperparameter search with Optuna, every trial an MLflow child run of one parent run.

The search space is a YAML file in the repo (``search_space.yaml``): params.yaml keys with a kind and
range. Trials are chosen by Optuna's TPE sampler and pruned (median rule) on the per-epoch validation
negative ELBO; the test set is never looked at. The study lives in a storage that several processes
share: by default an Optuna journal file under ``.tune/`` (safe for processes on one machine), or any
database URL (``$MNIST_VAE_TUNE_STORAGE`` or ``--storage``) so that several machines run trials of one
study. Each process counts the study's trials and asks for a new one under a lock (a file lock beside a
journal or SQLite file, a PostgreSQL advisory lock), so processes on one study create exactly the
number of trials asked for in total, none twice and no surplus.

Over 300 lines because a study's trials are shared by processes on one or many machines, and
every way a trial ends (pruned, failed, interrupted, waiting) is handled here, where it happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mnist_vae.config import ConfigError, Params, load_params
from mnist_vae.errors import UserError, first_line

# The search space's names, as this module's callers (the CLI, the tests) import them.
from mnist_vae.tuning.space import SearchSpace, load_space, yaml_text

if TYPE_CHECKING:
    from optuna import Study
    from optuna.storages import BaseStorage
    from optuna.trial import Trial

    from mnist_vae.data.dataset import ImageData

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
# The storage URL, read from the environment so that a database password is neither on the command
# line (visible in `ps` and shell history) nor in a file of the repo.
STORAGE_ENV = "MNIST_VAE_TUNE_STORAGE"


class TuneError(UserError):
    """The search ended without a result, or its storage cannot be used."""


@dataclass(frozen=True)
class TuneSettings:
    space_file: Path
    params_file: Path
    data: Path
    trials: int
    jobs: int = 1
    storage: str | None = None
    study: str = "mnist-vae"
    overrides: tuple[str, ...] = ()

    def storage_url(self) -> str:
        """``storage``, else ``$MNIST_VAE_TUNE_STORAGE``, else the journal ``.tune/STUDY.journal``."""
        return (
            self.storage
            or os.environ.get(STORAGE_ENV, "").strip()
            or f"journal:{Path('.tune') / (self.study + '.journal')}"
        )


@dataclass(frozen=True)
class TuneResult:
    parent_run_id: str
    best_value: float
    best_params: dict[str, Any]
    dvc_args: str
    trials: int
    pruned: int
    failed: int = 0


def _storage(url: str) -> BaseStorage:
    """Optuna's storage for ``url``.

    Raises:
        TuneError: The database cannot be reached or refused the login (the URL's password is not
            shown).
    """
    import optuna
    import sqlalchemy.exc
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from mnist_vae.tracking import redacted

    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # A journal file is appended under a file lock: safe for many processes on one machine.
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=120)
    except sqlalchemy.exc.OperationalError as exc:
        # The driver's message names host and port, never the password.
        reason = first_line(exc.orig) if exc.orig is not None else type(exc).__name__
        raise TuneError(f"Optuna storage {redacted(url)} cannot be used: {reason}") from None


@contextlib.contextmanager
def _trial_lock(url: str, storage: BaseStorage, study: str) -> Iterator[None]:
    """Serialises counting a study's trials and creating one, across every process on the study.

    Optuna numbers trials atomically but has no "at most N": two processes that both see N - 1
    trials would both create one. A journal or SQLite file is locked with a file lock beside it
    (the processes share the machine); PostgreSQL, shared by machines, with an advisory lock.
    """
    from filelock import FileLock

    if url.startswith("journal:"):
        with FileLock(url.removeprefix("journal:") + ".ask.lock"):
            yield
        return
    from optuna.storages import RDBStorage

    assert isinstance(storage, RDBStorage), "a storage URL other than journal: is a database's"
    engine = storage.engine
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with FileLock(engine.url.database + ".ask.lock"):
            yield
        return
    if engine.dialect.name == "postgresql":
        from sqlalchemy import text

        key = int.from_bytes(
            hashlib.sha256(f"mnist-vae tune {study}".encode()).digest()[:8], "big", signed=True
        )
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        return
    # Another database: no lock of ours; a surplus trial is told PRUNED (see _worker).
    yield


def tune(settings: TuneSettings) -> TuneResult:
    """Runs the search (``settings.jobs`` worker processes here) and returns the best trial.

    Raises:
        SearchSpaceError: See :func:`load_space`.
        ConfigError: The params leave no validation split to choose on.
    """
    import optuna

    from mnist_vae import tracking
    from mnist_vae.paths import project_root

    space = load_space(settings.space_file, settings.params_file, settings.overrides)
    params = _trial_params(settings, space.overrides({}))
    root = project_root()
    tracking.configure(root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(settings.storage_url())
    study = optuna.create_study(
        study_name=settings.study, storage=storage, direction="minimize", load_if_exists=True
    )
    parent_id = _parent_run(study, storage, settings, params.mlflow.experiment, root)
    if settings.jobs == 1:
        _worker(settings, parent_id)
    else:
        context = multiprocessing.get_context("spawn")
        workers = [
            context.Process(target=_worker_process, args=(settings, parent_id), daemon=False)
            for _ in range(settings.jobs)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        failed = [w.exitcode for w in workers if w.exitcode != 0]
        if failed:
            raise TuneError(
                f"{len(failed)} of {len(workers)} tune worker processes failed (exit codes "
                f"{', '.join(map(str, failed))}); their errors are printed above"
            )
    return _finish(study, space, parent_id, settings)


def _parent_run(
    study: Study, storage: BaseStorage, settings: TuneSettings, experiment: str, root: Path
) -> str:
    """The id of the study's parent run, which every trial's run names as its parent.

    The first process on a study creates it, under the study's lock: processes that start on a new
    study at once would otherwise each create one, and their trials would be split between them.
    """
    import mlflow

    from mnist_vae import tracking

    with _trial_lock(settings.storage_url(), storage, settings.study):
        parent_id = study.user_attrs.get(PARENT_ATTR)
        if parent_id is not None:
            return str(parent_id)
        with mlflow.start_run(
            experiment_id=tracking.experiment_id(experiment, root), run_name=f"tune-{settings.study}"
        ) as parent:
            mlflow.set_tags(
                {
                    "tune.study": settings.study,
                    "tune.storage": tracking.redacted(settings.storage_url()),
                    "tune.space": Path(settings.space_file).read_text(),
                }
            )
            mlflow.log_param("tune.trials", settings.trials)
        study.set_user_attr(PARENT_ATTR, parent.info.run_id)
        return str(parent.info.run_id)


def _worker_process(settings: TuneSettings, parent_id: str) -> None:
    """A worker in a process of its own: a user error ends it with one line and exit code 1."""
    try:
        _worker(settings, parent_id)
    except UserError as exc:
        print(f"error: tune worker: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def _worker(settings: TuneSettings, parent_id: str) -> None:
    """Asks for trials until the study holds ``settings.trials`` of them, and runs each."""
    import optuna

    from mnist_vae import tracking
    from mnist_vae.data.dataset import load_dataset

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking.configure()
    url = settings.storage_url()
    storage = _storage(url)
    study = optuna.load_study(
        study_name=settings.study,
        storage=storage,
        sampler=optuna.samplers.TPESampler(),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    space = load_space(settings.space_file, settings.params_file, settings.overrides)
    data = load_dataset(settings.data)
    while True:
        with _trial_lock(url, storage, settings.study):
            # Trials queued with `study.enqueue_trial` wait to be asked for: not yet run, not counted.
            started = [
                t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING
            ]
            if len(started) >= settings.trials:
                return
            trial = study.ask()
        if trial.number >= settings.trials:
            # Only on a database without a lock of ours: another process created a trial between
            # our count and our ask. PRUNED, not FAIL: nothing went wrong, and _finish skips it.
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        values = space.suggest(trial)
        try:
            value = _run_trial(trial, values, space, settings, data, parent_id)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        except TrialFailedError as failed:
            # Divergence, a sampled combination the params refuse, memory: this trial's end, not
            # the search's. It counts toward --trials, as Optuna counts FAIL.
            _tell_failed(study, trial, str(failed))
            log.warning("trial %d failed: %s", trial.number, failed)
            continue
        except BaseException as exc:
            # A bug of this project (or Ctrl-C): the trial is not left RUNNING, the search stops
            # with the traceback.
            _tell_failed(study, trial, first_line(exc))
            raise
        study.tell(trial, value)


class TrialFailedError(Exception):
    """A trial ended by its own params or data (not a bug): the search goes on without it."""


# What ends a trial and not the search: a user error (divergence, params a sampled combination
# makes invalid), or the machine's memory.
_TRIAL_FAILURES: tuple[type[BaseException], ...] = (UserError, MemoryError)


def _tell_failed(study: Study, trial: Trial, reason: str) -> None:
    import optuna

    trial.set_user_attr("fail_reason", reason)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _trial_params(settings: TuneSettings, overrides: list[str]) -> Params:
    """The params of a trial with ``overrides``, which must leave a validation split to choose on.

    Raises:
        ConfigError: A param is invalid, or ``train.validation`` is 0.
    """
    params = load_params(settings.params_file, overrides)
    if params.train.validation == 0:
        raise ConfigError("train.validation: expected a validation split to choose on, got 0")
    return params


def _run_trial(
    trial: Trial,
    values: dict[str, Any],
    space: SearchSpace,
    settings: TuneSettings,
    data: ImageData,
    parent_id: str,
) -> float:
    """Trains one trial in an MLflow child run; returns its last validation negative ELBO.

    Raises:
        TrialFailedError: The trial's params or data ended it (the run is FAILED, its reason in the
            tag ``tune.fail_reason``).
        optuna.TrialPruned: The pruner stopped it.
    """
    import mlflow
    import optuna

    overrides = space.overrides(values)
    experiment = mlflow.get_run(parent_id).info.experiment_id
    with mlflow.start_run(
        experiment_id=experiment,
        run_name=f"{settings.study}-trial-{trial.number}",
        tags={
            "mlflow.parentRunId": parent_id,
            "tune.study": settings.study,
            "tune.trial": str(trial.number),
            "tune.overrides": " ".join(overrides),
        },
    ) as run:
        try:
            return _train_trial(trial, overrides, settings, data, run.info.run_id)
        except optuna.TrialPruned:
            raise
        except _TRIAL_FAILURES as exc:
            reason = first_line(exc)
            mlflow.set_tags({"tune.state": "FAIL", "tune.fail_reason": reason})
            mlflow.end_run("FAILED")
            raise TrialFailedError(reason) from exc
        except BaseException as exc:  # a bug: recorded on the run, then raised with its traceback
            mlflow.set_tags({"tune.state": "FAIL", "tune.fail_reason": first_line(exc)})
            raise


def _train_trial(
    trial: Trial, overrides: list[str], settings: TuneSettings, data: ImageData, run_id: str
) -> float:
    """Trains one trial inside its active MLflow child run; returns its last validation negative
    ELBO (raises ``optuna.TrialPruned`` when the pruner stops it)."""
    import math

    import mlflow
    import optuna

    from mnist_vae.models.families import build_model
    from mnist_vae.training.trainer import Trainer

    params = _trial_params(settings, overrides)
    x_train, _, x_val, _ = data.split(params.train.validation)
    trainer = Trainer(
        build_model(params.model, seed=params.train.seed), x_train, params.train, validation=x_val
    )
    mlflow.log_params(
        {k: yaml_text(v) for k, v in params.flat().items() if not k.startswith(("evaluate.", "data."))}
    )
    value = math.inf
    for stats in trainer.epochs(progress=False):
        mlflow.log_metrics(stats.metrics(), step=stats.epoch)
        assert stats.val_neg_elbo is not None, "a trial's params have a validation split"
        value = stats.val_neg_elbo
        if not math.isfinite(value):
            break
        trial.report(value, stats.epoch)
        if trial.should_prune():
            mlflow.set_tag("tune.state", "PRUNED")
            mlflow.end_run("KILLED")
            log.info("trial %d pruned after epoch %d (val neg. ELBO %.2f)", trial.number, stats.epoch, value)
            raise optuna.TrialPruned()
    mlflow.set_tag("tune.state", "COMPLETE")
    mlflow.log_metric("val_neg_elbo_final", value)
    log.info(
        "trial %d: val neg. ELBO %.2f with %s (run %s)", trial.number, value, " ".join(overrides), run_id
    )
    return value


def record_best(parent_id: str, tags: dict[str, str], best_value: float) -> None:
    """Writes the study's best trial onto the parent run, in one batch.

    Every process on a shared study finishes by writing this summary to the same parent run, often
    at the same moment. Tag by tag, two writers can both find a tag missing and both insert it (a
    unique-constraint error); MLflow's batch write retries such a clash, and the last writer wins.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    MlflowClient().log_batch(
        parent_id,
        metrics=[Metric("best_val_neg_elbo", best_value, int(time.time() * 1000), 0)],
        tags=[RunTag(key, value) for key, value in tags.items()],
    )


def _finish(study: Study, space: SearchSpace, parent_id: str, settings: TuneSettings) -> TuneResult:
    import optuna

    states = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False) if t.number < settings.trials]
    if not any(t.state == states.COMPLETE for t in trials):
        raise TuneError(
            f"study {settings.study!r}: no trial completed (all pruned or failed); "
            "widen the search space or train longer (fixed: train.epochs)"
        )
    best = study.best_trial
    best_value = best.value
    assert best_value is not None, "the best trial is a completed one, with a value"
    values = {key: yaml.safe_load(v) if isinstance(v, str) else v for key, v in best.params.items()}
    dvc_args = " ".join(f"-S '{item}'" for item in space.overrides(values))
    tags = {f"best.{key}": yaml_text(value) for key, value in values.items()}
    tags["best.trial"] = str(best.number)
    tags["best.dvc_exp_run"] = f"dvc exp run {dvc_args}"
    record_best(parent_id, tags, best_value)
    return TuneResult(
        parent_run_id=parent_id,
        best_value=best_value,
        best_params=values,
        dvc_args=dvc_args,
        trials=len(trials),
        pruned=sum(t.state == states.PRUNED for t in trials),
        failed=sum(t.state == states.FAIL for t in trials),
    )
