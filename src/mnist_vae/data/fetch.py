"""Fetching a dataset, MNIST or Fashion-MNIST: the ``download`` stage.

Pulls the four IDX files of the dataset (``data.dataset``; both use MNIST's file names and format)
from a list of mirrors, checks each against its pinned SHA-256, parses it and writes the whole
dataset as one compressed ``.npz``, which every other stage reads through
:func:`mnist_vae.data.dataset.load_dataset`.

A mirror is one of:

* an ``http://`` or ``https://`` URL prefix holding ``<name>.gz``;
* a ``file://`` URL or a local directory holding ``<name>.gz`` or, failing that, ``<name>``.

The digests are of the *uncompressed* files, so a mirror may recompress the data as it likes.

The IDX format itself is read by :mod:`mnist_vae.data.idx`.

Over 300 lines because each way a download fails (an unreachable mirror, a truncated or
oversized gzip, a wrong checksum, a malformed file) gets its own message, which is most of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
import requests
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from mnist_vae.atomic import atomic_write
from mnist_vae.config import ConfigError
from mnist_vae.data.dataset import IMAGE_SIDE, N_CLASSES, NPZ_KEYS, ImageData
from mnist_vae.data.idx import IdxError, parse_idx
from mnist_vae.errors import UserError, first_line
from mnist_vae.progress import bars

log = logging.getLogger(__name__)

FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# Digests of each dataset's uncompressed official files. Read at call time (never copied), so tests
# can swap in digests of tiny stand-in files.
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    # Xiao, Rasul & Vollgraf (2017); the uncompressed content of zalandoresearch/fashion-mnist's files.
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# The environment variable (comma-separated mirrors) that replaces data.mirrors of each dataset.
MIRRORS_ENV: dict[str, str] = {"mnist": "MNIST_MIRRORS", "fashion-mnist": "FASHION_MNIST_MIRRORS"}

# Split name -> (images file, labels file, number of examples) of the official distribution.
SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 16
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class DownloadError(UserError):
    """No mirror delivered a file with the expected checksum."""


class _MirrorFailure(Exception):
    """Why one mirror could not supply one file; ``unreachable`` marks connection failures."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


def resolve_mirrors(
    configured: Sequence[str],
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
    dataset: str = "mnist",
) -> list[str]:
    """Decides which mirrors of ``dataset`` to try, in order.

    ``$MNIST_MIRRORS`` (``$FASHION_MNIST_MIRRORS`` for Fashion-MNIST; comma-separated) replaces the
    configured list when it holds any entry, so an offline machine can point at a local copy without
    editing ``params.yaml``.

    Args:
        configured: Mirrors from ``params.yaml`` (``data.mirrors.<dataset>``).
        environ: The environment to read; ``os.environ`` when omitted.
        base: Directory that relative local paths are resolved against; the working directory
            when omitted.
        dataset: ``data.dataset``, which names the environment variable.

    Returns:
        URLs unchanged, local directories as absolute paths.

    Raises:
        ConfigError: A mirror uses a scheme other than http, https or file.
    """
    environ = os.environ if environ is None else environ
    variable = MIRRORS_ENV[dataset]
    from_env = [m.strip() for m in environ.get(variable, "").split(",")]
    from_env = [m for m in from_env if m]
    source = f"${variable}" if from_env else f"data.mirrors.{dataset}"
    chosen = from_env or [m.strip() for m in configured if m.strip()]
    base = Path.cwd() if base is None else base

    resolved = []
    for mirror in chosen:
        match = _SCHEME.match(mirror)
        if match is None:
            path = Path(mirror).expanduser()
            resolved.append(str(path if path.is_absolute() else (base / path).resolve()))
        elif match.group(1).lower() in ("http", "https", "file"):
            resolved.append(mirror)
        else:
            raise ConfigError(
                f"{source}: unsupported mirror {mirror!r}; expected an http(s):// URL prefix, "
                "a file:// URL or a local directory"
            )
    return resolved


