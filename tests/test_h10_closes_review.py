"""Review findings on which close ends a file being written (regfs/closers.py,
regfs/openfiles.py): a reader's descriptor held by the writer's child."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from support.roots import build_root
from support.tools import errno_of

NAME = "library/demo"
BAD = b'{"schemaVersion": 2}'  # JSON, but no media type: refused (EINVAL)


@pytest.mark.mount
@pytest.mark.parametrize("child", [False, True], ids=["alone", "child holds a reader"])
async def test_a_reader_held_by_the_writer_s_child_leaves_the_writer_s_close_its_end(
    tmp_path: Path, mount, child: bool
) -> None:
    """The writer's process opened a reader of the tag and handed it to a child (pass_fds):
    that descriptor is no copy of the writer's, so the writer's close still ends the tag
    and fails with the refusal (it answered 0, the refusal only logged at the release)."""
    await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root", "--tag-ttl", "0")
    tag = m.path(*NAME.split("/"), "tags") / "latest"
    reader = os.open(tag, os.O_RDONLY)
    holder = subprocess.Popen(["sleep", "30"], pass_fds=[reader] if child else [])
    os.close(reader)
    try:
        fd = os.open(tag, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, BAD)
        assert errno_of(lambda: os.close(fd)) == errno.EINVAL
    finally:
        holder.kill()
        holder.wait()
