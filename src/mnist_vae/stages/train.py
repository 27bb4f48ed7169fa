"""Stage ``train``: trains the VAE on ``data/<data.dataset>.npz``, logging to MLflow.

Writes ``models/model.pt`` and ``reports/train_history.csv`` (DVC's outputs: both the same for the
same weights, so a fresh clone that trains the same weights leaves ``dvc.lock`` unchanged) and
``models/run.json`` (the MLflow run id, for people and scripts; no DVC output, since it differs on
every run). The run is tagged with the weights' MD5, by which ``evaluate`` finds it.

At the end of every epoch it saves a checkpoint (model, optimiser, RNG states, history, run id); a
run killed part way resumes from it, in the same MLflow run, and ends with the metrics of an
uninterrupted run. Ctrl-C, or a SIGTERM during the epochs, keeps the checkpoint and ends the MLflow
run as KILLED; a NaN loss ends it as FAILED.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict

from mnist_vae import procs, tracking
from mnist_vae.atomic import atomic_write
from mnist_vae.config import Params
from mnist_vae.data.dataset import ImageData, load_dataset
from mnist_vae.models.families import build_model
from mnist_vae.models.weights import save_model
from mnist_vae.paths import Paths, project_root
from mnist_vae.registry import provenance
from mnist_vae.stages import runner
from mnist_vae.training import checkpoint, distributed
from mnist_vae.training.flops import training_flops
from mnist_vae.training.trainer import EpochStats, Trainer

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths | None = None, progress: bool | None = None) -> str:
    """Trains the VAE; returns the MLflow run id.

    Checks the tracking server and the dataset before spending any time on training. Inside
    ``mlflow run`` (``MLFLOW_RUN_ID`` set) it logs into that run.
    """
    import mlflow

    dataset = params.data.dataset
    paths = paths or Paths.of(dataset)
    rank, world = distributed.init(params.train.device)
    data = load_dataset(paths.data)
    if rank != 0:
        # Other processes train their shard and nothing else: rank 0 alone logs and writes.
        logging.getLogger("mnist_vae").setLevel(logging.WARNING)
        for _ in _prepare(params, paths, data)[0].epochs(progress=False):
            pass
        return ""
    root = project_root()
    tracking.configure(root)
    trainer, data_md5, fingerprint, resumed = _prepare(params, paths, data)
    history: list[EpochStats] = []
    if resumed is not None:
        history = [EpochStats(**h) for h in resumed["history"]]
        log.info(
            "resuming from %s after epoch %d (MLflow run %s)",
            paths.checkpoint,
            trainer.epoch,
            resumed["run_id"],
        )
        with tracking.server_errors(f"log into run {resumed['run_id']}"):
            run = mlflow.start_run(run_id=resumed["run_id"])
        with _failed_on_error():
            # The checkpoint is written before an epoch's metrics are logged; a kill in between
            # leaves metrics to log now.
            client = mlflow.MlflowClient()
            logged = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
            for stats in history:
                if stats.epoch not in logged:
                    mlflow.log_metrics(stats.metrics(), step=stats.epoch)
    else:
        experiment = params.mlflow.experiment
        with tracking.server_errors(f"log runs in experiment {experiment!r}"):
            run = mlflow.start_run(
                experiment_id=tracking.experiment_id(experiment, root),
                run_name=provenance.run_name(params),
                tags=provenance.dvc_tags(),
            )
        # The budget in machine-independent units: one step's forward and backward pass, counted.
        flops = training_flops(trainer.model, params.train, len(trainer.data))
        log.info("training budget: %.3g floating-point operations (forward and backward)", flops)
        with _failed_on_error():
            mlflow.log_params({k: _param_value(v) for k, v in _read_params(params).items()})
            mlflow.set_tags(
                {
                    "mlflow.source.git.commit": provenance.git_commit(root),
                    "dvc.data.md5": data_md5,
                    "data.dataset": dataset,
                    "model.preset": params.model.preset,
                    "train.device_used": str(trainer.device),
                    "model.parameters": str(sum(p.numel() for p in trainer.model.parameters())),
                    "train.processes": str(world),
                    "train.flops": f"{flops:.3g}",
                }
            )
            x_train, y_train, x_val, y_val = data.split(params.train.validation)
            provenance.log_dataset(
                x_train, y_train, f"{dataset}-train", paths.data, data_md5, context="training"
            )
            if len(x_val):
                provenance.log_dataset(
                    x_val, y_val, f"{dataset}-validation", paths.data, data_md5, context="validation"
                )
    run_id = run.info.run_id
    metrics = _EpochMetrics()
    try:
        # SIGTERM stops training as Ctrl-C does: the checkpoint is kept, the run ends KILLED.
        with procs.signals_raise(lambda signum: KeyboardInterrupt(f"signal {signum}"), signal.SIGTERM):
            for stats in trainer.epochs(progress=progress):
                history.append(stats)
                checkpoint.save(
                    paths.checkpoint,
                    {
                        "fingerprint": fingerprint,
                        "run_id": run_id,
                        "trainer": trainer.state_dict(),
                        "history": [asdict(h) for h in history],
                    },
                )
                metrics.send(stats)
        metrics.flush()
        save_model(trainer.result, paths.model)
        atomic_write(paths.history, _history_csv(history))
        with tracking.artifact_errors():
            mlflow.set_tag(tracking.MODEL_MD5_TAG, tracking.file_md5(paths.model))
            mlflow.log_artifact(str(paths.history))
        atomic_write(
            paths.run,
            json.dumps(
                {
                    "run_id": run_id,
                    "experiment_id": run.info.experiment_id,
                    "tracking_uri": tracking.redacted(mlflow.get_tracking_uri()),
                },
                indent=2,
            )
            + "\n",
        )
    except KeyboardInterrupt:
        _end_run("KILLED")
        raise
    except BaseException:
        _end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    paths.checkpoint.unlink(missing_ok=True)
    log.info("train: run %s, final loss %.4f", run_id, history[-1].loss)
    return run_id


class _EpochMetrics:
    """Sends each epoch's metrics to the tracking server. While it does not answer, training goes
    on: the metrics wait here and are sent after the next epoch; if the server is still down when
    training ends, :meth:`flush` fails the stage with the checkpoint kept, and the next run resumes
    into the same MLflow run and logs them."""

    def __init__(self) -> None:
        self.pending: list[EpochStats] = []

    def send(self, stats: EpochStats) -> None:
        self.pending.append(stats)
        try:
            self._send_pending()
        except tracking.TrackingUnavailableError as exc:
            log.warning(
                "%s; metrics of epochs %s kept, sent again after the next epoch",
                exc,
                ", ".join(str(s.epoch) for s in self.pending),
            )

    def flush(self) -> None:
        """Sends what is left; raises :class:`tracking.TrackingUnavailableError` if it cannot."""
        try:
            self._send_pending()
        except tracking.TrackingUnavailableError as exc:
            raise tracking.TrackingUnavailableError(
                f"{exc}; training finished, but the metrics of epochs "
                f"{', '.join(str(s.epoch) for s in self.pending)} could not be logged. The "
                "checkpoint is kept: run the stage again (dvc repro) when the server is back to "
                "log them into the same run and finish"
            ) from None

    def _send_pending(self) -> None:
        import mlflow

        while self.pending:
            with tracking.artifact_errors():
                mlflow.log_metrics(self.pending[0].metrics(), step=self.pending[0].epoch)
            self.pending.pop(0)


@contextlib.contextmanager
def _failed_on_error() -> Iterator[None]:
    """Ends the active run FAILED when the block raises: MLflow would otherwise end it FINISHED at
    exit, a run with no metrics that looks complete."""
    try:
        yield
    except BaseException:
        _end_run("FAILED")
        raise


def _end_run(status: str) -> None:
    """Ends the active run; a server that is down must not hide the error that got us here."""
    import mlflow

    try:
        mlflow.end_run(status)
    except Exception as exc:  # the original failure is re-raised by the caller
        log.warning("could not mark MLflow run %s: %s", status, str(exc).splitlines()[0][:200])


def _prepare(
    params: Params, paths: Paths, data: ImageData
) -> tuple[Trainer, str, dict[str, str], dict | None]:
    """The trainer, restored from the checkpoint when one matches; with the data's MD5, the
    checkpoint fingerprint and the checkpoint (None when starting afresh)."""
    x_train, _, x_val, _ = data.split(params.train.validation)
    trainer = Trainer(
        build_model(params.model, seed=params.train.seed), x_train, params.train, validation=x_val
    )
    data_md5 = tracking.file_md5(paths.data)
    code = checkpoint.code_digest()
    fingerprint = checkpoint.fingerprint(params.model.to_dict(), params.train.to_dict(), data_md5, code)
    resumed = checkpoint.load(paths.checkpoint, fingerprint)
    if resumed is not None:
        trainer.load_state_dict(resumed["trainer"])
    return trainer, data_md5, fingerprint, resumed


# What changes from run to run with the same weights (speed, the threads a share of the cores gave):
# in MLflow's metrics, not in the DVC output, whose hash must follow the weights alone.
_TIMINGS = ("samples_per_sec", "seconds", "threads")


def _history_csv(history: list[EpochStats]) -> str:
    buffer = io.StringIO()
    columns = [k for k in asdict(history[0]) if k not in _TIMINGS]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for stats in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(stats).items()})
    return buffer.getvalue()


def _read_params(params: Params) -> dict[str, object]:
    """The params this stage reads (dvc.yaml lists them): ``data.dataset``, ``model.*``, ``train.*``
    and ``mlflow.experiment``, flat, as the run's MLflow params."""
    sections = {"model": params.model.to_dict(), "train": params.train.to_dict()}
    flat = {
        f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
    }
    return {"data.dataset": params.data.dataset, **flat, "mlflow.experiment": params.mlflow.experiment}


def _param_value(value: object) -> object:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> None:
    with runner.reporting("train"):
        params = runner.parse_args("train", argv, __doc__)
        if params.train.nproc > 1 and not distributed.under_torchrun():
            sys.exit(
                distributed.relaunch(
                    params.train.nproc, "pipeline/train.py", sys.argv[1:] if argv is None else argv
                )
            )
        try:
            run(params)
        finally:
            distributed.shutdown()
