"""Many experiments: runs told apart, DVC grids through the queue, models chosen on the validation
split, cores shared between trainings, and the Optuna search."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

TINY = {
    "model": {"preset": "mlp", "hidden": [64], "latent": 4},
    "train": {"epochs": 2, "limit": 1500, "validation": 500, "batch_size": 64, "threads": 1},
    "evaluate": {"limit": 300, "iw_samples": 2, "n_images": 4},
}


def _run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dvc_project(
    tmp_path_factory: pytest.TempPathFactory, copy_repo, shared_mnist: Path, venv_bin: Path
) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the repo with tiny params, reproduced and committed."""
    root = tmp_path_factory.mktemp("exps") / "project"
    copy_repo(root, TINY)
    env = {
        **os.environ,
        "MNIST_MIRRORS": str(shared_mnist),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT"):
        env.pop(name, None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "repro"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run([*git, "commit", "-qm", "reproduced"], root, env)
    return root, env


def _client(root: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _runs(root: Path) -> list:
    client = _client(root)
    experiment = client.get_experiment_by_name("mnist-vae")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_two_trainings_with_one_seed_have_distinct_names(dvc_project) -> None:
    root, env = dvc_project
    before = {r.info.run_id for r in _runs(root)}
    for _ in range(2):
        _run([sys.executable, "pipeline/train.py", "--set", "train.epochs=1"], root, env)
    new = [r for r in _runs(root) if r.info.run_id not in before]
    assert len(new) == 2
    names = [r.info.run_name for r in new]
    assert names[0] != names[1], names
    for name in names:  # <preset>-<params hash>-<time>-<random>
        assert re.fullmatch(r"mlp-[0-9a-f]{7}-\d{4}-\d{6}-[0-9a-f]{4}", name), name
    assert names[0].split("-")[1] == names[1].split("-")[1]  # same params, same hash


def _exp_show(root: Path, env: dict[str, str]) -> dict[str, dict]:
    """``dvc exp show --json``: experiment name -> its metrics and params."""
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for revision in exp.get("revs") or []:
                data = revision.get("data") or {}
                found[revision.get("name") or exp.get("name")] = data
    return found


def test_dvc_exp_run_names_the_mlflow_run(dvc_project) -> None:
    root, env = dvc_project
    out = _run(["dvc", "exp", "run", "-S", "train.lr=0.0025", "-n", "lr-25e-4"], root, env).stdout
    assert "lr-25e-4" in out
    run = next(r for r in _runs(root) if r.info.run_name == "lr-25e-4")
    assert run.data.tags["dvc.exp_name"] == "lr-25e-4"
    assert run.data.params["train.lr"] == "0.0025"
    assert "test_neg_elbo" in run.data.metrics


def test_a_grid_through_the_queue_with_two_jobs(dvc_project) -> None:
    root, env = dvc_project
    # Both values differ from params.yaml's lr: an experiment equal to the baseline reruns nothing.
    _run(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.0015,0.002"], root, env)
    _run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 600
    while True:
        status = _run(["dvc", "queue", "status"], root, env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert "Failed" not in status, status
    names = re.findall(r"^[0-9a-f]+\s+(\S+)\s.*\bSuccess$", status, re.MULTILINE)
    assert len(names) == 2, status
    shown = _exp_show(root, env)
    runs = {r.info.run_name: r for r in _runs(root)}
    for name in names:
        assert name in runs, f"no MLflow run named {name} in the project's store"
        assert runs[name].data.tags["dvc.exp_name"] == name
        metrics = shown[name]["metrics"]["metrics.json"]["data"]
        assert metrics["neg_elbo"] == pytest.approx(runs[name].data.metrics["test_neg_elbo"], rel=1e-5)
    assert {runs[n].data.params["train.lr"] for n in names} == {"0.0015", "0.002"}


def test_fashion_mnist_experiment_registers_its_own_model(dvc_project, shared_fashion_mnist: Path) -> None:
    """`dvc exp run -S data.dataset=fashion-mnist` downloads Fashion-MNIST into its own file (checked
    against its pinned digests), trains, evaluates and registers it as fashion-mnist-vae, with its
    names on the run; the MNIST model's versions and champion stay as they were. A Fashion-MNIST
    model sent to MNIST's registered name by hand is refused by the gate."""
    from mnist_vae.data.dataset import load_dataset

    root, env = dvc_project
    env = {**env, "FASHION_MNIST_MIRRORS": str(shared_fashion_mnist)}
    client = _client(root)
    mnist_champion = client.get_model_version_by_alias("mnist-vae", "champion").version
    mnist_versions = {v.version for v in client.search_model_versions("name='mnist-vae'")}

    out = _run(["dvc", "exp", "run", "-n", "fashion", "-S", "data.dataset=fashion-mnist"], root, env).stdout
    assert "Running stage 'download'" in out and "Running stage 'train'" in out, out
    fashion = load_dataset(root / "data" / "fashion-mnist.npz")
    assert fashion.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # README of the offline copy
    assert fashion.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert lock["download"]["outs"][0]["path"] == "data/fashion-mnist.npz"
    assert lock["train"]["params"]["params.yaml"]["data.dataset"] == "fashion-mnist"
    champion = client.get_model_version_by_alias("fashion-mnist-vae", "champion")
    assert str(champion.version) == "1" and champion.tags["protocol.dataset"] == "fashion-mnist"
    assert champion.tags["dataset"] == "fashion-mnist"
    run = client.get_run(champion.run_id)
    assert run.info.run_name == "fashion" and run.data.tags["data.dataset"] == "fashion-mnist"
    assert run.data.params["data.dataset"] == "fashion-mnist"
    names = {entry.dataset.name for entry in run.inputs.dataset_inputs}
    assert names == {"fashion-mnist-train", "fashion-mnist-validation", "fashion-mnist-test"}, names
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == str(mnist_champion)
    assert {v.version for v in client.search_model_versions("name='mnist-vae'")} == mnist_versions

    out = _run(
        ["dvc", "exp", "run", "-n", "fashion-as-mnist", "-S", "data.dataset=fashion-mnist"]
        + ["-S", "mlflow.registered_model=mnist-vae"],
        root,
        env,
    ).stdout
    assert "Running stage 'train'" not in out  # the same training: only evaluate reruns
    assert "stays candidate" in out and "as fashion-mnist, grey" in out, out
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == str(mnist_champion)
    added = {v.version for v in client.search_model_versions("name='mnist-vae'")} - mnist_versions
    assert len(added) == 1
    refused = client.get_model_version("mnist-vae", added.pop())
    assert refused.tags["protocol.dataset"] == "fashion-mnist"


# --- the promotion gate chooses on the validation split ----------------------------------------


def test_gate_follows_validation_when_test_disagrees(
    tmp_path: Path, tiny_images, mlflow_store, monkeypatch, repo_root: Path
) -> None:
    """Validation images are white pages, test images are bars: a model trained on bars is better
    on test but worse on validation, and the gate keeps the champion trained on white pages."""
    import mlflow

    from mnist_vae.config import load_params
    from mnist_vae.data.dataset import load_dataset
    from mnist_vae.evaluation.metrics import evaluate_model
    from mnist_vae.models.families import build_model
    from mnist_vae.models.weights import save_model
    from mnist_vae.paths import Paths
    from mnist_vae.stages import evaluate
    from mnist_vae.tracking import MODEL_MD5_TAG, file_md5
    from mnist_vae.training.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    bars, bar_labels = tiny_images(400, seed=1)
    white = np.full((100, 28, 28), 255, dtype=np.uint8)
    test_x, test_y = tiny_images(100, seed=2)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=np.concatenate([bars, white]),
        y_train=np.concatenate([bar_labels, np.zeros(100, np.uint8)]),
        x_test=test_x,
        y_test=test_y,
    )
    params = load_params(
        repo_root / "params.yaml",
        [
            "model.preset=mlp",
            "model.hidden=[32]",
            "model.latent=4",
            "train.validation=100",
            "train.epochs=3",
            "train.batch_size=20",
            "train.device=cpu",
            "evaluate.iw_samples=2",
            "evaluate.n_images=4",
        ],
    )
    paths = Paths(
        data=tmp_path / "mnist.npz",
        model=tmp_path / "model.pt",
        run=tmp_path / "run.json",
        metrics=tmp_path / "metrics.json",
        figures=tmp_path / "figures",
    )
    data = load_dataset(paths.data)
    test_scores = {}
    for name, images in (("white", np.repeat(white, 4, axis=0)), ("bars", bars)):
        trainer = Trainer(build_model(params.model, seed=0), images, params.train)
        for _ in trainer.epochs():
            pass
        save_model(trainer.model, paths.model)
        mlflow.set_tracking_uri(mlflow_store)
        # What the train stage leaves for evaluate: a run tagged with the weights' MD5.
        with mlflow.start_run(run_name=name, tags={MODEL_MD5_TAG: file_md5(paths.model)}) as run:
            pass
        paths.run.write_text(json.dumps({"run_id": run.info.run_id}))
        evaluate.run(params, paths)
        test_scores[name] = json.loads(paths.metrics.read_text())["neg_elbo"]
        assert test_scores[name] == pytest.approx(
            evaluate_model(trainer.model, data.x_test, data.y_test, params.evaluate).metrics["neg_elbo"]
        )
    assert test_scores["bars"] < test_scores["white"]  # better on the test set...
    client = mlflow.MlflowClient(mlflow_store)
    champion = client.get_model_version_by_alias("mnist-vae", "champion")
    assert str(champion.version) == "1"  # ...but not chosen: it is worse on the validation split
    reason = client.get_run(client.get_model_version("mnist-vae", "2").run_id).data.tags[
        "registry.gate_reason"
    ]
    assert "stays candidate" in reason and "validation split (100 images)" in reason


# --- cores shared between concurrent trainings -------------------------------------------------

_TRAIN_AND_REPORT_THREADS = """
import sys
import numpy as np
from mnist_vae.config import TrainConfig, ModelConfig
from mnist_vae.models.families import build_model
from mnist_vae.training.trainer import train_epochs
images = np.random.default_rng(0).integers(0, 256, (6000, 28, 28), dtype=np.uint8)
cfg = TrainConfig(device="cpu", epochs=int(sys.argv[1]), threads="auto", validation=0)
model = build_model(ModelConfig(preset="mlp", hidden=(256,), latent=8), seed=0)
for stats in train_epochs(model, images, cfg):
    print(stats.threads, flush=True)
"""


def test_threads_auto_gives_each_of_two_trainings_fewer_threads(tmp_path: Path) -> None:
    from mnist_vae.training.threads import available_cores

    if available_cores() < 2:
        pytest.skip("needs at least 2 cores to share")
    env = {**os.environ, "MNIST_VAE_CORES_DIR": str(tmp_path / "trainings")}

    def start(epochs: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _TRAIN_AND_REPORT_THREADS, str(epochs)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    alone = start(2)
    alone_threads = [int(x) for x in alone.communicate(timeout=300)[0].split()]
    assert alone_threads == [available_cores()] * 2
    pair = [start(6), start(6)]
    used = [[int(x) for x in p.communicate(timeout=300)[0].split()] for p in pair]
    for threads in used:
        assert len(threads) == 6
        # While both run, each takes its share; a training alone at the end may take all again.
        assert min(threads) == available_cores() // 2 < max(alone_threads), used


# --- the search ---------------------------------------------------------------------------------

SPACE = {
    "fixed": {"train.epochs": 2},
    "params": {
        "train.lr": {"float": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
        "model.latent": {"int": {"low": 2, "high": 8}},
        "model.hidden": {"categorical": [[32], [64, 32]]},
    },
}


@pytest.fixture
def tune_project(tmp_path: Path, make_project) -> tuple[Path, dict[str, str]]:
    env = make_project(tmp_path / "project", n_train=700, validation=200)
    root = tmp_path / "project"
    (root / "search_space.yaml").write_text(yaml.safe_dump(SPACE))
    return root, env


def _children(root: Path, parent_id: str) -> list:
    client = _client(root)
    experiment = client.get_experiment_by_name("mnist-vae")
    return client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def test_tune_four_trials_two_jobs(tune_project) -> None:
    from mnist_vae.config import load_params

    root, env = tune_project
    out = _run(["mnist-vae", "tune", "--trials", "4", "--jobs", "2"], root, env).stdout
    parent_id = re.search(r"MLflow parent run (\w+)", out).group(1)
    children = _children(root, parent_id)
    assert len(children) == 4
    pruned = [c for c in children if c.data.tags["tune.state"] == "PRUNED"]
    assert all(c.info.status == "KILLED" for c in pruned)
    assert f"({len(pruned)} pruned, 0 failed)" in out
    complete = [c for c in children if c.data.tags["tune.state"] == "COMPLETE"]
    best = min(complete, key=lambda c: c.data.metrics["val_neg_elbo_final"])
    assert len(best.data.metrics) and "val_neg_elbo" in best.data.metrics
    parent = _client(root).get_run(parent_id)
    assert parent.data.metrics["best_val_neg_elbo"] == pytest.approx(best.data.metrics["val_neg_elbo_final"])
    # The printed `dvc exp run -S ...` reproduces the best trial's params exactly.
    line = next(line for line in out.splitlines() if line.startswith("reproduce: dvc exp run "))
    overrides = re.findall(r"-S '([^']*)'", line)
    reproduced = load_params(root / "params.yaml", overrides).flat()
    for key in ("train.lr", "model.latent", "model.hidden", "train.epochs"):
        assert (
            str(reproduced[key]) == best.data.params[key]
            or ",".join(map(str, reproduced[key])) == best.data.params[key]
        ), key
