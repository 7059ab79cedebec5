"""What stays refused, and why, beside r1's findings that now pass (stop 25, f2):
removexattr, mknod, a create for reading, a map of an upload's writer, a rename over a
written upload, a manifest retimed after its store."""

from __future__ import annotations

import errno
import mmap
import os
import stat

import pytest
from support.roots import build_root, variants
from support.tools import digest_of, errno_of, ls
from support.uploads import write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"


async def test_removexattr_of_regfs_own_is_ignored_and_of_others_refused(tmp_path, mount):
    # user.regfs.* is computed from what the registry holds: its removal changes nothing
    # and says so by succeeding (rsync -X); a read-only mount refuses every removal.
    image = await build_root(tmp_path / "root", size=10_000)
    tag = mount(tmp_path / "root").path(*NAME.split("/"), "tags", "latest")
    os.removexattr(tag, "user.regfs.digest")
    assert os.getxattr(tag, "user.regfs.digest").decode() == digest_of(image["manifest"])
    assert errno_of(lambda: os.removexattr(tag, "system.posix_acl_access")) == errno.EOPNOTSUPP
    ro = mount(tmp_path / "root", "--read-only").path(*NAME.split("/"), "tags", "latest")
    assert errno_of(lambda: os.removexattr(ro, "user.not-there")) == errno.EROFS


async def test_mknod_makes_an_upload_and_nothing_else(tmp_path, mount):
    await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root").path(*NAME.split("/"))
    os.mknod(repo / "uploads" / "empty", stat.S_IFREG | 0o644)
    assert (repo / "uploads" / "empty").read_bytes() == b""
    assert ls(repo / "uploads") == ["empty"]
    assert errno_of(lambda: os.mknod(repo / "uploads" / "fifo", stat.S_IFIFO | 0o644)) == (
        errno.EPERM
    )
    assert errno_of(lambda: os.mknod(repo / "tags" / "v2", stat.S_IFREG | 0o644)) == errno.EPERM
    assert ls(repo / "uploads") == ["empty"]
    assert ls(repo / "tags") == ["latest"]


async def test_a_create_for_reading_holds_no_writer(tmp_path, mount):
    # flock(1)'s open: O_RDONLY|O_CREAT. The descriptor reads; another opens to write.
    await build_root(tmp_path / "root", size=10_000)
    path = mount(tmp_path / "root").path(*NAME.split("/"), "uploads", "lock")
    reader = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        with open(path, "ab", buffering=0) as writer:
            writer.write(b"appended")
        assert os.pread(reader, 100, 0) == b"appended"
        assert errno_of(lambda: os.write(reader, b"x")) == errno.EBADF
    finally:
        os.close(reader)


async def test_a_writers_descriptor_maps_shared_read_only_and_private(tmp_path, mount):
    # A read-only shared map and a private map of the writer's descriptor (ENODEV while
    # the writer was direct_io); a private map's stores never reach the upload.
    await build_root(tmp_path / "root", size=10_000)
    path = mount(tmp_path / "root").path(*NAME.split("/"), "uploads", "blob")
    data = os.urandom(10_000)
    write_file(path, data)
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as shared:
            assert shared[:] == data
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as private:
            private[0:5] = b"hello"
            assert private[:5] == b"hello"
    assert path.read_bytes() == data


async def test_a_refused_rename_over_a_written_upload_keeps_it(tmp_path, mount):
    # mv over an upload its writer holds replaces it; a rename that is refused (a finish
    # whose digest is not the bytes') leaves it there, its writer writing on to its end.
    await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root").path(*NAME.split("/"))
    uploads = repo / "uploads"
    data = b"x" * 100 + b"y" * 100
    held = digest_of(data)
    write_file(uploads / "a", b"some bytes")
    with open(uploads / held, "wb", buffering=0) as writer:
        writer.write(data[:100])
        assert errno_of(lambda: os.rename(uploads / "a", uploads / held)) == errno.EINVAL
        assert ls(uploads) == sorted(["a", held])
        writer.write(data[100:])
    assert ls(uploads) == ["a"]  # the held upload finished at its close, as named
    assert (repo / "layers" / held).read_bytes() == data
    assert (uploads / "a").read_bytes() == b"some bytes"


async def test_a_manifest_stored_by_digest_takes_a_chmod_for_a_while_only(tmp_path, mount):
    # The grace is the writer's: a manifest that was there before (not stored by this
    # mount just now) still refuses a real change.
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    [other] = variants(image, 1)
    stored = repo / "manifests" / digest_of(other)
    write_file(stored, other)
    os.chmod(stored, 0o600)
    os.utime(stored, (1_600_000_000, 1_600_000_000))
    old = repo / "manifests" / digest_of(image["manifest"])
    assert errno_of(lambda: os.chmod(old, 0o600)) == errno.EPERM
