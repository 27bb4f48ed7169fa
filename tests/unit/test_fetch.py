"""Tests for :mod:`mnist_vae.data.fetch`: IDX parsing, mirror fall-through, atomic writes.

No test touches the network: mirrors are directories under ``tmp_path``, a refused local port, or a
throwaway HTTP server on 127.0.0.1 in this process. Tiny stand-in files (the ``tiny_idx`` fixture)
get their digests swapped into ``mnist_vae.data.fetch.SHA256`` (and their sizes into ``SPLITS``:
``tiny_splits``) so the real checks run on them.
"""

from __future__ import annotations

import gzip
import http.server
import io
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import requests
from rich.console import Console
from rich.progress import Progress

from mnist_vae.config import ConfigError
from mnist_vae.data import fetch
from mnist_vae.data.dataset import load_dataset
from mnist_vae.data.fetch import (
    FILES,
    MIRRORS_ENV,
    DownloadError,
    IdxError,
    download_dataset,
    fetch_file,
    parse_idx,
    resolve_mirrors,
)
from mnist_vae.errors import UserError

REFUSED = "http://127.0.0.1:9/"  # the discard port: nothing listens there, so connecting is refused
IdxBytes = Callable[..., bytes]
MakeMirror = Callable[..., Path]


@pytest.fixture
def http_mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway HTTP server on 127.0.0.1 serving a directory; yields its URL and directory."""
    root = tmp_path / "served"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


# --- parse_idx ---------------------------------------------------------------------------------


def test_parse_idx_reads_shape_and_values(idx_bytes: IdxBytes) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    parsed = parse_idx(idx_bytes(images), "imgs")
    assert parsed.dtype == np.uint8
    assert parsed.shape == (3, 4, 5)
    np.testing.assert_array_equal(parsed, images)
    parsed[0, 0, 0] = 1  # an ordinary writable array, not a view of the bytes


def test_parse_idx_reads_labels(idx_bytes: IdxBytes) -> None:
    np.testing.assert_array_equal(parse_idx(idx_bytes(np.array([5, 0, 4])), "l"), [5, 0, 4])


def test_parse_idx_rejects_truncated_data(idx_bytes: IdxBytes) -> None:
    raw = idx_bytes(np.zeros((3, 28, 28)))[:-1]
    with pytest.raises(IdxError, match=r"t10k: expected 2352 bytes of data after the header.*2351"):
        parse_idx(raw, "t10k")


def test_parse_idx_rejects_extra_bytes(idx_bytes: IdxBytes) -> None:
    raw = idx_bytes(np.zeros((2, 2))) + b"\x00"
    with pytest.raises(IdxError, match=r"f: expected 4 bytes of data after the header.*got 5"):
        parse_idx(raw, "f")


def test_parse_idx_rejects_wrong_magic(idx_bytes: IdxBytes) -> None:
    raw = b"\x01" + idx_bytes(np.zeros(4))[1:]
    with pytest.raises(IdxError, match="f: expected an IDX magic number starting with two zero"):
        parse_idx(raw, "f")


def test_parse_idx_rejects_other_type_codes(idx_bytes: IdxBytes) -> None:
    with pytest.raises(IdxError, match=r"f: expected IDX type code 0x08.*got 0x0d"):
        parse_idx(idx_bytes(np.zeros(4), type_code=0x0D), "f")


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x00\x00\x08\x03\x00\x00\x00\x03"])
def test_parse_idx_rejects_short_headers(raw: bytes) -> None:
    with pytest.raises(IdxError, match="^f: expected"):
        parse_idx(raw, "f")


def test_truncated_real_idx_file_is_named_with_its_expected_length(shared_mnist: Path) -> None:
    raw = gzip.decompress((shared_mnist / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(IdxError, match="t10k-labels-idx1-ubyte: expected 10000 bytes of data") as info:
        parse_idx(raw[:5000], name="t10k-labels-idx1-ubyte")
    assert isinstance(info.value, UserError)


# --- resolve_mirrors ---------------------------------------------------------------------------


def test_env_replaces_configured_mirrors(tmp_path: Path) -> None:
    env = {MIRRORS_ENV["mnist"]: " https://a.example/mnist/ , ,local/dir,file:///srv/mnist "}
    assert resolve_mirrors(["https://configured.example/"], env, base=tmp_path) == [
        "https://a.example/mnist/",
        str(tmp_path / "local" / "dir"),
        "file:///srv/mnist",
    ]


@pytest.mark.parametrize("value", ["", " , "])
def test_blank_env_keeps_configured_mirrors(value: str) -> None:
    configured = ["https://configured.example/", "http://other.example/x/"]
    assert resolve_mirrors(configured, {MIRRORS_ENV["mnist"]: value}) == configured
    assert resolve_mirrors(configured, {}) == configured


def test_unsupported_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\$MNIST_MIRRORS: unsupported mirror 'ftp://x/'"):
        resolve_mirrors([], {MIRRORS_ENV["mnist"]: "ftp://x/"})


# --- fetch_file: mirror fall-through -----------------------------------------------------------


def test_checksum_mismatch_falls_through(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    idx_bytes: IdxBytes,
    make_mirror: MakeMirror,
) -> None:
    name = "train-labels-idx1-ubyte"
    bad = make_mirror(tmp_path / "bad", {name: idx_bytes(np.array([1, 1, 1]))})
    good = make_mirror(tmp_path / "good", tiny_idx)
    with caplog.at_level(logging.INFO, logger="mnist_vae.data.fetch"):
        assert fetch_file(name, [str(bad), str(good)]) == tiny_idx[name]
    assert "checksum mismatch" in caplog.text
    assert str(good / f"{name}.gz") in caplog.text


def test_truncated_gzip_falls_through(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    make_mirror: MakeMirror,
) -> None:
    name = "t10k-images-idx3-ubyte"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{name}.gz").write_bytes(gzip.compress(tiny_idx[name])[:-20])
    good = make_mirror(tmp_path / "good", tiny_idx)
    assert fetch_file(name, [str(broken), str(good)]) == tiny_idx[name]


def test_missing_directory_falls_through_and_plain_files_count(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    make_mirror: MakeMirror,
) -> None:
    name = "t10k-labels-idx1-ubyte"
    plain = make_mirror(tmp_path / "plain", tiny_idx, compress=False)
    got = fetch_file(name, [str(tmp_path / "nowhere"), plain.as_uri()])
    assert got == tiny_idx[name]


def test_all_mirrors_failing_lists_each_reason(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    idx_bytes: IdxBytes,
    make_mirror: MakeMirror,
) -> None:
    name = "train-images-idx3-ubyte"
    wrong = make_mirror(tmp_path / "wrong", {name: idx_bytes(np.zeros((1, 28, 28)))})
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / f"{name}.gz").write_bytes(gzip.compress(tiny_idx[name])[:10])
    mirrors = [str(wrong), str(empty), str(truncated), str(tmp_path / "gone"), REFUSED]

    with pytest.raises(DownloadError) as info:
        fetch_file(name, mirrors, timeout=5)
    assert isinstance(info.value, UserError)  # the stage runner and the CLI print it as one line

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
    assert fetch.SHA256["mnist"][name] in lines[1]


def test_unreachable_host_is_skipped_for_later_files(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_mirror: MakeMirror,
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # the refusal must come from the port, not a proxy
    calls: list[str] = []
    real_get = requests.get

    def counting_get(url: str, **kwargs: object) -> requests.Response:
        calls.append(url)
        return real_get(url, **kwargs)

    monkeypatch.setattr(requests, "get", counting_get)
    good = make_mirror(tmp_path / "good", tiny_idx)
    unreachable: set[str] = set()

    first, second = FILES[0], FILES[1]
    assert fetch_file(first, [REFUSED, str(good)], 5, unreachable=unreachable) == tiny_idx[first]
    assert fetch_file(second, [REFUSED, str(good)], 5, unreachable=unreachable) == tiny_idx[second]
    assert calls == [f"{REFUSED}{first}.gz"]

    with pytest.raises(DownloadError, match=rf"{REFUSED}: skipped: unreachable earlier"):
        fetch_file(second, [REFUSED], 5, unreachable=unreachable)


def test_http_mirror_with_progress_and_404_fall_through(
    tiny_idx: dict[str, bytes],
    http_mirror: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    make_mirror: MakeMirror,
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, root = http_mirror
    make_mirror(root / "mnist", tiny_idx)
    name = "train-images-idx3-ubyte"
    progress = Progress(console=Console(file=io.StringIO()))
    with progress:
        got = fetch_file(name, [f"{url}missing/", f"{url}mnist"], 5, progress)
    assert got == tiny_idx[name]
    assert progress.tasks == []  # finished bars are removed


def test_unknown_file_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="'nope': not a mnist file"):
        fetch_file("nope", ["/tmp"])


# --- download_dataset ----------------------------------------------------------------------------


def test_download_writes_one_npz_that_loads_back(
    tiny_idx: dict[str, bytes],
    tiny_splits: dict[str, int],
    tmp_path: Path,
    make_mirror: MakeMirror,
) -> None:
    mirror = make_mirror(tmp_path / "mirror", tiny_idx)
    out = tmp_path / "new" / "dir" / "mnist.npz"
    assert download_dataset(out, [str(mirror)], progress=False) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist.npz"]

    loaded = load_dataset(out)
    np.testing.assert_array_equal(loaded.x_train, parse_idx(tiny_idx["train-images-idx3-ubyte"], "x"))
    np.testing.assert_array_equal(loaded.y_train, [0, 9, 4])
    np.testing.assert_array_equal(loaded.y_test, [7, 1])
    assert loaded.x_test.shape == (tiny_splits["test"], 28, 28)


def test_failed_fetch_leaves_previous_output_alone(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    make_mirror: MakeMirror,
) -> None:
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"previous")
    partial_mirror = make_mirror(tmp_path / "partial", {FILES[0]: tiny_idx[FILES[0]]})
    with pytest.raises(DownloadError, match=FILES[1]):
        download_dataset(out, [str(partial_mirror)], progress=False)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz", "partial"]


def test_wrong_sizes_are_rejected_before_writing(
    tiny_idx: dict[str, bytes],
    tmp_path: Path,
    make_mirror: MakeMirror,
) -> None:
    # Without ``tiny_splits`` the official 60000/10000 sizes apply, which the tiny files miss.
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"previous")
    mirror = make_mirror(tmp_path / "mirror", tiny_idx)
    with pytest.raises(IdxError, match=r"train-images-idx3-ubyte: expected shape \(60000, 28, 28\)"):
        download_dataset(out, [str(mirror)], progress=False)
    assert out.read_bytes() == b"previous"


def test_failed_write_removes_temp_file(
    tiny_idx: dict[str, bytes],
    tiny_splits: dict[str, int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_mirror: MakeMirror,
) -> None:
    out = tmp_path / "mnist.npz"
    out.write_bytes(b"previous")
    mirror = make_mirror(tmp_path / "mirror", tiny_idx)

    def half_written(file: io.BufferedWriter, **arrays: np.ndarray) -> None:
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", half_written)
    with pytest.raises(OSError, match="disk full"):
        download_dataset(out, [str(mirror)], progress=False)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirror", "mnist.npz"]


def test_a_file_that_unpacks_larger_than_the_one_it_claims_to_be_is_refused_early(
    tmp_path: Path, tiny_idx: dict[str, bytes], tiny_splits: dict[str, int], make_mirror
) -> None:
    """A corrupt mirror's "train-images" that would unpack to 50 MB (a gzip bomb, a wrong file) is
    refused once it passes the 2,368 bytes of the file it claims to be, never unpacked whole."""
    import tracemalloc

    mirror = make_mirror(tmp_path / "mirror", {**tiny_idx, "train-images-idx3-ubyte": bytes(50 << 20)})
    tracemalloc.start()
    try:
        with pytest.raises(DownloadError, match=r"unpacks to more than the 2368 bytes expected"):
            fetch_file("train-images-idx3-ubyte", [str(mirror)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20, f"{peak / 2**20:.0f} MiB held while refusing it"


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_pinned_digests_are_those_the_offline_copy_lists(dataset: str, repo_root: Path) -> None:
    """The digests of the uncompressed official files, as the offline copy's SHA256SUMS lists them."""
    sums = repo_root.parent / "shared" / "datasets" / dataset / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"no offline copy of {dataset} at {sums.parent}")
    listed = {
        name: digest for digest, name in (line.split() for line in sums.read_text().splitlines() if line)
    }
    assert fetch.SHA256[dataset] == listed
    assert fetch.MIRRORS_ENV[dataset] in ("MNIST_MIRRORS", "FASHION_MNIST_MIRRORS")
