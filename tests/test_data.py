"""Tests for :mod:`mnist_vae.fetch` and :mod:`mnist_vae.data`: IDX parsing, mirror fall-through,
atomic writes, loading.

No test touches the network: mirrors are directories under ``tmp_path``, a refused local port, or a
throwaway HTTP server on 127.0.0.1. Tiny stand-in files get their digests swapped into
``mnist_vae.fetch.SHA256`` (and their sizes into ``SPLITS``) so the real checks run on them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import logging
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
from rich.console import Console
from rich.progress import Progress

from mnist_vae import fetch
from mnist_vae.config import ConfigError
from mnist_vae.data import DatasetFormatError, DatasetMissingError, MnistData, load_mnist
from mnist_vae.fetch import (
    FILES,
    MIRRORS_ENV,
    DownloadError,
    IdxError,
    download_mnist,
    fetch_file,
    parse_idx,
    resolve_mirrors,
)

REAL_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mnist"
REFUSED = "http://127.0.0.1:9/"  # the discard port: nothing listens there, so connecting is refused
N_TRAIN, N_TEST = 3, 2


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encodes an array as an IDX file (the inverse of ``parse_idx``, written independently)."""
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Four tiny MNIST-shaped IDX files, with the module's digests pointed at them."""
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (N_TRAIN, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(np.array([0, 9, 4])),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (N_TEST, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.array([7, 1])),
    }
    monkeypatch.setattr(
        fetch, "SHA256", {name: hashlib.sha256(raw).hexdigest() for name, raw in files.items()}
    )
    return files


@pytest.fixture
def tiny_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets ``download_mnist`` accept the tiny files' sizes instead of 60000/10000."""
    monkeypatch.setattr(
        fetch,
        "SPLITS",
        {
            "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", N_TRAIN),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", N_TEST),
        },
    )


def make_mirror(directory: Path, files: dict[str, bytes], compress: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in files.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return directory


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway HTTP server on 127.0.0.1 serving a directory; yields its URL and directory."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


# --- parse_idx ---------------------------------------------------------------------------------


def test_parse_idx_reads_shape_and_values() -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    parsed = parse_idx(idx_bytes(images), "imgs")
    assert parsed.dtype == np.uint8
    assert parsed.shape == (3, 4, 5)
    np.testing.assert_array_equal(parsed, images)
    parsed[0, 0, 0] = 1  # an ordinary writable array, not a view of the bytes


def test_parse_idx_reads_labels() -> None:
    np.testing.assert_array_equal(parse_idx(idx_bytes(np.array([5, 0, 4])), "l"), [5, 0, 4])


def test_parse_idx_rejects_truncated_data() -> None:
    raw = idx_bytes(np.zeros((3, 28, 28)))[:-1]
    with pytest.raises(IdxError, match=r"t10k: expected 2352 bytes of data after the header.*2351"):
        parse_idx(raw, "t10k")


def test_parse_idx_rejects_extra_bytes() -> None:
    raw = idx_bytes(np.zeros((2, 2))) + b"\x00"
    with pytest.raises(IdxError, match=r"f: expected 4 bytes of data after the header.*got 5"):
        parse_idx(raw, "f")


def test_parse_idx_rejects_wrong_magic() -> None:
    raw = b"\x01" + idx_bytes(np.zeros(4))[1:]
    with pytest.raises(IdxError, match="f: expected an IDX magic number starting with two zero"):
        parse_idx(raw, "f")


def test_parse_idx_rejects_other_type_codes() -> None:
    with pytest.raises(IdxError, match=r"f: expected IDX type code 0x08.*got 0x0d"):
        parse_idx(idx_bytes(np.zeros(4), type_code=0x0D), "f")


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00\x00\x00\x03"])
def test_parse_idx_rejects_short_headers(raw: bytes) -> None:
    with pytest.raises(IdxError, match="^f: expected"):
        parse_idx(raw, "f")


# --- resolve_mirrors ---------------------------------------------------------------------------


def test_env_replaces_configured_mirrors(tmp_path: Path) -> None:
    env = {MIRRORS_ENV: " https://a.example/mnist/ , ,local/dir,file:///srv/mnist "}
    assert resolve_mirrors(["https://configured.example/"], env, base=tmp_path) == [
        "https://a.example/mnist/",
        str(tmp_path / "local" / "dir"),
        "file:///srv/mnist",
    ]


@pytest.mark.parametrize("value", ["", " , "])
def test_blank_env_keeps_configured_mirrors(value: str) -> None:
    configured = ["https://configured.example/", "http://other.example/x/"]
    assert resolve_mirrors(configured, {MIRRORS_ENV: value}) == configured
    assert resolve_mirrors(configured, {}) == configured


def test_unsupported_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=rf"\${MIRRORS_ENV}: unsupported mirror 'ftp://x/'"):
        resolve_mirrors([], {MIRRORS_ENV: "ftp://x/"})


# --- fetch_file: mirror fall-through -----------------------------------------------------------


