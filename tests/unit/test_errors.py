"""The one line an exception is reported by (:func:`mnist_vae.errors.first_line`)."""

from __future__ import annotations

import pytest

from mnist_vae.errors import first_line


@pytest.mark.parametrize(
    ("exc", "kwargs", "expected"),
    [
        (RuntimeError("inductor: no C++ compiler\nmore detail"), {}, "inductor: no C++ compiler"),
        (RuntimeError("\n  padded\nsecond"), {}, "padded"),
        (TimeoutError(), {}, "TimeoutError"),
        (TimeoutError("  \n "), {}, "TimeoutError"),
        (OSError("x" * 300 + "\ny"), {"limit": 200}, "x" * 200),
        (ConnectionError("refused\nat host"), {"with_type": True}, "ConnectionError: refused"),
        (ConnectionError(), {"with_type": True}, "ConnectionError"),
    ],
    ids=["first-of-two", "stripped", "no-message", "blank-message", "limit", "with-type", "with-type-blank"],
)
def test_first_line(exc: BaseException, kwargs: dict[str, object], expected: str) -> None:
    assert first_line(exc, **kwargs) == expected
