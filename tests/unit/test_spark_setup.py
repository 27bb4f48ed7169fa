"""Tests for what :mod:`mnist_vae.serving.spark` checks before Spark starts: Java (found where Spark's
launcher looks, 17 or newer) and the form and reachability of ``--master``. No JVM is started."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mnist_vae.errors import UserError
from mnist_vae.serving.spark import SparkSetupError, check_master, find_java, java_major


def _fake_java(folder: Path, says: str) -> Path:
    """A ``java`` that prints ``says`` to stderr as ``java -version`` does."""
    java = folder / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{says}' >&2\n")
    java.chmod(0o755)
    return java


def test_java_is_found_through_java_home_then_path(tmp_path: Path) -> None:
    java = _fake_java(tmp_path / "jdk", 'openjdk version "17.0.15" 2025-04-15')
    assert find_java({"JAVA_HOME": str(tmp_path / "jdk"), "PATH": ""}) == java
    assert find_java({"PATH": str(java.parent)}) == java
    with pytest.raises(SparkSetupError) as info:
        find_java({"PATH": str(tmp_path)})
    assert str(info.value) == (
        "Spark needs Java: no $JAVA_HOME and no java on PATH; install Java 17 or 21 "
        "(Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
    )
    assert isinstance(info.value, UserError)
    with pytest.raises(SparkSetupError, match=r"\$JAVA_HOME is .*nowhere, which has no bin/java"):
        find_java({"JAVA_HOME": str(tmp_path / "nowhere"), "PATH": str(java.parent)})


@pytest.mark.parametrize(
    ("says", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ('openjdk version "11.0.22" 2024-01-16', 11),
    ],
)
def test_java_major_version(tmp_path: Path, says: str, major: int) -> None:
    assert java_major(_fake_java(tmp_path, says)) == major


@pytest.mark.parametrize("master", ["local", "local[2]", "local[*]", "local[4,2]", "yarn"])
def test_local_and_yarn_masters_need_no_connection(master: str) -> None:
    check_master(master)


@pytest.mark.parametrize(
    ("master", "expected"),
    [
        ("mesos://host:5050", "expected local, local[N], local[*], spark://HOST:PORT"),
        ("local[two]", "expected local, local[N]"),
        ("spark://host", "expected HOST:PORT, got 'host'"),
    ],
)
def test_unknown_master_forms(master: str, expected: str) -> None:
    with pytest.raises(SparkSetupError, match=expected.replace("[", r"\[").replace("*", r"\*")):
        check_master(master)


def test_a_master_that_answers_passes_and_one_that_does_not_is_named() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_master(f"spark://127.0.0.1:{port}")
        check_master(f"k8s://https://127.0.0.1:{port}")
    with pytest.raises(SparkSetupError) as info:
        check_master(f"spark://127.0.0.1:{port}")  # closed now
    assert str(info.value) == (
        f"--master spark://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} (Connection refused); "
        "is the master running?"
    )
