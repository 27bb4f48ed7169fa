"""End to end: a real `dvc repro` in a copy of the repo, then what MLflow and DVC recorded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

# A small budget: enough steps that the model clearly beats the mean image, a minute on 2 cores.
# The default preset (hvae), narrowed; one thread, whatever else runs beside it (`threads: auto`
# takes a share of the cores, and another thread count sums in another order: other weights).
SMALL = {
    "model": {"channels": [8, 16], "blocks": 1, "dense": 128, "latent": 8, "latent2": 4, "hidden2": 32},
    "train": {"epochs": 3, "limit": 8000, "validation": 1000, "batch_size": 64, "lr": 0.004, "threads": 1},
    "evaluate": {"limit": 1000, "iw_samples": 4},
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, copy_repo, shared_mnist: Path, venv_bin: Path
) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the repo (tracked and new files, no outputs), with small params, reproduced."""
    root = tmp_path_factory.mktemp("e2e") / "project"
    copy_repo(root, SMALL)
    env = {
        **os.environ,
        "MNIST_MIRRORS": str(shared_mnist),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        _run(args, root, env)
    _run(["dvc", "repro"], root, env)
    # What `make install` does on a fresh clone: the offline page template of `dvc plots show`.
    _run([str(venv_bin / "python"), "-m", "mnist_vae.evaluation.plots"], root, env)
    return root, env


def _client(root: Path):
    import mlflow

    # Not mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI in
    # os.environ, which servers started by later tests would inherit.
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return mlflow.MlflowClient(uri, uri)


def test_dvc_records_metrics_and_plots(project: tuple[Path, dict[str, str]]) -> None:
    root, env = project
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], root, env).stdout)
    values = metrics[""]["data"]["metrics.json"]["data"]
    assert 0 < values["neg_elbo"] < 400
    assert values["nll_iw"] <= values["neg_elbo"] + 1.0
    assert set(values["per_digit_mse"]) == {str(d) for d in range(10)}
    assert values["n_images"] == 1000
    for png in FIGURES + LAYER_FIGURES:
        assert (root / "reports" / "figures" / png).stat().st_size > 1000
    history = (root / "reports" / "train_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,recon,kl") and len(history) == 4
    status = _run(["dvc", "status"], root, env).stdout
    assert "up to date" in status


FIGURES = ("reconstructions.png", "samples.png", "latent.png", "traversal.png")
# The default's lower latent layer, plotted beside the code (the top layer, latent.png); no DVC
# plot, as a one-layer model has none.
LAYER_FIGURES = ("latent_z1.png",)


def _offline_page(html: str) -> None:
    """The page loads nothing from the network: no remote script, style or image, Vega inline."""
    remote = re.findall(
        r"""<(?:script|link|img)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", html, flags=re.IGNORECASE
    )
    assert not remote, remote
    assert "cdn.jsdelivr.net" not in html
    assert "vegaEmbed" in html and len(html) > 500_000  # the bundled libraries, inline


def _body(html: str) -> str:
    """The page's body: what follows the last <body> tag (the inline bundle's text holds some)."""
    return html[html.rindex("<body>") :]


def test_dvc_plots_show_works_offline_with_curves_and_figures(
    project: tuple[Path, dict[str, str]],
) -> None:
    root, env = project
    _run(["dvc", "plots", "show", "-o", str(root / "plots")], root, env)
    html = (root / "plots" / "index.html").read_text()
    _offline_page(html)
    assert "val_neg_elbo" in html  # the loss curves' data
    images = re.findall(r'<img[^>]*src="([^"]+)"', _body(html))
    assert sorted(Path(src).name.split("_")[-1] for src in images) == sorted(FIGURES)
    for src in images:
        assert (root / "plots" / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src


def test_dvc_plots_diff_shows_two_revisions_figures_side_by_side(
    project: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    root, env = project
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, symlinks=True)
    for args in (
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run 1"],
    ):
        _run(args, clone, env)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["evaluate"]["seed"] = 1  # other samples in samples.png: the evaluate stage only
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], clone, env)
    _run(["dvc", "plots", "diff", "HEAD", "-o", str(clone / "diff")], clone, env)
    html = (clone / "diff" / "index.html").read_text()
    _offline_page(html)
    images = re.findall(r'<img[^>]*src="([^"]+)"', _body(html))
    for figure in FIGURES:
        shown = [src for src in images if src.endswith(figure)]
        assert len(shown) == 2, (figure, images)  # HEAD's and the workspace's
    head, workspace = (clone / "diff" / src for src in images if src.endswith("samples.png"))
    assert head.read_bytes() != workspace.read_bytes()


def test_training_again_gives_the_same_weights_and_leaves_the_checkout_clean(
    project: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """What a fresh clone's `make repro` meets when the weights come out the same: every tracked
    file as committed (dvc.lock, metrics.json) and `dvc status` clean, since what differs from run to
    run (the MLflow run id, the epochs' timings) is no DVC output."""
    root, env = project
    clone = tmp_path / "clone"
    shutil.copytree(root, clone, symlinks=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "add", "-A"], clone, env)
    _run([*git, "commit", "-qm", "reproduced"], clone, env)
    weights, run_record = (
        (clone / "models" / "model.pt").read_bytes(),
        (clone / "models" / "run.json").read_text(),
    )
    _run(["dvc", "repro", "--force", "--single-item", "train"], clone, env)
    assert (clone / "models" / "model.pt").read_bytes() == weights, "the same training gave other weights"
    assert (clone / "models" / "run.json").read_text() != run_record  # a new MLflow run...
    out = _run(["dvc", "repro"], clone, env).stdout
    assert "Running stage 'evaluate'" not in out  # ...and nothing downstream to redo
    assert _run(["git", "status", "--porcelain"], clone, env).stdout == ""
    assert "up to date" in _run(["dvc", "status"], clone, env).stdout


