"""The pipeline's stages as library functions.

``pipeline/*.py`` (DVC), ``MLproject`` entry points and the ``mnist-vae`` CLI all call these, so there
is one code path from parameters to outputs. Every output is written to a temporary file and renamed,
so an interrupted stage never leaves a file that passes as complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mnist_vae import distributed, tracking
from mnist_vae.config import Params
from mnist_vae.data import download_mnist, load_mnist, resolve_mirrors
from mnist_vae.evaluate import Evaluation, evaluate_model, select, write_figures
from mnist_vae.model import build_model, load_model, save_model
from mnist_vae.train import EpochStats, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Paths:
    """Where the stages read and write, relative to the project root (as in dvc.yaml)."""

    data: Path = Path("data/mnist.npz")
    model: Path = Path("models/model.pt")
    run: Path = Path("models/run.json")
    history: Path = Path("reports/train_history.csv")
    metrics: Path = Path("metrics.json")
    figures: Path = Path("reports/figures")
    checkpoint: Path = Path("checkpoints/train.pt")


def download(params: Params, paths: Paths = Paths()) -> Path:
    """Stage ``download``: fetches and verifies MNIST into one ``.npz``."""
    mirrors = resolve_mirrors(params.data.mirrors, base=tracking.project_root())
    return download_mnist(paths.data, mirrors, timeout=params.data.timeout)


def train(params: Params, paths: Paths = Paths(), progress: bool | None = None) -> str:
    """Stage ``train``: trains the VAE, logging to MLflow; returns the MLflow run id.

    Checks the tracking server and the dataset before spending any time on training. Inside
    ``mlflow run`` (``MLFLOW_RUN_ID`` set) it logs into that run. At the end of every epoch it saves
    a checkpoint (model, optimiser, RNG states, history, run id); a run killed part way resumes from
    it, in the same MLflow run, and ends with the metrics of an uninterrupted run. Ctrl-C or SIGTERM
    keep the checkpoint and end the MLflow run as KILLED; a NaN loss ends it as FAILED.
    """
    import mlflow

    rank, world = distributed.init()
    if rank != 0:
        # Other processes train their shard and nothing else: rank 0 alone logs and writes.
        logging.getLogger("mnist_vae").setLevel(logging.WARNING)
        return _train_worker(params, paths)
    root = tracking.project_root()
    tracking.configure(root)
    trainer, data_md5, fingerprint, resumed = _prepare_trainer(params, paths)
    model = trainer.model
    history: list[EpochStats] = []
    if resumed is not None:
        history = [EpochStats(**h) for h in resumed["history"]]
        log.info("resuming from %s after epoch %d (MLflow run %s)", paths.checkpoint,
                 trainer.epoch, resumed["run_id"])
        run = mlflow.start_run(run_id=resumed["run_id"])
        # The checkpoint is written before an epoch's metrics are logged; a kill in between
        # leaves metrics to log now.
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id,
                                                                          "train_loss")}
        for stats in history:
            if stats.epoch not in logged:
                mlflow.log_metrics(stats.metrics(), step=stats.epoch)
    else:
        run = mlflow.start_run(experiment_id=tracking.experiment_id(params.mlflow.experiment, root))
        mlflow.log_params({k: _param_value(v) for k, v in params.flat().items()
                           if not k.startswith("evaluate.")})
        mlflow.set_tags({
            "mlflow.source.git.commit": tracking.git_commit(root),
            "dvc.data.md5": data_md5,
            "model.preset": params.model.preset,
            "train.device_used": str(trainer.device),
            "model.parameters": str(sum(p.numel() for p in model.parameters())),
            "train.processes": str(world),
        })
    run_id = run.info.run_id
    try:
        with _signals_as_interrupt():
            for stats in trainer.epochs(progress=progress):
                history.append(stats)
                _save_checkpoint(paths.checkpoint, {
                    "fingerprint": fingerprint, "run_id": run_id,
                    "trainer": trainer.state_dict(), "history": [asdict(h) for h in history],
                })
                mlflow.log_metrics(stats.metrics(), step=stats.epoch)
        save_model(model, paths.model)
        _write_atomic(paths.history, _history_csv(history))
        mlflow.log_artifact(str(paths.history))
        _write_atomic(paths.run, json.dumps({
            "run_id": run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": mlflow.get_tracking_uri(),
        }, indent=2) + "\n")
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
    paths.checkpoint.unlink(missing_ok=True)
    log.info("train: run %s, final loss %.4f", run_id, history[-1].loss)
    return run_id


def _train_worker(params: Params, paths: Paths) -> str:
    """A non-zero rank under torchrun: the same training steps, no store, no files."""
    trainer = _prepare_trainer(params, paths)[0]
    for _ in trainer.epochs(progress=False):
        pass
    return ""


def _prepare_trainer(params: Params, paths: Paths) -> tuple[Trainer, str, str, dict | None]:
    """The trainer, restored from the checkpoint when one matches; with the data's MD5, the
    checkpoint fingerprint and the checkpoint (None when starting afresh)."""
    data = load_mnist(paths.data)
    trainer = Trainer(build_model(params.model, seed=params.train.seed), data.x_train, params.train)
    data_md5 = tracking.file_md5(paths.data)
    fingerprint = _fingerprint(params, data_md5)
    resumed = _load_checkpoint(paths.checkpoint, fingerprint)
    if resumed is not None:
        trainer.load_state_dict(resumed["trainer"])
    return trainer, data_md5, fingerprint, resumed


def _fingerprint(params: Params, data_md5: str) -> str:
    """What a checkpoint must match to be resumed: the model and train params and the data."""
    import hashlib

    spec = json.dumps({"model": params.to_dict()["model"], "train": params.to_dict()["train"],
                       "data": data_md5}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint to resume from, or None (none, unreadable, or from other params or data)."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is one we start over from
        log.warning("ignoring unreadable checkpoint %s (%s); training from scratch", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s: it was made with other params or data", path)
        return None
    return state


@contextlib.contextmanager
def _signals_as_interrupt():
    """Turns SIGTERM into KeyboardInterrupt, so both stop training the same, clean way."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate(params: Params, paths: Paths = Paths()) -> Evaluation:
    """Stage ``evaluate``: measures the model on the test set, logs it all and registers the model.

    Writes into the MLflow run that ``train`` recorded in ``models/run.json``.
    """
    import mlflow

    from mnist_vae import registry

    root = tracking.project_root()
    tracking.configure(root)
    run_id = read_run_id(paths.run)
    data = load_mnist(paths.data)
    model = load_model(paths.model)
    images, labels = select(data.x_test, data.y_test, params.evaluate.limit)
    evaluation = evaluate_model(model, images, labels, params.evaluate)
    _write_atomic(paths.metrics, json.dumps(evaluation.to_json(), indent=2) + "\n")
    figures = write_figures(model, images, paths.figures, n=params.evaluate.n_images,
                            seed=params.evaluate.seed)
    with mlflow.start_run(run_id=run_id):
        # Evaluation settings are tags, not params: a re-evaluation with other settings writes into
        # the same run, and MLflow forbids changing a param's value.
        mlflow.set_tags({f"evaluate.{k}": str(v) for k, v in asdict(params.evaluate).items()})
        mlflow.log_metrics(evaluation.mlflow_metrics())
        mlflow.log_dict(evaluation.to_json(), "metrics.json")
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="figures")
        version = registry.log_and_register(model, params, evaluation, (images, labels), paths,
                                             root)
    log.info("evaluate: test neg. ELBO %.2f nats, registered %s version %s",
             evaluation.metrics["neg_elbo"], params.mlflow.registered_model, version)
    return evaluation


