"""The registry on an embedded store: incomplete registrations stay out of sight, rollback undoes
the gate's promotions, the champion read tells a missing alias from a failure."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_vae.registry import aliases, gate, references


@pytest.fixture
def client(mlflow_store: str, tmp_path) -> MlflowClient:
    """Model ``m`` with version 1 complete, 2 pending (its registration failed part way), and 3
    registered before the registration tag existed."""
    client = MlflowClient(mlflow_store, mlflow_store)
    client.create_registered_model("m")
    for state in (aliases.COMPLETE, aliases.PENDING, None):
        tags = {aliases.REGISTRATION_TAG: state} if state else {}
        client.create_model_version("m", source=str(tmp_path), tags=tags)
    return client


def test_a_pending_version_is_left_out_of_the_listing(client: MlflowClient) -> None:
    assert [row.version for row in aliases.list_versions(client, "m")] == ["3", "1"]


def test_a_pending_version_cannot_be_promoted(client: MlflowClient) -> None:
    with pytest.raises(aliases.ModelNotFoundError, match="incomplete registration"):
        aliases.promote(client, "m", "2")
    assert aliases.champion(client, "m") is None
    assert aliases.promote(client, "m", "3") is None
    assert aliases.champion(client, "m") == "3"


def test_the_champion_read_tells_a_missing_alias_from_a_failure(client: MlflowClient) -> None:
    assert aliases.champion(client, "m") is None
    assert aliases.champion(client, "no-such-model") is None
    client.set_registered_model_alias("m", aliases.CHAMPION, "1")
    assert aliases.champion(client, "m") == "1"
    with pytest.raises(MlflowException):  # an invalid name is not "no champion"
        aliases.champion(client, "")


def test_rollback_undoes_a_promotion_by_the_gate(
    client: MlflowClient, tiny_images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate moves champion from version 1 to 3 and records it as any promotion: `models` says
    the gate moved it, and one rollback returns to version 1."""
    from mnist_vae.config import EvaluateConfig, ModelConfig, TrainConfig
    from mnist_vae.models.families import build_model
    from mnist_vae.training.trainer import train_epochs

    images, labels = tiny_images(128)
    untrained = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0)
    trained = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0)
    list(train_epochs(trained, images, TrainConfig(device="cpu", epochs=3, batch_size=16, lr=3e-3)))
    data = gate.GateData(images, labels, "the tiny images")
    cfg = EvaluateConfig()
    # Version 1's files are not a model here: the gate measures the champion as this untrained one.
    monkeypatch.setattr(gate, "load_vae", lambda reference: untrained)

    first = gate.promotion_gate(client, "m", "1", untrained, data, cfg, settle=0)
    assert first.promoted and aliases.champion(client, "m") == "1"
    move = aliases.last_move(client, "m")
    assert move is not None and (move.version, move.by, move.previous) == ("1", gate.GATE, None)
    with pytest.raises(aliases.NothingToRollBackError):
        aliases.rollback(client, "m")  # the first champion replaced nothing

    second = gate.promotion_gate(client, "m", "3", trained, data, cfg, settle=0)
    assert second.promoted, second.reason
    move = aliases.last_move(client, "m")
    assert move is not None and (move.version, move.by, move.previous) == ("3", gate.GATE, "1")
    assert move.at  # when, as an ISO time

    assert aliases.rollback(client, "m") == "1"
    assert aliases.champion(client, "m") == "1"
    move = aliases.last_move(client, "m")
    assert move is not None and move.by.startswith("rollback by ") and move.previous is None
    with pytest.raises(aliases.NothingToRollBackError):
        aliases.rollback(client, "m")  # consumed: no flip-flop