def fetch_file(
    name: str,
    mirrors: Sequence[str],
    timeout: float = 30.0,
    progress: Progress | None = None,
    *,
    unreachable: set[str] | None = None,
    dataset: str = "mnist",
) -> bytes:
    """Fetches one file of ``dataset``, trying mirrors in order until one passes the checksum.

    Args:
        name: One of :data:`FILES`.
        mirrors: As returned by :func:`resolve_mirrors`.
        timeout: Seconds to wait for a connection, and between bytes, per HTTP request.
        progress: A running rich progress display that HTTP downloads add a bar to; none if omitted.
        unreachable: Hosts that refused or timed out so far. Hosts failing here are added and hosts
            already in it are skipped; share one set across the files of a download so that an
            offline machine waits out the timeout once, not once per file.
        dataset: ``data.dataset``: whose digests the file must match.

    Returns:
        The uncompressed file, whose SHA-256 equals ``SHA256[dataset][name]``.

    Raises:
        ValueError: ``name`` is not a file of the dataset.
        DownloadError: No mirror delivered it; the message gives each mirror's reason on a line.
    """
    if name not in SHA256[dataset]:
        raise ValueError(f"{name!r}: not a {dataset} file; expected one of {', '.join(SHA256[dataset])}")
    unreachable = set() if unreachable is None else unreachable

    failures: list[str] = []
    for mirror in mirrors:
        host = _http_host(mirror)
        if host is not None and host in unreachable:
            failures.append(f"  {mirror}: skipped: unreachable earlier")
            continue
        try:
            if host is not None:
                data, where = _fetch_http(mirror, name, timeout, progress)
            else:
                data, where = _fetch_local(mirror, name)
            _verify(data, name, dataset)
        except _MirrorFailure as failure:
            if failure.unreachable and host is not None:
                unreachable.add(host)
            log.warning("%s: %s: %s", name, mirror, failure.reason)
            failures.append(f"  {mirror}: {failure.reason}")
            continue
        log.info("%s: %d bytes from %s", name, len(data), where)
        return data

    if not failures:
        raise DownloadError(
            f"{name}: no mirrors configured (data.mirrors.{dataset} or ${MIRRORS_ENV[dataset]})"
        )
    raise DownloadError(
        f"{name} of {dataset}: no mirror delivered a file with the expected SHA-256; tried, in order:\n"
        + "\n".join(failures)
    )


def download_dataset(
    out: Path,
    mirrors: Sequence[str],
    timeout: float = 30.0,
    progress: bool | None = None,
    dataset: str = "mnist",
) -> Path:
    """Fetches, verifies and parses the four files of ``dataset`` and writes them as one ``.npz``.

    The archive holds uint8 arrays ``x_train`` (60000, 28, 28), ``y_train`` (60000,),
    ``x_test`` (10000, 28, 28) and ``y_test`` (10000,). It is written atomically
    (:func:`mnist_vae.atomic.atomic_write`), so a failed run leaves any previous ``out`` as it was.

    Args:
        out: Where to write the archive; its parent directory is created.
        mirrors: As returned by :func:`resolve_mirrors`.
        timeout: Seconds per HTTP connection attempt and between received bytes.
        progress: Show progress bars on stderr; when None, only if stderr is a terminal. Without
            bars, one log line per file says where it came from.
        dataset: ``data.dataset``: whose files and digests.

    Returns:
        ``out``.

    Raises:
        DownloadError: A file could not be fetched from any mirror.
        IdxError: A file verified but does not hold the expected shapes or labels (only possible
            with digests other than the official ones).
        DiskFullError: The disk filled up while writing the archive.
        OSError: The archive could not be written.
    """
    out = Path(out)
    if progress is None:
        progress = sys.stderr.isatty()
    unreachable: set[str] = set()

    arrays: dict[str, np.ndarray] = {}
    with _progress_display(progress) as display:
        for name in FILES:
            raw = fetch_file(name, mirrors, timeout, display, unreachable=unreachable, dataset=dataset)
            arrays[name] = parse_idx(raw, name)
            del raw  # the parsed copy is all we need; keep peak memory at one copy per file

    data = _check_splits(arrays)
    atomic_write(out, lambda fh: np.savez_compressed(fh, **{k: getattr(data, k) for k in NPZ_KEYS}))
    log.info(
        "wrote %s: %s, %d training and %d test images", out, dataset, len(data.y_train), len(data.y_test)
    )
    return out


def _http_host(mirror: str) -> str | None:
    """``scheme://host:port`` of an http(s) mirror, the key for remembering unreachable hosts."""
    parts = urlsplit(mirror)
    if parts.scheme.lower() in ("http", "https"):
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}"
    return None


def _fetch_http(mirror: str, name: str, timeout: float, progress: Progress | None) -> tuple[bytes, str]:
    url = f"{mirror.rstrip('/')}/{name}.gz"
    try:
        response = requests.get(url, timeout=timeout, stream=True)
    except requests.ConnectionError as exc:  # includes ConnectTimeout: no byte was exchanged
        raise _MirrorFailure(_unreachable_reason(exc, timeout), unreachable=True) from None
    except requests.RequestException as exc:
        raise _MirrorFailure(f"request failed: {first_line(exc, with_type=True)}") from None

    with response:
        if response.status_code != 200:
            raise _MirrorFailure(f"HTTP {response.status_code} {response.reason} for {url}")
        # requests transparently undoes a Content-Encoding, in which case the body is no longer
        # gzip even though the file name ends in .gz.
        encoded = "gzip" in response.headers.get("Content-Encoding", "").lower()
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() and not encoded else None
        task = progress.add_task(name, total=total) if progress is not None else None
        chunks = []
        try:
            for chunk in response.iter_content(_CHUNK):
                chunks.append(chunk)
                if progress is not None and task is not None:
                    progress.advance(task, len(chunk))
        except requests.RequestException as exc:
            # The host answered, so this is a broken transfer, not an unreachable host.
            raise _MirrorFailure(f"transfer of {url} failed: {first_line(exc, with_type=True)}") from None
        finally:
            if progress is not None and task is not None:
                progress.remove_task(task)
    body = b"".join(chunks)
    if encoded:  # requests unpacked it already
        if len(body) > _expected_size(name):
            raise _MirrorFailure(f"{url}: {len(body)} bytes, more than the {_expected_size(name)} of {name}")
        return body, url
    return _gunzip(body, url, _expected_size(name)), url


