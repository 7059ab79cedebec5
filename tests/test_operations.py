"""The FUSE operations called directly, without a mount: errno mapping, inode lifetimes, and
the hook a new view plugs into."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import stat
from dataclasses import dataclass
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from support.registry import OCI_CONFIG, OCI_MANIFEST

from regfs import directories, fusefeatures
from regfs.attributes import FOREVER, LISTING_BLOCK_SIZE, packed
from regfs.nodes import (
    Attr,
    AttrColumns,
    FixedNode,
    Listing,
    Node,
    NotFound,
    SectionNode,
    TagNode,
)
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import LISTED_ENTRY_TIMEOUT, BytesReader, Tree
from storage.api import BlobReader
from storage.digests import Digest, digest_bytes
from storage.drivers import InMemoryDriver
from storage.registry import Registry

pytestmark = pytest.mark.storage


@pytest.fixture
async def ops() -> Operations:
    registry = Registry(InMemoryDriver())
    upload = await registry.repository("a/b").layers.upload()
    await upload.write(b"layer")
    await upload.finish(digest_bytes(b"layer"))
    options = MountOptions("inmemory:", "/mnt", tag_ttl=2.0)
    return Operations(Tree(registry, options.tag_ttl), options)


# What `Directories.read` asks of a token here: that the kernel asked a READDIRPLUS.
READDIRPLUS = SimpleNamespace(plus=True)


async def lookup_path(ops: Operations, *names: str) -> pyfuse3.EntryAttributes:
    inode = pyfuse3.ROOT_INODE
    for name in names:
        entry = await ops.lookup(inode, name.encode(), None)
        inode = entry.st_ino
    return entry


async def test_lookup_attrs_and_timeouts(ops):
    layer = str(digest_bytes(b"layer"))
    entry = await lookup_path(ops, "a", "b", "layers", layer)
    assert entry.st_size == 5 and entry.attr_timeout == FOREVER
    directory = await lookup_path(ops, "a", "b")
    # A listing the kernel keeps (patched pyfuse3) is checked against the directory's mtime,
    # so its attributes are kept only briefly; else for the tag TTL.
    kept = min(2.0, LISTED_ENTRY_TIMEOUT) if fusefeatures.PATCHED else 2.0
    assert directory.attr_timeout == kept
    # cp sizes its buffer by a file's st_blksize, glibc's opendir its getdents buffer by a
    # directory's: not 1 MiB per READDIR of a small directory, but a registry directory's
    # listing may be long (an image's directories: 4096, test_rootfs_mount.py)
    assert (entry.st_blksize, directory.st_blksize) == (1 << 20, LISTING_BLOCK_SIZE)
    with pytest.raises(pyfuse3.FUSEError) as err:
        await lookup_path(ops, "a", "b", "layers", "sha256:" + "0" * 64)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(pyfuse3.ROOT_INODE, b"\xff\xfe", None)
    assert err.value.errno == errno.ENOENT


async def test_unexpected_exception_is_eio_with_traceback(ops, caplog, monkeypatch):
    async def boom(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.tree, "lookup", boom)
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as err:
        await ops.lookup(pyfuse3.ROOT_INODE, b"a", None)
    assert err.value.errno == errno.EIO
    assert "unexpected error" in caplog.text and "RuntimeError: a bug" in caplog.text


async def test_forget_drops_inodes_but_not_the_root(ops):
    entry = await lookup_path(ops, "a")
    await ops.lookup(pyfuse3.ROOT_INODE, b"a", None)  # a second lookup of the same node
    assert (await lookup_path(ops, "a")).st_ino == entry.st_ino
    await ops.forget([(entry.st_ino, 2)])
    assert ops.inodes.get(entry.st_ino) is not None  # one lookup is left
    await ops.forget([(entry.st_ino, 1), (pyfuse3.ROOT_INODE, 1)])
    assert ops.inodes.get(entry.st_ino) is None
    assert ops.inodes.get(pyfuse3.ROOT_INODE) is not None
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.getattr(entry.st_ino, None)
    assert err.value.errno == errno.ESTALE


async def test_writes_refused_eperm_or_erofs(ops):
    entry = await lookup_path(ops, "a", "b", "layers", str(digest_bytes(b"layer")))
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.open(entry.st_ino, 1, None)  # O_WRONLY
    assert err.value.errno == errno.EPERM
    ops.options.read_only = True
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.unlink(pyfuse3.ROOT_INODE, b"a", None)
    assert err.value.errno == errno.EROFS


async def test_a_directory_moved_into_uploads_is_eperm(ops):
    """mv of a namespace into a repository's uploads/ is refused with EPERM, not answered
    with EIO: its old parent (the root) belongs to no repository."""
    uploads = await lookup_path(ops, "a", "b", "uploads")
    with pytest.raises(pyfuse3.FUSEError) as err:
        await ops.rename(pyfuse3.ROOT_INODE, b"a", uploads.st_ino, b"x", 0, None)
    assert err.value.errno == errno.EPERM


@dataclass(frozen=True)
class NoteNode(Node):
    """The one file of the test view: `<repo>/notes/readme`."""

    repo: str


class NotesView:
    """The smallest view: what regfs/views.py asks of one (the rootfs/ view is bigger)."""

    node_types = (NoteNode,)

    def __init__(self) -> None:
        self.forgotten = 0

    async def lookup(self, parent: Node, name: str) -> Node:
        if isinstance(parent, SectionNode) and name == "readme":
            return NoteNode(parent.repo)
        raise NotFound(name)

    async def children(self, node: Node) -> list[tuple[str, Node]]:
        assert isinstance(node, SectionNode)
        return [("readme", NoteNode(node.repo))]

    async def attr(self, node: Node) -> Attr:
        assert isinstance(node, NoteNode)
        return Attr(False, len(node.repo), 0, immutable=True)

    async def xattrs(self, node: Node) -> dict[str, bytes]:
        return {"user.regfs.note": b"yes"} if isinstance(node, NoteNode) else {}

    async def open(self, node: Node) -> BlobReader:
        if not isinstance(node, NoteNode):
            raise IsADirectoryError(str(node))
        return BytesReader(node.repo.encode())

    def forget_moving(self) -> None:
        self.forgotten += 1


async def test_a_view_plugs_in_as_a_section(ops):
    """A view passed to Tree shows its section in every repository, read-only, and leaves the
    registry's sections as they were."""
    view = NotesView()
    with_view = Operations(Tree(ops.tree.registry, 2.0, views={"notes": view}), ops.options)
    repo = (await lookup_path(with_view, "a", "b")).st_ino
    names = [name for name, _ in await with_view.tree.children(with_view.inodes.node(repo))]
    assert names == ["layers", "manifests", "notes", "tags", "uploads"]
    section = await lookup_path(with_view, "a", "b", "notes")
    assert stat.S_ISDIR(section.st_mode)
    readme = await lookup_path(with_view, "a", "b", "notes", "readme")
    assert readme.st_size == 3 and readme.attr_timeout == FOREVER
    info = await with_view.open(readme.st_ino, os.O_RDONLY, None)
    assert await with_view.read(info.fh, 0, 100) == b"a/b" and info.keep_cache is False
    await with_view.release(info.fh)
    assert await with_view.getxattr(readme.st_ino, b"user.regfs.note", None) == b"yes"
    for change in (
        with_view.open(readme.st_ino, os.O_WRONLY, None),
        with_view.unlink(section.st_ino, b"readme", None),
        with_view.create(section.st_ino, b"new", 0o644, os.O_WRONLY, None),
        with_view.rename(section.st_ino, b"readme", section.st_ino, b"other", 0, None),
    ):
        with pytest.raises(pyfuse3.FUSEError) as err:
            await change
        assert err.value.errno == errno.EPERM
    with pytest.raises(pyfuse3.FUSEError) as err:
        await lookup_path(with_view, "a", "notes")  # a namespace has no sections
    assert err.value.errno == errno.ENOENT
    with_view.tree.forget_moving()
    assert view.forgotten == 1
    layer = await lookup_path(with_view, "a", "b", "layers", str(digest_bytes(b"layer")))
    assert layer.st_size == 5


