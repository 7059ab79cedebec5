"""Real tools in subprocesses, digests, and the errno of one call.

Tools run in the C locale: byte-order sorting and English messages, which tests compare.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

C_LOCALE = {**os.environ, "LC_ALL": "C"}
MIB = 1 << 20


def run(*args: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """A real tool in a subprocess (C locale: byte-order sorting, English messages)."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, timeout=timeout, env=C_LOCALE
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr.decode()}")
    return result


def sh(*args: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """`run` with text output."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=C_LOCALE
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}")
    return result


def python_stdout(script: str, *args: str, timeout: float = 120) -> str:
    """What a Python script prints, run in a fresh interpreter at the project root (so it
    imports storage/ and regfs/): for figures this test process would distort, like peak RSS."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout


def bash(script: str, check: bool = True) -> subprocess.CompletedProcess:
    """A shell line, for what only a shell does: redirections like `cat rest >> file`."""
    return run("bash", "-c", script, check=check)


def ls(path: Path) -> list[str]:
    return run("ls", "-1", path).stdout.decode().splitlines()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256sum(path: Path) -> str:
    """The digest as the real `sha256sum` computes it from the file's bytes."""
    return "sha256:" + run("sha256sum", path).stdout.decode().split()[0]


def sha256_file(path: Path) -> str:
    """The digest of a file's bytes, read in Python."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def errno_of(call: Callable[[], object]) -> int | None:
    """The errno a call fails with, or None when it succeeds."""
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


def errno_closing(call: Callable[[], object]) -> int | None:
    """`errno_of` for calls that may return a file descriptor: one that should not exist is
    closed (which no caller expects)."""
    try:
        result = call()
    except OSError as exc:
        return exc.errno
    if isinstance(result, int):  # a file descriptor that should not exist
        os.close(result)
    return None


def open_errno(path: Path, flags: int) -> int | None:
    """The errno of an open; a descriptor that should not exist is closed at once."""
    return errno_of(lambda: os.close(os.open(path, flags, 0o644)))