def read_run_id(path: Path) -> str:
    """The MLflow run id that the train stage wrote."""
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run the train stage first (dvc repro train)") \
            from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: expected JSON with a 'run_id', as the train stage writes") \
            from None


def _history_csv(history: list[EpochStats]) -> str:
    buffer = io.StringIO()
    fields = list(asdict(history[0]))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for stats in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v)
                         for k, v in asdict(stats).items()})
    return buffer.getvalue()


def _param_value(value: object) -> object:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_to_temp_dir(path: Path, name: str) -> Path:
    """Copies one file into a fresh temporary folder (MLflow logs folders as model data)."""
    folder = Path(tempfile.mkdtemp(prefix="mnist-vae-"))
    shutil.copy2(path, folder / name)
    return folder


STAGES = {"download": download, "train": train, "evaluate": evaluate}


def main(stage: str, argv: list[str] | None = None) -> None:
    """Command line of one stage: ``python pipeline/<stage>.py [--params F] [--set k=v ...]``.

    Known failures (bad params, missing data, unreachable server...) end with one line on stderr
    and exit code 1, not a traceback.
    """
    import argparse
    import sys

    from mnist_vae.config import load_params, parse_override
    from mnist_vae.errors import USER_ERRORS

    parser = argparse.ArgumentParser(prog=f"pipeline/{stage}.py", description=STAGES[stage].__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.epochs=3 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        params = load_params(args.params, dict(parse_override(o) for o in args.overrides))
        if stage == "train" and params.train.nproc > 1 and not distributed.under_torchrun():
            sys.exit(distributed.relaunch(params.train.nproc, "pipeline/train.py",
                                          sys.argv[1:] if argv is None else argv))
        STAGES[stage](params)
    except USER_ERRORS as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted; the last finished epoch's checkpoint is kept, run "
              "again to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.shutdown()