@dataclass(frozen=True)
class PageNode(FixedNode):
    """A page of the listed test view: bytes that never change."""

    number: int


class PagesView(NotesView):
    """A view whose section lists its pages with their attributes (a `Listing`), as the
    rootfs/ view lists an image's directory; it counts the attributes asked of it."""

    node_types = (PageNode,)

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def lookup(self, parent: Node, name: str) -> Node:
        return PageNode(int(name))

    listed = (1, 2, 3)

    async def children(self, node: Node) -> list[tuple[str, Node]]:
        numbers = self.listed
        attrs = [self._attr(number) for number in numbers]
        columns = AttrColumns(
            *([getattr(a, field) for a in attrs] for field in AttrColumns._fields)
        )
        listing = Listing([str(n).encode() for n in numbers], packed(columns))
        listing += ((str(number), PageNode(number)) for number in numbers)
        return listing

    async def attr(self, node: Node) -> Attr:
        assert isinstance(node, PageNode)
        self.asked += 1
        return self._attr(node.number)

    @staticmethod
    def _attr(number: int) -> Attr:
        return Attr(False, number, 7, True, stat.S_IFLNK | 0o777, 5, 6, 2)


def shown(entry: pyfuse3.EntryAttributes) -> tuple[object, ...]:
    """Every field of an entry the kernel gets."""
    return tuple(getattr(entry, field) for field in SHOWN)


