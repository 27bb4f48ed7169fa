"""Stage ``evaluate``: measures the trained model on the test set, logs it all and registers it.

Reads ``models/model.pt`` and the MLflow run that ``train`` recorded in ``models/run.json``; writes
``metrics.json`` and ``reports/figures/*.png``, logs both into that run, and registers a new version of
the model (the promotion gate then decides whether it becomes ``champion``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mnist_vae import registry, runner, tracking
from mnist_vae.atomic import atomic_write
from mnist_vae.config import Params
from mnist_vae.data import MnistData, load_mnist
from mnist_vae.errors import UserError
from mnist_vae.evaluate import Evaluation, evaluate_model, select, write_figures
from mnist_vae.model import load_model
from mnist_vae.paths import DEFAULT_PATHS, Paths, project_root

log = logging.getLogger(__name__)


class RunRecordError(UserError):
    """``models/run.json`` is missing or is not what the train stage writes."""


def run(params: Params, paths: Paths = DEFAULT_PATHS) -> Evaluation:
    """Evaluates, logs and registers; returns the test measurements."""
    import mlflow

    root = project_root()
    tracking.configure(root)
    run_id = read_run_id(paths.run)
    data = load_mnist(paths.data)
    model = load_model(paths.model)
    images, labels = select(data.x_test, data.y_test, params.evaluate.limit)
    evaluation = evaluate_model(model, images, labels, params.evaluate)
    atomic_write(paths.metrics, json.dumps(evaluation.to_json(), indent=2) + "\n")
    figures = write_figures(model, images, paths.figures, n=params.evaluate.n_images,
                            seed=params.evaluate.seed)
    with mlflow.start_run(run_id=run_id):
        # Evaluation settings are tags, not params: a re-evaluation with other settings writes into
        # the same run, and MLflow forbids changing a param's value.
        mlflow.set_tags({f"evaluate.{k}": str(v) for k, v in params.to_dict()["evaluate"].items()})
        mlflow.log_dict(evaluation.to_json(), "metrics.json")
        for figure in figures:
            mlflow.log_artifact(str(figure), artifact_path="figures")
        version = registry.log_and_register(model, params, evaluation, (images, labels),
                                             _gate_data(data, params), paths, root)
    log.info("evaluate: test neg. ELBO %.2f nats, registered %s version %s",
             evaluation.metrics["neg_elbo"], params.mlflow.registered_model, version)
    return evaluation


def _gate_data(data: MnistData, params: Params) -> registry.GateData:
    """The validation split the model was not trained on; without one (a paper's profile trains on
    all 60000 images), the last 10000 training images, and the gate says so."""
    n = params.train.validation
    _, _, x_val, y_val = data.split(n)
    if n:
        return registry.GateData(x_val, y_val, f"the validation split ({n} images)")
    return registry.GateData(data.x_train[-10_000:], data.y_train[-10_000:],
                             "the last 10000 training images (train.validation is 0)")


def read_run_id(path: Path) -> str:
    """The MLflow run id that the train stage wrote.

    Raises:
        RunRecordError: The file is missing or malformed.
    """
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except FileNotFoundError:
        raise RunRecordError(f"{path}: missing; run the train stage first (dvc repro train)") \
            from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RunRecordError(f"{path}: expected JSON with a 'run_id', as the train stage writes") \
            from None


def main(argv: list[str] | None = None) -> None:
    with runner.reporting("evaluate"):
        run(runner.parse_args("evaluate", argv, __doc__))