def test_checksum_mismatch_falls_through(
    tiny: dict[str, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "train-labels-idx1-ubyte"
    bad = make_mirror(tmp_path / "bad", {name: idx_bytes(np.array([1, 1, 1]))})
    good = make_mirror(tmp_path / "good", tiny)
    with caplog.at_level(logging.INFO, logger="mnist_vae.fetch"):
        assert fetch_file(name, [str(bad), str(good)]) == tiny[name]
    assert "checksum mismatch" in caplog.text
    assert str(good / f"{name}.gz") in caplog.text


def test_truncated_gzip_falls_through(tiny: dict[str, bytes], tmp_path: Path) -> None:
    name = "t10k-images-idx3-ubyte"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{name}.gz").write_bytes(gzip.compress(tiny[name])[:-20])
    good = make_mirror(tmp_path / "good", tiny)
    assert fetch_file(name, [str(broken), str(good)]) == tiny[name]


def test_missing_directory_falls_through_and_plain_files_count(
    tiny: dict[str, bytes], tmp_path: Path
) -> None:
    name = "t10k-labels-idx1-ubyte"
    plain = make_mirror(tmp_path / "plain", tiny, compress=False)
    got = fetch_file(name, [str(tmp_path / "nowhere"), plain.as_uri()])
    assert got == tiny[name]


def test_all_mirrors_failing_lists_each_reason(tiny: dict[str, bytes], tmp_path: Path) -> None:
    name = "train-images-idx3-ubyte"
    wrong = make_mirror(tmp_path / "wrong", {name: idx_bytes(np.zeros((1, 28, 28)))})
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / f"{name}.gz").write_bytes(gzip.compress(tiny[name])[:10])
    mirrors = [str(wrong), str(empty), str(truncated), str(tmp_path / "gone"), REFUSED]

    with pytest.raises(DownloadError) as info:
        fetch_file(name, mirrors, timeout=5)

    lines = str(info.value).splitlines()
    assert lines[0].startswith(name)
    assert lines[1:] == [
        f"  {wrong}: checksum mismatch: " + lines[1].split("checksum mismatch: ", 1)[1],
        f"  {empty}: neither {name}.gz nor {name} in {empty}",
        lines[3],
        f"  {tmp_path / 'gone'}: directory {tmp_path / 'gone'} not found",
        f"  {REFUSED}: unreachable: connection refused",
    ]
    assert "corrupt or truncated gzip" in lines[3] and lines[3].startswith(f"  {truncated}: ")
    assert fetch.SHA256[name] in lines[1]


def test_unreachable_host_is_skipped_for_later_files(
    tiny: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the refusal must come from the port, not a proxy
    calls: list[str] = []
    real_get = requests.get

    def counting_get(url: str, **kwargs: object) -> requests.Response:
        calls.append(url)
        return real_get(url, **kwargs)

    monkeypatch.setattr(requests, "get", counting_get)
    good = make_mirror(tmp_path / "good", tiny)
    unreachable: set[str] = set()

    first, second = FILES[0], FILES[1]
    assert fetch_file(first, [REFUSED, str(good)], 5, unreachable=unreachable) == tiny[first]
    assert fetch_file(second, [REFUSED, str(good)], 5, unreachable=unreachable) == tiny[second]
    assert calls == [f"{REFUSED}{first}.gz"]

    with pytest.raises(DownloadError, match=rf"{REFUSED}: skipped: unreachable earlier"):
        fetch_file(second, [REFUSED], 5, unreachable=unreachable)


def test_http_mirror_with_progress_and_404_fall_through(
    tiny: dict[str, bytes], http_mirror: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, root = http_mirror
    make_mirror(root / "mnist", tiny)
    name = "train-images-idx3-ubyte"
    progress = Progress(console=Console(file=io.StringIO()))
    with progress:
        got = fetch_file(name, [f"{url}missing/", f"{url}mnist"], 5, progress)
    assert got == tiny[name]
    assert progress.tasks == []  # finished bars are removed


def test_unknown_file_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="'nope': not an MNIST file"):
        fetch_file("nope", ["/tmp"])


# --- download_mnist ----------------------------------------------------------------------------


def test_download_writes_one_npz_that_loads_back(
    tiny: dict[str, bytes], tiny_splits: None, tmp_path: Path
) -> None:
    mirror = make_mirror(tmp_path / "mirror", tiny)
    out = tmp_path / "new" / "dir" / "mnist.npz"
    assert download_mnist(out, [str(mirror)], progress=False) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist.npz"]

    loaded = load_mnist(out)
    np.testing.assert_array_equal(loaded.x_train, parse_idx(tiny["train-images-idx3-ubyte"], "x"))
    np.testing.assert_array_equal(loaded.y_train, [0, 9, 4])
    np.testing.assert_array_equal(loaded.y_test, [7, 1])
    assert loaded.x_test.shape == (N_TEST, 28, 28)


def test_failed_fetch_leaves_previous_output_alone(tiny: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"previous")
    partial_mirror = make_mirror(tmp_path / "partial", {FILES[0]: tiny[FILES[0]]})
    with pytest.raises(DownloadError, match=FILES[1]):
        download_mnist(out, [str(partial_mirror)], progress=False)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz", "partial"]


def test_wrong_sizes_are_rejected_before_writing(tiny: dict[str, bytes], tmp_path: Path) -> None:
    # Without ``tiny_splits`` the official 60000/10000 sizes apply, which the tiny files miss.
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"previous")
    mirror = make_mirror(tmp_path / "mirror", tiny)
    with pytest.raises(
        IdxError, match=r"train-images-idx3-ubyte: expected shape \(60000, 28, 28\)"
    ):
        download_mnist(out, [str(mirror)], progress=False)
    assert out.read_bytes() == b"previous"


def test_failed_write_removes_temp_file(
    tiny: dict[str, bytes], tiny_splits: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"previous")
    mirror = make_mirror(tmp_path / "mirror", tiny)

    def half_written(file: io.BufferedWriter, **arrays: np.ndarray) -> None:
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", half_written)
    with pytest.raises(OSError, match="disk full"):
        download_mnist(out, [str(mirror)], progress=False)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror", "mnist.npz"]


# --- load_mnist --------------------------------------------------------------------------------


def test_missing_dataset_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="dvc repro download") as info:
        load_mnist(tmp_path / "mnist.npz")
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "mnist.npz") in str(info.value)


