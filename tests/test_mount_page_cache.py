"""Uploads are read through the page cache (dropped at each open, never kept), so that
Python's mmap (MAP_SHARED) maps them, through their writers' descriptors too. What that
must not cost: a reader sees what a writer wrote once write(2) returned, through any
descriptor, as on a local filesystem. Tags stay read directly: their page cache could
serve a manifest cut to the size the kernel last saw, or mixed with another (the last
test)."""

from __future__ import annotations

import json
import mmap
import os
import time
from pathlib import Path

import pytest
from support.mounts import hang_up
from support.roots import build_root
from support.tools import run
from support.uploads import write_file

from regfs.tree import LISTED_ENTRY_TIMEOUT
from storage.drivers import FilesystemDriver
from storage.registry import Registry

pytestmark = pytest.mark.mount

NAME = "library/demo"


@pytest.fixture
async def uploads(tmp_path: Path, mount) -> Path:
    await build_root(tmp_path / "root", size=10_000)
    return mount(tmp_path / "root").path(*NAME.split("/"), "uploads")


async def test_an_open_reader_sees_an_overwrite_below_the_end(uploads: Path) -> None:
    """A reader that read (and so cached) the start of an upload reads it again after
    another descriptor overwrote it: the new bytes, not its cached pages."""
    write_file(uploads / "blob", b"a" * 100_000)
    with open(uploads / "blob", "rb", buffering=0) as reader:
        assert reader.read(8192) == b"a" * 8192
        run("dd", "of=" + str(uploads / "blob"), "conv=notrunc", "bs=4096", "count=1",
            "if=/dev/zero")  # fmt: skip
        assert os.pread(reader.fileno(), 8192, 0) == b"\0" * 4096 + b"a" * 4096


async def test_a_reader_sees_an_overwrite_made_through_another_mount(tmp_path: Path, mount) -> None:
    """Two mounts of one root: a reader on the first, whose pages hold the start of an
    upload, reads it again after the second overwrote it: the new bytes. The kernel sees no
    write here; the upload's attributes (0 s) tell it that the bytes moved."""
    root = tmp_path / "root"
    await build_root(root, size=10_000)
    first, second = (mount(root).path(*NAME.split("/"), "uploads") for _ in range(2))
    write_file(first / "blob", b"a" * 100_000)
    with open(first / "blob", "rb", buffering=0) as reader:
        assert reader.read(8192) == b"a" * 8192
        with open(second / "blob", "r+b", buffering=0) as writer:
            writer.write(b"b" * 4096)
        assert os.pread(reader.fileno(), 8192, 0) == b"b" * 4096 + b"a" * 4096


async def test_an_open_reader_sees_a_truncated_and_rewritten_upload(uploads: Path) -> None:
    """`cp` over an upload (O_TRUNC, then shorter bytes) while a reader holds it open: the
    reader's next read is the new bytes and ends where they end."""
    write_file(uploads / "blob", b"old " * 30_000)
    with open(uploads / "blob", "rb", buffering=0) as reader:
        assert reader.read(1 << 20) == b"old " * 30_000
        write_file(uploads / "blob", b"new bytes")
        assert os.pread(reader.fileno(), 1 << 20, 0) == b"new bytes"


async def test_a_mapping_of_a_growing_upload_opened_anew_shows_what_was_appended(
    uploads: Path,
) -> None:
    """A map of an upload shows its bytes; each open drops the kernel's pages, so a map made
    after an append shows the append (with bytes that were mapped before among them)."""
    fd = os.open(uploads / "growing", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"first part, ")
        with (
            open(uploads / "growing", "rb") as f,
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m,
        ):
            assert m[:] == b"first part, "
        os.write(fd, b"second part")
        with (
            open(uploads / "growing", "rb") as f,
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m,
        ):
            assert m[:] == b"first part, second part"
    finally:
        os.close(fd)


async def test_a_writer_of_an_upload_maps_it(uploads: Path) -> None:
    """Its writer goes through the page cache too (stop 25, f2): a writable shared map's
    stores are writes at their offsets (overwrites below the end), sent at msync, munmap
    or close, and read back through another descriptor."""
    write_file(uploads / "blob", b"x" * 4096)
    with open(uploads / "blob", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[10:15] = b"hello"
    assert (uploads / "blob").read_bytes() == b"x" * 10 + b"hello" + b"x" * 4081


async def test_a_reader_of_a_tag_reads_its_manifest_to_the_end_after_the_tag_moved(
    tmp_path: Path, mount
) -> None:
    """A handle of a tag reads the manifest the tag pointed at when it was opened, to its
    end, whatever the tag does meanwhile. Read through the page cache, the kernel would stop
    the read at the size it last got for the tag's inode (here the new, smaller manifest's,
    from a stat after the move) and serve pages another handle read: a cut or mixed manifest.
    So tags are read directly (and cannot be mapped)."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    repo = Registry(FilesystemDriver(root)).repository(NAME)
    body = json.loads(image["manifest"])
    body["annotations"] = {"org.example.pad": "x" * 2_000_000}
    big = json.dumps(body).encode()
    await repo.tags.put("latest", await repo.manifests.put(big))
    m = mount(root, "--tag-ttl", "60")
    latest = m.path(*NAME.split("/"), "tags", "latest")
    fd = os.open(latest, os.O_RDONLY)
    try:
        head = os.read(fd, 65536)
        await repo.tags.put("latest", await repo.manifests.put(image["manifest"]))
        hang_up(m)
        time.sleep(LISTED_ENTRY_TIMEOUT * 2)  # the kernel's entry expired: stat looks it up
        assert latest.read_bytes() == image["manifest"]
        rest = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
    finally:
        os.close(fd)
    assert head + rest == big, (len(head), len(rest))
