"""The weights file (``models/model.pt``): architecture and tensors, saved atomically and loaded
without unpickling anything but tensors and plain containers."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from mnist_vae.atomic import atomic_write
from mnist_vae.errors import UserError, first_line
from mnist_vae.models.families import from_architecture
from mnist_vae.models.networks import Architecture
from mnist_vae.models.vae import VAE

_EXPECTED = (
    "expected the weights file that mnist-vae writes (models/model.pt: 'architecture' and 'state_dict')"
)


class ModelFileError(UserError):
    """A model file is missing or is not one that :func:`save_model` wrote."""


def save_model(model: VAE, path: Path) -> None:
    """Saves weights and architecture, atomically (temp file, then rename)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda fh: torch.save({"architecture": model.arch.to_dict(), "state_dict": state}, fh))


def load_model(path: Path, device: str | torch.device = "cpu") -> VAE:
    """Loads a model saved by :func:`save_model` without unpickling arbitrary objects.

    Raises:
        ModelFileError: ``path`` does not exist or is not a model saved by :func:`save_model`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    ckpt = _read_weights_only(path, device)
    if not (isinstance(ckpt, dict) and {"architecture", "state_dict"} <= ckpt.keys()):
        what = f"a dict of {sorted(ckpt)}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise ModelFileError(f"{path} is not a mnist-vae model: it holds {what}; {_EXPECTED}")
    try:
        model = from_architecture(Architecture.from_dict(ckpt["architecture"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a foreign or damaged state
        raise ModelFileError(
            f"{path} is not a mnist-vae model: its architecture or weights do not fit "
            f"({type(exc).__name__}: {first_line(exc)}); {_EXPECTED}"
        ) from None
    return model.to(device).eval()


def _read_weights_only(path: Path, device: str | torch.device) -> object:
    """``torch.load`` of tensors and plain containers only, its failures said in our words.

    torch's own message for a file holding other objects advises loading it with
    ``weights_only=False``, which runs whatever code the file carries: it never reaches the user.
    """
    if not zipfile.is_zipfile(path):
        raise ModelFileError(
            f"{path} is not a mnist-vae model: it is not a torch zip archive (or a truncated one); "
            f"{_EXPECTED}"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelFileError(
            f"{path} is not a mnist-vae model: it holds objects other than tensors and plain "
            f"containers, which are never unpickled; {_EXPECTED}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError):
        raise ModelFileError(
            f"{path} is not a mnist-vae model: a damaged torch archive; {_EXPECTED}"
        ) from None