SHOWN = (
    "st_ino",
    "st_mode",
    "st_size",
    "st_uid",
    "st_gid",
    "st_nlink",
    "st_rdev",
    "st_blocks",
    "st_blksize",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
    "attr_timeout",
    "entry_timeout",
)


async def test_a_listing_with_attributes_is_handed_as_a_lookup_shows_it(ops, monkeypatch):
    """A view's `children` may answer a `Listing`: readdirplus hands each entry the
    attributes that came with it, without asking the view for any, and they are what a
    lookup of the entry shows (inode, type, mode, owner, links, timeouts)."""
    handed: list[tuple[bytes, pyfuse3.EntryAttributes]] = []

    def reply(
        token: object, name: bytes, entry: pyfuse3.EntryAttributes, _: int, lookup: bool = True
    ) -> bool:
        handed.append((name, entry))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    monkeypatch.setattr(pyfuse3, "readdir_ended", lambda token, next_id: None)
    monkeypatch.setattr(fusefeatures, "REPLY_MANY", False)  # one readdir_reply each
    view = PagesView()
    with_view = Operations(Tree(ops.tree.registry, 2.0, views={"pages": view}), ops.options)
    section = await lookup_path(with_view, "a", "b", "pages")
    await with_view.directories.read(with_view.inodes.node(section.st_ino), 0, READDIRPLUS)
    assert [name for name, _ in handed] == [b".", b"..", b"1", b"2", b"3"] and view.asked == 0

    for name, entry in handed[2:]:
        looked_up = await lookup_path(with_view, "a", "b", "pages", name.decode())
        assert shown(entry) == shown(looked_up)
        assert entry.st_mode == stat.S_IFLNK | 0o777 and entry.attr_timeout == FOREVER
    assert view.asked == 3


async def test_a_lookup_racing_a_tag_push_keeps_nothing_stale(monkeypatch):
    """A lookup reads a tag's old target and waits (a remote registry); meanwhile a push
    through the mount moves the tag and drops the cache. The lookup must not put the old
    target back: the tree shows the new manifest at once, though its TTL is long."""
    registry = Registry(InMemoryDriver())
    repo = registry.repository("a/b")
    upload = await repo.layers.upload()
    await upload.write(b"{}")
    await upload.finish(digest_bytes(b"{}"))
    config = {"mediaType": OCI_CONFIG, "digest": str(digest_bytes(b"{}")), "size": 2}
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
    old = json.dumps(body).encode()
    new = json.dumps({**body, "annotations": {"v": "2"}}).encode()
    await repo.tags.put("v1", await repo.manifests.put(old))
    monkeypatch.setattr(registry, "repository", lambda name: repo)
    tree = Tree(registry, tag_ttl=3600)
    tag = TagNode("a/b", "v1")

    read_old, pushed = trio.Event(), trio.Event()
    real_get = repo.tags.get

    async def slow_get(name: str) -> Digest:
        digest = await real_get(name)
        read_old.set()
        await pushed.wait()
        return digest

    monkeypatch.setattr(repo.tags, "get", slow_get)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tree.lookup, SectionNode("a/b", "tags"), "v1")
        await read_old.wait()
        monkeypatch.setattr(repo.tags, "get", real_get)
        await tree.put_tag(tag, new)
        pushed.set()
    assert await tree.read(tag) == new
    assert (await tree.attr(tag)).size == len(new)