def _save(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def _valid_arrays() -> dict[str, np.ndarray]:
    return {
        "x_train": np.zeros((2, 28, 28), np.uint8),
        "y_train": np.zeros(2, np.uint8),
        "x_test": np.zeros((1, 28, 28), np.uint8),
        "y_test": np.zeros(1, np.uint8),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_test": None}, "missing y_test"),
        ({"x_train": np.zeros((2, 28, 28), np.float32)}, "x_train of dtype uint8, got float32"),
        ({"x_test": np.zeros((1, 784), np.uint8)}, "x_test with 3 dimensions"),
        ({"x_test": np.zeros((1, 28, 27), np.uint8)}, r"x_test of shape \(N, 28, 28\)"),
        ({"y_train": np.zeros(3, np.uint8)}, "2 images and 3 labels"),
        ({"y_test": np.array([10], np.uint8)}, r"y_test in 0\.\.9, got 10"),
    ],
)
def test_malformed_dataset_names_file_and_expectation(
    tmp_path: Path, change: dict[str, np.ndarray | None], message: str
) -> None:
    arrays = {**_valid_arrays(), **change}
    path = _save(tmp_path / "mnist.npz", **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(DatasetFormatError, match=message) as info:
        load_mnist(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def test_not_an_npz_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DatasetFormatError, match="expected an .npz archive"):
        load_mnist(path)


def test_valid_small_dataset_loads(tmp_path: Path) -> None:
    loaded = load_mnist(_save(tmp_path / "mnist.npz", **_valid_arrays()))
    assert isinstance(loaded, MnistData)
    assert loaded.x_train.shape == (2, 28, 28)


# --- the DVC stage script ----------------------------------------------------------------------


def _stage_main() -> object:
    """What ``python pipeline/download.py ARGS`` runs."""
    from mnist_vae.stages.download import main

    return main


def test_stage_writes_data_npz_with_env_mirror(
    tiny: dict[str, bytes], tiny_splits: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_mirror(tmp_path / "mirror", tiny)
    (tmp_path / "params.yaml").write_text("data:\n  mirrors: ['https://unused.example/']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRRORS_ENV, "mirror")  # relative: resolved against the working directory
    _stage_main()([])
    assert load_mnist(tmp_path / "data" / "mnist.npz").y_test.tolist() == [7, 1]


def test_stage_reports_failure_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text("data:\n  timeout: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRRORS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as info:
        _stage_main()(["--params", "p.yaml"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "error: download: train-images-idx3-ubyte" in err and "not found" in err
    assert "Traceback" not in err
    assert not (tmp_path / "data" / "mnist.npz").exists()


# --- the real dataset --------------------------------------------------------------------------


def test_real_mnist_from_offline_mirror(tmp_path: Path) -> None:
    if not REAL_MIRROR.is_dir():
        pytest.skip(f"no offline MNIST copy at {REAL_MIRROR}")
    out = download_mnist(tmp_path / "mnist.npz", [str(REAL_MIRROR)], progress=False)
    mnist = load_mnist(out)
    assert mnist.x_train.shape == (60_000, 28, 28)
    assert mnist.x_test.shape == (10_000, 28, 28)
    assert mnist.y_train.shape == (60_000,)
    assert mnist.y_test.shape == (10_000,)
    for arr in (mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test):
        assert arr.dtype == np.uint8
    assert set(np.unique(mnist.y_train).tolist()) == set(range(10))
    assert set(np.unique(mnist.y_test).tolist()) == set(range(10))
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits
    assert 0 < mnist.x_train.mean() < 255