def test_mlflow_run_has_epochs_params_tags_and_artifacts(
    project: tuple[Path, dict[str, str]],
) -> None:
    root, _ = project
    client = _client(root)
    experiment = client.get_experiment_by_name("mnist-vae")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    for metric in ("train_loss", "train_kl", "train_mse_pixel", "train_kl_pixel", "val_neg_elbo"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1, 2, 3], metric
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["model.preset"] == "hvae"
    assert run.data.params["model.channels"] == "8,16"
    assert run.data.metrics["test_neg_elbo"] > 0
    assert len(run.data.tags["mlflow.source.git.commit"]) >= 40
    assert (
        run.data.tags["dvc.data.md5"]
        == yaml.safe_load((root / "dvc.lock").read_text())["stages"]["download"]["outs"][0]["md5"]
    )
    # The first version is champion; the gate measured it on the held-out split, not the test set.
    assert run.data.tags["registry.gate_reason"].startswith("version 1 is the first champion")
    assert "on the validation split (1000 images)" in run.data.tags["registry.gate_reason"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {f"figures/{figure}" for figure in FIGURES + LAYER_FIGURES}


def test_registered_model_reconstructs_better_than_the_mean_image(
    project: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    root, _ = project
    client = _client(root)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # for models:/ below, this test only
        monkeypatch.setenv(name, f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version("mnist-vae", "1")
    assert str(client.get_model_version_by_alias("mnist-vae", "champion").version) == "1"
    assert float(version.tags["test_neg_elbo"]) > 0
    model = mlflow.pyfunc.load_model("models:/mnist-vae/1")
    data = np.load(root / "data" / "mnist.npz")
    x = data["x_test"][:256].reshape(256, -1).astype(np.float32) / 255
    reconstruction = np.asarray(model.predict(x))
    mean_image = data["x_train"].reshape(60000, -1).mean(0) / 255
    model_mse = ((reconstruction - x) ** 2).mean()
    baseline_mse = ((mean_image - x) ** 2).mean()
    assert reconstruction.shape == x.shape
    assert model_mse < 0.8 * baseline_mse


def test_changing_an_evaluation_knob_does_not_retrain(
    project: tuple[Path, dict[str, str]],
) -> None:
    """`dvc exp run -S evaluate...` reruns evaluate only, into the same MLflow run and store."""
    root, env = project
    model_before = (root / "models" / "model.pt").read_bytes()
    result = _run(["dvc", "exp", "run", "-S", "evaluate.iw_samples=2"], root, env)
    assert "Running stage 'train'" not in result.stdout
    assert "Running stage 'evaluate'" in result.stdout
    assert (root / "models" / "model.pt").read_bytes() == model_before
    client = _client(root)
    runs = client.search_runs([client.get_experiment_by_name("mnist-vae").experiment_id])
    assert len(runs) == 1
    assert {str(v.version) for v in client.search_model_versions("name='mnist-vae'")} == {"1", "2"}
    # The same evaluation again (`dvc repro -f evaluate`) registers no duplicate of version 2.
    result = _run(["dvc", "repro", "--force", "--single-item", "evaluate"], root, env)
    assert "version 2 of mnist-vae already holds these weights" in result.stdout
    assert {str(v.version) for v in client.search_model_versions("name='mnist-vae'")} == {"1", "2"}


def test_mlproject_train_entry_point(project: tuple[Path, dict[str, str]]) -> None:
    """`mlflow run . -e train --env-manager local -P epochs=1` trains into the project's store."""
    root, env = project
    _run(
        [
            "mlflow",
            "run",
            ".",
            "-e",
            "train",
            "--env-manager",
            "local",
            "--experiment-name",
            "mnist-vae",
            "-P",
            "epochs=1",
            "-P",
            "limit=1000",
        ],
        root,
        env,
    )
    client = _client(root)
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist-vae").experiment_id], order_by=["attribute.start_time DESC"]
    )
    assert len(runs) == 2
    newest = runs[0]
    assert newest.data.params["train.epochs"] == "1"
    assert newest.data.params["train.limit"] == "1000"
    assert [m.step for m in client.get_metric_history(newest.info.run_id, "train_kl")] == [1]
    assert newest.info.status == "FINISHED"
