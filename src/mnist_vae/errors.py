"""The failures a user can cause and fix, reported as one line instead of a traceback."""

from __future__ import annotations

from mnist_vae.config import ConfigError
from mnist_vae.data import DatasetMissingError, DownloadError, IdxError
from mnist_vae.registry import ModelNotFoundError
from mnist_vae.tracking import TrackingUnavailableError
from mnist_vae.train import TrainingDivergedError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetMissingError,
    DownloadError,
    IdxError,
    ModelNotFoundError,
    TrackingUnavailableError,
    TrainingDivergedError,
    FileNotFoundError,
    ValueError,
    RuntimeError,
)
