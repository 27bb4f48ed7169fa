"""Stage ``evaluate``: measures the trained model on the test set, logs it all and registers it.

Reads ``models/model.pt`` and continues the MLflow run that trained it (the run tagged with the
weights' MD5; ``models/run.json`` names it when the train stage ran here); writes
``metrics.json`` and ``reports/figures/*.png``, logs both into that run, and registers a new version of
the model (the promotion gate then decides whether it becomes ``champion``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_vae import tracking
from mnist_vae.atomic import atomic_write
from mnist_vae.config import Params, registered_model
from mnist_vae.data.dataset import DATASETS, ImageData, load_dataset
from mnist_vae.errors import UserError
from mnist_vae.evaluation.figures import write_figures
from mnist_vae.evaluation.metrics import Evaluation, evaluate_model, select
from mnist_vae.models.weights import load_model
from mnist_vae.paths import Paths, project_root
from mnist_vae.registry.gate import GateData
from mnist_vae.registry.registration import log_and_register
from mnist_vae.stages import runner

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


class RunRecordError(UserError):
    """No MLflow run trained ``models/model.pt``, or ``models/run.json`` is not what the train
    stage writes."""


def run(params: Params, paths: Paths | None = None) -> Evaluation:
    """Evaluates, logs and registers; returns the test measurements.

    ``metrics.json`` and the figures are replaced only once everything is logged and registered: a
    store that fails half way leaves the previous ones, and no version, behind.
    """
    import mlflow

    dataset = DATASETS[params.data.dataset]
    paths = paths or Paths.of(dataset.name)
    name = registered_model(params)
    root = project_root()
    tracking.configure(root)
    run_id = training_run(paths)
    data = load_dataset(paths.data)
    model = load_model(paths.model)
    images, labels = select(data.x_test, data.y_test, params.evaluate.limit)
    evaluation = evaluate_model(model, images, labels, params.evaluate, progress=None)
    paths.figures.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=paths.figures.parent, prefix=".figures-") as scratch:
        figures = write_figures(
            model,
            images,
            Path(scratch),
            n=params.evaluate.n_images,
            seed=params.evaluate.seed,
            labels=labels,
            dataset=dataset,
        )
        with tracking.server_errors(f"log into run {run_id}"), mlflow.start_run(run_id=run_id):
            # Evaluation settings are tags, not params: a re-evaluation with other settings
            # writes into the same run, and MLflow forbids changing a param's value.
            mlflow.set_tags({f"evaluate.{k}": str(v) for k, v in params.evaluate.to_dict().items()})
            # What evaluate.precision (auto by default) meant on this machine.
            mlflow.set_tag("evaluate.precision_used", evaluation.precision)
            with tracking.artifact_errors(), tracking.server_errors(f"register versions of model {name!r}"):
                mlflow.log_dict(evaluation.to_json(), "metrics.json")
                for figure in figures:
                    mlflow.log_artifact(str(figure), artifact_path="figures")
                version = log_and_register(
                    model, params, evaluation, (images, labels), _gate_data(data, params), paths, root, name
                )
        atomic_write(paths.metrics, json.dumps(evaluation.to_json(), indent=2) + "\n")
        _replace_folder(Path(scratch), paths.figures)
    log.info(
        "evaluate: %s test neg. ELBO %.2f nats, registered %s version %s",
        dataset.title,
        evaluation.metrics["neg_elbo"],
        name,
        version,
    )
    return evaluation


def _replace_folder(new: Path, target: Path) -> None:
    """Moves ``new``'s files into ``target``, replacing it; each file by an atomic rename."""
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.iterdir():
        if not (new / stale.name).exists() and stale.is_file():
            stale.unlink()
    for item in new.iterdir():
        os.replace(item, target / item.name)


def _gate_data(data: ImageData, params: Params) -> GateData:
    """The validation split the model was not trained on; without one (a paper's profile trains on
    all 60000 images), the last 10000 training images, and the gate says so."""
    n = params.train.validation
    _, _, x_val, y_val = data.split(n)
    if n:
        return GateData(x_val, y_val, f"the validation split ({n} images)")
    return GateData(
        data.x_train[-10_000:],
        data.y_train[-10_000:],
        "the last 10000 training images (train.validation is 0)",
    )


def training_run(paths: Paths) -> str:
    """The id of the MLflow run that trained ``paths.model``, in the configured store.

    That is the run ``models/run.json`` names when its weights' MD5 tag matches the file (the train
    stage ran in this folder); otherwise the newest run tagged with that MD5, in any experiment:
    a run-cache hit, a `dvc pull` or another DVC experiment's training brought the weights.

    Raises:
        RunRecordError: No run in the store trained these weights.
    """
    import mlflow
    from mlflow import MlflowClient

    if not paths.model.is_file():
        raise RunRecordError(f"{paths.model}: missing; run the train stage first (dvc repro train)")
    md5 = tracking.file_md5(paths.model)
    client = MlflowClient()
    with tracking.server_errors("find the run that trained the model"):
        if paths.run.is_file():
            run_id = read_run_id(paths.run)
            if _tags(client, run_id).get(tracking.MODEL_MD5_TAG) == md5:
                return run_id
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            experiments,
            filter_string=f"tags.`{tracking.MODEL_MD5_TAG}` = '{md5}'",
            order_by=["attribute.start_time DESC"],
            max_results=1,
        )
    if not runs:
        raise RunRecordError(
            f"no MLflow run in {tracking.redacted(mlflow.get_tracking_uri())} trained {paths.model} "
            f"(MD5 {md5}); train it here (dvc repro --force train)"
        )
    return runs[0].info.run_id


def _tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    """The run's tags; none for a run this store does not hold (run.json from another store)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).data.tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def read_run_id(path: Path) -> str:
    """The MLflow run id that the train stage wrote.

    Raises:
        RunRecordError: The file is missing or malformed.
    """
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise RunRecordError(f"{path}: missing; run the train stage first (dvc repro train)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RunRecordError(f"{path}: expected JSON with a 'run_id', as the train stage writes") from None


def main(argv: list[str] | None = None) -> None:
    with runner.reporting("evaluate"):
        run(runner.parse_args("evaluate", argv, __doc__))
