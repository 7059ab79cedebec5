"""Review of `pyfuse3.readdir_reply_many` (regfs's pyfuse3 build, 4604f5d), the bulk listing
reply that the `rootfs/` walk is to use: what it does with arguments no caller should pass,
which must raise or report nothing, never touch memory that is not a live reply buffer.

    python tests/test_bulk_reply_hostile.py MOUNTPOINT   (the filesystem below, mounted)
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from array import array
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.mounts import is_mounted, wait_until

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_many"), reason="a pyfuse3 without the bulk reply"
)

REPLY_MANY = "readdir_reply_many({token}, [b'a'], array('q', [5]), None, {template}, 0, 0, 1)"


@pytest.mark.storage
@pytest.mark.parametrize(
    ("token", "template"),
    [("None", "EntryAttributes()"), ("ReaddirToken()", "None")],
    ids=["token", "template"],
)
def test_none_for_the_token_or_the_template_raises(token, template):
    """In a child process: it may crash."""
    call = REPLY_MANY.format(token=token, template=template)
    script = f"from array import array\nfrom pyfuse3 import *\n{call}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1 and "TypeError" in result.stderr, result


class KeepsItsToken(pyfuse3.Operations):
    """A root listing `a` whose first readdir keeps its token; the next readdir (the kernel
    asking past `a`) hands an entry through that token, whose reply went, and prints what
    readdir_reply_many returned (or raised) on stdout."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: pyfuse3.ReaddirToken | None = None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode = inode, 0o40755
        return attr

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode = 5, 0o100644
        if self.kept is None:
            self.kept = token
            pyfuse3.readdir_reply(token, b"a", attr, 1, lookup=False)
            return
        try:
            said = repr(
                pyfuse3.readdir_reply_many(
                    self.kept, [b"late"], array("q", [6]), None, attr, 100, 0, 1, False
                )
            )
        except Exception as exc:  # what a caller may rely on: it says so
            said = type(exc).__name__
        print(f"late: {said}", flush=True)


@pytest.mark.mount
def test_a_token_kept_past_its_readdir_reports_nothing(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    with subprocess.Popen(
        [sys.executable, __file__, str(mountpoint)], stdout=subprocess.PIPE, text=True, env=env
    ) as daemon:
        try:
            wait_until(lambda: is_mounted(mountpoint) or daemon.poll() is not None, 10, "mount")
            assert os.listdir(mountpoint) == ["a"]
        finally:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
            out = daemon.communicate(timeout=10)[0]
    assert out.splitlines() == ["late: 0"] or out.startswith("late: RuntimeError"), out


if __name__ == "__main__":
    pyfuse3.init(KeepsItsToken(), sys.argv[1], ["fsname=keepsitstoken", "ro"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
