"""A second, unprivileged local user for tests of what one user can do to another's mount.

regfs usually runs as root, often with --allow-other: the attacks worth testing come from a
user beside it. The user is made once with `useradd` (a system user, no home, no shell) and
commands run as it through `setpriv`, which drops every group and capability.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

NAME = "regfs-test"


@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int

    def command(self, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            cwd="/",
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{args} as {self.name}: {result.returncode} {result.stderr}")
        return result


def other_user_env() -> OtherUser:
    """The test user (made if missing); skips where a second user cannot be had."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second user")
    for tool in ("setpriv", "useradd"):
        if shutil.which(tool) is None:
            pytest.fail(f"needs {tool} (util-linux / passwd)")
    try:
        entry = pwd.getpwnam(NAME)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", NAME],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(NAME)
    return OtherUser(NAME, entry.pw_uid, entry.pw_gid)


@contextmanager
def shared_directory(mode: int) -> Iterator[Path]:
    """A new directory under /tmp that every user can reach (pytest's tmp_path parents are
    0700): 0755 for a root others read, 0o1777 for a /tmp-like place anyone can plant in."""
    path = Path(tempfile.mkdtemp(prefix="regfs-shared-", dir="/tmp"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