def _fetch_local(mirror: str, name: str) -> tuple[bytes, str]:
    if _SCHEME.match(mirror):
        parts = urlsplit(mirror)
        if parts.netloc not in ("", "localhost"):
            raise _MirrorFailure(f"expected a file:// URL on this machine, got host {parts.netloc!r}")
        directory = Path(url2pathname(parts.path))
    else:
        directory = Path(mirror).expanduser()
    if not directory.is_dir():
        raise _MirrorFailure(f"directory {directory} not found")

    compressed = directory / f"{name}.gz"
    plain = directory / name
    try:
        if compressed.is_file():
            return _gunzip(compressed.read_bytes(), str(compressed), _expected_size(name)), str(compressed)
        if plain.is_file():
            if plain.stat().st_size > _expected_size(name):
                raise _MirrorFailure(
                    f"{plain}: {plain.stat().st_size} bytes, more than the {_expected_size(name)} of {name}"
                )
            return plain.read_bytes(), str(plain)
    except OSError as exc:
        raise _MirrorFailure(f"could not read: {exc}") from None
    raise _MirrorFailure(f"neither {compressed.name} nor {plain.name} in {directory}")


def _gunzip(data: bytes, where: str, limit: int) -> bytes:
    """Unpacks a gzip file, never to more than ``limit`` bytes: a corrupt or foreign file (a
    different file, a gzip bomb) is refused as soon as it outgrows the IDX file it claims to be,
    not after it was unpacked into memory whole. Its digest is checked after (:func:`_verify`)."""
    if not data.startswith(_GZIP_MAGIC):
        raise _MirrorFailure(f"{where}: expected gzip data, got bytes starting {data[:4].hex()}")
    unpacker = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = unpacker.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _MirrorFailure(f"{where}: corrupt or truncated gzip ({exc})") from None
    if len(out) > limit:
        raise _MirrorFailure(f"{where}: unpacks to more than the {limit} bytes expected; not this file")
    if not unpacker.eof:
        raise _MirrorFailure(f"{where}: corrupt or truncated gzip (the stream ends early)")
    return out


def _expected_size(name: str) -> int:
    """Bytes of the uncompressed IDX file ``name``: its header and one byte per pixel or label."""
    for images, labels, count in SPLITS.values():
        if name == images:
            return 16 + count * IMAGE_SIDE * IMAGE_SIDE
        if name == labels:
            return 8 + count
    raise ValueError(f"{name!r}: not an IDX file of the dataset")


def _verify(data: bytes, name: str, dataset: str) -> None:
    expected = SHA256[dataset][name]
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise _MirrorFailure(f"checksum mismatch: expected SHA-256 {expected}, got {got} ({len(data)} bytes)")


def _unreachable_reason(exc: requests.ConnectionError, timeout: float) -> str:
    """A short cause for a failed connection (requests nests the socket error several levels)."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"unreachable: no connection within {timeout:g} s"
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, socket.gaierror):
            return f"unreachable: host name lookup failed ({err.strerror or err})"
        if isinstance(err, ConnectionRefusedError):
            return "unreachable: connection refused"
        if isinstance(err, TimeoutError):
            return f"unreachable: no connection within {timeout:g} s"
        if isinstance(err, OSError) and err.strerror:
            return f"unreachable: {err.strerror}"
        nested = [err.__cause__, err.__context__, getattr(err, "reason", None), *err.args]
        stack.extend(e for e in nested if isinstance(e, BaseException))
    return f"unreachable: {first_line(exc, with_type=True)}"


@contextlib.contextmanager
def _progress_display(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    display = bars(DownloadColumn(), TransferSpeedColumn())
    try:
        yield display
    finally:
        display.stop()


def _check_splits(arrays: Mapping[str, np.ndarray]) -> ImageData:
    """Checks that the parsed files have the official shapes and label range."""
    out: dict[str, np.ndarray] = {}
    for split, (images_name, labels_name, n) in SPLITS.items():
        images, labels = arrays[images_name], arrays[labels_name]
        if images.shape != (n, IMAGE_SIDE, IMAGE_SIDE):
            raise IdxError(
                f"{images_name}: expected shape ({n}, {IMAGE_SIDE}, {IMAGE_SIDE}), got {images.shape}"
            )
        if labels.shape != (n,):
            raise IdxError(f"{labels_name}: expected shape ({n},), got {labels.shape}")
        if int(labels.max()) >= N_CLASSES:
            raise IdxError(f"{labels_name}: expected labels in 0..{N_CLASSES - 1}, got {int(labels.max())}")
        out[f"x_{split}"], out[f"y_{split}"] = images, labels
    return ImageData(**out)
