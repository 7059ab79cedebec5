"""Everyday tools where a name goes while a file is written, on a real mount of a storage
root: each answers as on a local filesystem, or with the errno a local filesystem gives a
file it cannot change so (H4, stop 24)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from support.mounts import wait_until
from support.registry import repo_path
from support.roots import build_root
from support.tools import errno_of, ls, open_errno, run
from support.uploads import write_file
from support.writers import cp_writing

pytestmark = pytest.mark.mount

NAME = "library/demo"
LIBC = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    AT_FDCWD = -100
    if LIBC.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_rm_r_of_a_repository_while_cp_writes_into_its_uploads(tmp_path: Path, mount) -> None:
    # ext4: `rm -r dir` while a `cp` writes dir/file removes the name and the directory
    # (exit 0); the writer writes on into the unlinked file and exits 0; nothing is left
    # once it closes. Here the repository is hidden at once and goes from storage at the
    # writer's last close (was: rmdir ENOTEMPTY, and the emptied repository stayed).
    m = mount(tmp_path / "root")
    repo = m.path("org", "app")
    os.makedirs(repo)
    with cp_writing(repo / "uploads" / "x", tmp_path / "fifo") as feed:
        assert run("rm", "-r", repo, check=False).returncode == 0
        assert ls(m.path("org")) == []
        assert errno_of(lambda: os.stat(repo)) == errno.ENOENT
        feed.write(os.urandom(100_000))
    stored = repo_path(tmp_path / "root", "org/app")
    wait_until(lambda: not stored.exists(), 5, "the repository to go at the writer's release")
    assert ls(m.path("org")) == []
    os.makedirs(repo)  # the name is free for a new repository
    assert sorted(ls(repo)) == ["layers", "manifests", "rootfs", "tags", "uploads"]


@pytest.mark.parametrize("digest_named", [False, True], ids=["named", "digest-named"])
def test_rm_of_an_upload_racing_its_writers_last_close(
    tmp_path: Path, mount, digest_named: bool
) -> None:
    # ext4: `rm` of a file whose writer closes at that moment removes the name (exit 0)
    # whichever comes first, and the close succeeds. An upload named by its digest becomes
    # its layer at that close: then the layer stays and the name goes. Was: rm ENOENT in
    # about 1 race of 10, the name resolving to neither the upload nor the finished layer.
    m = mount(tmp_path / "root")
    repo = m.path("org", "app")
    os.makedirs(repo)
    outcomes = []
    for i in range(24):
        data = os.urandom(200_000) + bytes([i])
        name = f"sha256:{hashlib.sha256(data).hexdigest()}" if digest_named else f"x{i}"
        fd = os.open(repo / "uploads" / name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, data)
        result: dict[str, int | None] = {}

        def close(fd: int = fd, result: dict[str, int | None] = result) -> None:
            result["close"] = errno_of(lambda: os.close(fd))

        def remove(name: str = name, result: dict[str, int | None] = result, i: int = i) -> None:
            threading.Event().wait(0.0005 * (i % 8))
            result["rm"] = errno_of(lambda: os.unlink(repo / "uploads" / name))

        threads = [threading.Thread(target=close), threading.Thread(target=remove)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert result == {"close": None, "rm": None}, (i, result)
        assert name not in os.listdir(repo / "uploads")
        outcomes.append(name in os.listdir(repo / "layers"))
    uploads = repo_path(tmp_path / "root", "org/app") / "_uploads"
    # A removal that came after the close is done at the release that follows it.
    wait_until(lambda: not list(uploads.glob("*/startedat")), 5, "every upload to go")
    if not digest_named:
        assert not any(outcomes)


async def test_a_tag_opened_for_reading_with_o_trunc_is_eperm(tmp_path: Path, mount) -> None:
    # ext4 truncates a file opened O_RDONLY|O_TRUNC, and refuses the open (EPERM) of a
    # file that cannot be emptied so (append-only). A tag cannot be emptied, and nothing
    # a read-only descriptor writes could take its place: EPERM at the open, the tag as
    # it was. Was: the open succeeded, and the first close of any copy of it ended it.
    image = await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root")
    tag = m.path(*NAME.split("/"), "tags", "latest")
    assert open_errno(tag, os.O_RDONLY | os.O_TRUNC) == errno.EPERM
    assert tag.read_bytes() == image["manifest"]
    ro = mount(tmp_path / "root", "--read-only")
    ro_tag = ro.path(*NAME.split("/"), "tags", "latest")
    assert open_errno(ro_tag, os.O_RDONLY | os.O_TRUNC) == errno.EROFS


async def test_rename_exchange_swaps_tags_only(tmp_path: Path, mount) -> None:
    # ext4: RENAME_EXCHANGE swaps any two names; here two tags of one repository swap what
    # they point at, and every other pair is EINVAL (an exchange taken for a rename would
    # cancel the upload it meant to keep), a name that is not there ENOENT.
    image = await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root")
    repo = m.path(*NAME.split("/"))
    other = json.loads(image["manifest"])
    other["annotations"] = {"swap": "1"}
    other_bytes = json.dumps(other).encode()
    write_file(repo / "tags" / "other", other_bytes)
    before = {t: os.stat(repo / "tags" / t).st_ino for t in ("latest", "other")}
    renameat2(repo / "tags" / "latest", repo / "tags" / "other", RENAME_EXCHANGE)
    assert (repo / "tags" / "latest").read_bytes() == other_bytes
    assert (repo / "tags" / "other").read_bytes() == image["manifest"]
    assert os.stat(repo / "tags" / "latest").st_size == len(other_bytes)
    after = {t: os.stat(repo / "tags" / t).st_ino for t in ("latest", "other")}
    assert after == {"latest": before["other"], "other": before["latest"]}
    write_file(repo / "uploads" / "u", b"kept")
    for a, b, code in (
        (repo / "tags" / "latest", repo / "uploads" / "u", errno.EINVAL),
        (repo / "uploads" / "u", repo / "tags" / "latest", errno.EINVAL),
        (repo / "tags" / "latest", repo / "tags" / "absent", errno.ENOENT),
    ):
        assert errno_of(lambda a=a, b=b: renameat2(a, b, RENAME_EXCHANGE)) == code, (a, b)
    assert (repo / "uploads" / "u").read_bytes() == b"kept"
    assert (repo / "tags" / "latest").read_bytes() == other_bytes