async def test_a_listing_read_to_its_end_is_read_again_from_its_snapshot(ops, monkeypatch):
    """No release tells the daemon a listing is done (opendir answers ENOSYS), and a reader
    may ask again inside its last reply (its getdents buffer took only part of it), as may
    another reader of the kernel's kept copy: a snapshot read to its end answers from its
    own entries, whatever changed since, until it is evicted (here by SNAPSHOT_ENTRIES:
    then the current listing) or ENDED_KEPT passed."""
    handed: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, entry: object, next_id: int, lookup: bool = True) -> bool:
        if name not in (b".", b".."):  # first in every listing
            handed.append((name, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    monkeypatch.setattr(fusefeatures, "REPLY_MANY", False)  # one readdir_reply each
    layers = SectionNode("a/b", "layers")
    await ops.directories.read(layers, 0, READDIRPLUS)
    [(name, end)] = handed
    assert name == str(digest_bytes(b"layer")).encode()
    await ops.directories.read(layers, end, READDIRPLUS)  # the end: nothing more
    assert len(handed) == 1
    upload = await ops.tree.registry.repository("a/b").layers.upload()
    await upload.write(b"other")
    await upload.finish(digest_bytes(b"other"))
    ops.tree.forget_moving()  # SIGHUP: the tree reads the listing again
    await ops.directories.read(layers, end - 1, READDIRPLUS)  # back into it: its own entries
    assert handed[1:] == [(name, end)]
    monkeypatch.setattr(directories, "SNAPSHOT_ENTRIES", 2)
    await ops.directories.read(layers, 0, READDIRPLUS)  # a new listing of 2: the first goes
    assert len(handed) == 4 and len(ops.directories._snapshots) == 1
    await ops.directories.read(layers, end - 1, READDIRPLUS)  # the current listing
    assert len(handed) == 6
    [second] = ops.directories._snapshots.values()  # read to its end, and then held
    monkeypatch.setattr(directories, "ENDED_KEPT", 0.0)
    await ops.directories.read(layers, 0, READDIRPLUS)  # a listing made lets go of it first
    assert second.entries is None and len(handed) == 8


def test_a_listing_of_many_tags_sets_off_no_collection():
    """A fresh listing's nodes (200,000 tracked tuples for 100,000 tags) would set off
    collections of the daemon's objects, a full one among them: half a fresh mount's `ls`.
    None runs while they are made (`gc_paused`: only around code that does not await); the
    GC is on again after, and off stays off."""
    started: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    tags = [f"t{i}" for i in range(100_000)]
    gc.collect()  # what came before sets off nothing (the young generation's count is 0)
    gc.callbacks.append(count)
    try:
        entries = TagNode.listing("a/b", tags)
    finally:
        gc.callbacks.remove(count)
    # At most the one young collection that the first allocation after the pause sets off
    # (it walks the new nodes once); without the pause, hundreds, full ones among them.
    assert started in ([], [0]) and gc.isenabled()
    assert len(entries) == len(tags) and entries[-1] == ("t99999", TagNode("a/b", "t99999"))
    gc.disable()
    try:
        TagNode.listing("a/b", tags[:10])
        assert not gc.isenabled()
    finally:
        gc.enable()


class ShelvesView(PagesView):
    """PagesView whose page 1 is a directory of an image, page 2 one that moves with a tag
    (an image's root, rootfs/<tag>: not immutable, so in no `Listing`), page 3 a file of an
    image."""

    listed = (1, 3)

    @staticmethod
    def _attr(number: int) -> Attr:
        if number == 3:
            return PagesView._attr(number)
        return Attr(True, 0, 7 + number, number == 1, stat.S_IFDIR | 0o750, 5, 6, 2 + number)


async def test_an_image_directory_answers_getattr_with_what_it_was_handed(ops, monkeypatch):
    """The kernel asks GETATTR of an image's directory after each READDIR of it (its atime),
    so every `find` asks it of each directory: the entry a listing (or lookup) handed for it
    answers as is, field for field what the view says of it, until the kernel forgets its
    inode. A directory that moves with a tag, and a file, are asked of the view each time."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *args, **kwargs: True)
    monkeypatch.setattr(pyfuse3, "readdir_ended", lambda token, next_id: None)
    monkeypatch.setattr(fusefeatures, "REPLY_MANY", False)  # one readdir_reply each
    view = ShelvesView()
    with_view = Operations(Tree(ops.tree.registry, 2.0, views={"pages": view}), ops.options)
    section = await lookup_path(with_view, "a", "b", "pages")
    await with_view.directories.read(with_view.inodes.node(section.st_ino), 0, READDIRPLUS)
    pages = [PageNode(number) for number in (1, 2, 3)]
    inodes = [with_view.inodes.inode(page) for page in pages]
    answers = [await with_view.getattr(ino, None) for ino in inodes]
    assert view.asked == 2  # pages 2 and 3; page 1's entry came with the listing
    again = [await with_view.getattr(ino, None) for ino in inodes]
    assert again[0] is answers[0] and view.asked == 4
    for page, answer in zip(pages, answers, strict=True):
        assert shown(answer) == shown(with_view.attributes.entry(page, view._attr(page.number)))
    assert stat.S_ISDIR(answers[0].st_mode) and answers[0].st_nlink == 3
    assert answers[0].attr_timeout == FOREVER and answers[1].attr_timeout < FOREVER
    await with_view.forget([(inodes[0], 1)])  # the kernel lets go: nothing kept
    assert with_view.inodes.fixed(inodes[0]) is None
    with pytest.raises(pyfuse3.FUSEError) as err:
        await with_view.getattr(inodes[0], None)
    assert err.value.errno == errno.ESTALE
    looked_up = await lookup_path(with_view, "a", "b", "pages", "1")
    assert shown(looked_up) == shown(answers[0]) and view.asked == 5
    assert await with_view.getattr(looked_up.st_ino, None) is looked_up and view.asked == 5