def test_loading_a_logged_model_leaves_no_copy_behind(
    mlflow_store: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate and `evaluate models:/...` download a model each time: the copy goes afterwards."""
    import tempfile

    import mlflow
    import torch

    from mnist_vae.config import ModelConfig
    from mnist_vae.models.families import build_model
    from mnist_vae.models.weights import save_model

    model = build_model(ModelConfig(preset="mlp", hidden=(8,), latent=2), seed=0)
    save_model(model, tmp_path / "model.pt")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "model.pt"), artifact_path="model")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = references.load_vae(f"runs:/{run.info.run_id}/model")
    x = torch.rand(2, 784)
    assert torch.equal(loaded.encode(x)[0], model.eval().encode(x)[0])
    assert list(scratch.iterdir()) == [], "a downloaded copy of the model was left behind"


def test_the_gate_compares_one_protocol_only(client: MlflowClient, tiny_images, monkeypatch) -> None:
    """A binarised candidate never displaces a grey champion, however it scores; without a
    validation split no candidate is compared; each version records its protocol."""
    from mnist_vae.config import EvaluateConfig, ModelConfig
    from mnist_vae.models.families import build_model

    images, labels = tiny_images(64)

    untrained = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0)
    data = gate.GateData(images, labels, "the tiny images")
    grey = gate.Protocol("md5-of-mnist", binarized=False, validation=10_000)
    for key, value in grey.tags().items():  # version 1, the champion to be: grey
        client.set_model_version_tag("m", "1", key, value)
    monkeypatch.setattr(gate, "load_vae", lambda reference: untrained)
    cfg = EvaluateConfig()

    first = gate.promotion_gate(client, "m", "1", untrained, data, cfg, settle=0, protocol=grey)
    assert first.promoted
    binarised = gate.Protocol("md5-of-mnist", binarized=True, validation=0)
    refused = gate.promotion_gate(client, "m", "3", untrained, data, cfg, settle=0, protocol=binarised)
    assert not refused.promoted and refused.error is None and aliases.champion(client, "m") == "1"
    assert "trained and measured as mnist, binarised, validation 0, data md5-of-m" in refused.reason
    assert "champion version 1 as mnist, grey, validation 10000, data md5-of-m" in refused.reason
    # Another dataset is refused even with the same file digest and split.
    fashion = gate.Protocol("md5-of-mnist", binarized=False, validation=10_000, dataset="fashion-mnist")
    refused = gate.promotion_gate(client, "m", "3", untrained, data, cfg, settle=0, protocol=fashion)
    assert not refused.promoted and aliases.champion(client, "m") == "1"
    assert "as fashion-mnist, grey, validation 10000" in refused.reason
    assert "champion version 1 as mnist, grey, validation 10000" in refused.reason
    smaller_split = gate.Protocol("md5-of-mnist", binarized=False, validation=5_000)
    refused = gate.promotion_gate(client, "m", "3", untrained, data, cfg, settle=0, protocol=smaller_split)
    assert (
        not refused.promoted and "validation 5000" in refused.reason and "validation 10000" in refused.reason
    )
    assert gate.Protocol.from_tags(dict(client.get_model_version("m", "1").tags)) == grey


def test_without_a_validation_split_only_the_first_version_becomes_champion(
    client: MlflowClient, tiny_images, monkeypatch
) -> None:
    from mnist_vae.config import EvaluateConfig, ModelConfig
    from mnist_vae.models.families import build_model

    images, labels = tiny_images(64)
    untrained = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=2), seed=0)
    data = gate.GateData(images, labels, "the last 10000 training images (train.validation is 0)")
    paper = gate.Protocol("md5", binarized=True, validation=0)
    for version in ("1", "3"):
        for key, value in paper.tags().items():
            client.set_model_version_tag("m", version, key, value)
    monkeypatch.setattr(gate, "load_vae", lambda reference: untrained)
    cfg = EvaluateConfig()
    assert gate.promotion_gate(client, "m", "1", untrained, data, cfg, settle=0, protocol=paper).promoted
    second = gate.promotion_gate(client, "m", "3", untrained, data, cfg, settle=0, protocol=paper)
    assert not second.promoted and aliases.champion(client, "m") == "1"
    assert "no images are unseen by both it and champion version 1" in second.reason
