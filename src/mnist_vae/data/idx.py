"""The IDX file format of the MNIST distribution: a checked reader for files of unsigned bytes."""

from __future__ import annotations

import math

import numpy as np

from mnist_vae.errors import UserError

_IDX_UBYTE = 0x08


class IdxError(UserError, ValueError):
    """Bytes are not a well-formed IDX file of unsigned bytes, or the files disagree."""


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Parses an IDX file of unsigned bytes (the format of the MNIST distribution).

    Layout: two zero bytes, a type code (0x08 for uint8), the number of dimensions, one big-endian
    uint32 per dimension, then the values in C order.

    Args:
        raw: The uncompressed file.
        name: The file's name, for error messages.

    Returns:
        A writable uint8 array of the stored shape.

    Raises:
        IdxError: The header is malformed or the data is not exactly as long as the header says.
    """
    if len(raw) < 4:
        raise IdxError(f"{name}: expected a 4-byte IDX magic number, got {len(raw)} bytes in all")
    if raw[:2] != b"\x00\x00":
        raise IdxError(
            f"{name}: expected an IDX magic number starting with two zero bytes, got {raw[:4].hex()}"
        )
    if raw[2] != _IDX_UBYTE:
        raise IdxError(
            f"{name}: expected IDX type code 0x{_IDX_UBYTE:02x} (unsigned byte), got 0x{raw[2]:02x}"
        )
    ndim = raw[3]
    if not 1 <= ndim <= 3:
        raise IdxError(f"{name}: expected 1 to 3 dimensions, got {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{name}: expected a {header}-byte header for {ndim} dimensions, got {len(raw)} bytes")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)  # Python ints, so a hostile header cannot overflow the check
    if len(raw) - header != expected:
        shape = "x".join(map(str, dims))
        raise IdxError(
            f"{name}: expected {expected} bytes of data after the header (shape {shape}), "
            f"got {len(raw) - header}"
        )
    # A copy: the caller may keep the array after ``raw`` is gone, and write to it.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()
