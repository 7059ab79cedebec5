"""What issue 18 promises of listings that no other test held the daemon to: memory stays
bounded with 100,000 tags in a repository because the tree keeps the targets and attributes
of the TAGS_KEPT most recent tags only (regfs/tree.py). Checked in process on a `Tree` with
the bound made small: what is kept is answered without storage, what is not is read again.

And what a listing reads ahead in bulk (`Tree.read_attrs`, the tags read in the background
after a listing): the same answers as one read each, bounded as the caches are, dropped
by a change meanwhile, damage left to the lookups that report it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pyfuse3 import EntryAttributes
from support.oci import empty_image, image_manifest

import regfs.tree
from regfs.nodes import LayerNode, ManifestNode, Node, SectionNode, TagNode
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import LISTED_ENTRY_TIMEOUT, Tree
from storage.digests import digest_bytes
from storage.drivers import FileInfo, FilesystemDriver, InMemoryDriver
from storage.errors import CorruptEntry
from storage.layers import LayerService
from storage.paths import TagCurrentLink, path_for
from storage.registry import Registry
from storage.tags import TagService

pytestmark = pytest.mark.storage

NAME = "many/tags"
KEPT = 10
TAGS = [f"t{i:03d}" for i in range(6 * KEPT)]


async def test_only_the_most_recent_tags_are_kept(monkeypatch):
    """A listing of 60 tags and a lookup and `stat` of each (`ls -l tags/`), with room for
    10: the last 10 are answered from memory (their attributes too, as a listing uses
    them), even once the registry has dropped every tag; the 50 before them are read
    again, so gone. Neither cache ever holds more than the bound."""
    monkeypatch.setattr(regfs.tree, "TAGS_KEPT", KEPT)
    registry = Registry(InMemoryDriver())
    repo = registry.repository(NAME)
    digest = await empty_image(repo)
    for tag in TAGS:
        await repo.tags.put(tag, digest)
    tree = Tree(registry, tag_ttl=600)
    section = SectionNode(NAME, "tags")
    assert [name for name, _ in await tree.children(section)] == TAGS

    def kept() -> tuple[int, int]:
        return len(tree._tags._entries), len(tree._tag_attrs._entries)

    for tag in TAGS:
        node = await tree.lookup(section, tag)
        assert (await tree.attr(node)).size == len(image_manifest(b"{}", []))
        assert max(kept()) <= KEPT
    assert kept() == (KEPT, KEPT)
    recent, older = TAGS[-KEPT:], TAGS[:-KEPT]
    assert [tag for tag in TAGS if tree.cached_attr(TagNode(NAME, tag))] == recent

    for tag in TAGS:
        await repo.tags.delete(tag)
    for tag in recent:
        assert await tree.lookup(section, tag) == TagNode(NAME, tag)  # from memory
    for tag in older:
        with pytest.raises(LookupError):
            await tree.lookup(section, tag)
    assert max(kept()) <= KEPT


# ------------------------------------------------------------------ read ahead in bulk


class Counting(FilesystemDriver):
    """A local root that counts the calls that read one file each (link reads and stats)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0

    async def _get_content(self, path: str, limit: int) -> bytes:
        self.reads += 1
        return await super()._get_content(path, limit)

    async def _stat(self, path: str) -> FileInfo:
        self.reads += 1
        return await super()._stat(path)


async def tagged_root(root: Path, count: int) -> tuple[Registry, Counting]:
    """count tags on one image, and three damaged: a garbage link, one naming a manifest
    that is not there, one without its current link."""
    driver = Counting(root)
    registry = Registry(driver)
    repo = registry.repository(NAME)
    digest = await empty_image(repo)
    for tag in TAGS[:count]:
        await repo.tags.put(tag, digest)
    await driver.put_content(path_for(TagCurrentLink(NAME, "garbage")), b"garbage")
    await repo.tags.put("orphan", digest)
    await driver.put_content(path_for(TagCurrentLink(NAME, "orphan")), str(OTHER).encode())
    await repo.tags.put("unpushed", digest)
    await driver.delete(path_for(TagCurrentLink(NAME, "unpushed")).rsplit("/", 1)[0])
    return registry, driver


async def read_ahead(tree: Tree) -> list[tuple[str, Node]]:
    """The tags' listing, once the read-ahead its first lookup starts (`ls -l`) has ended."""
    section = SectionNode(NAME, "tags")
    listing = await tree.children(section)
    assert NAME not in tree._tags_reading  # a listing alone reads nothing ahead
    await tree.lookup(section, TAGS[0])
    with trio.fail_after(10):
        while NAME in tree._tags_reading:
            await trio.sleep(0.01)
    return listing


OTHER = digest_bytes(b"no such manifest")


def changed_after(
    monkeypatch: pytest.MonkeyPatch, owner: type, method: str, change: Callable[[Any], None]
) -> None:
    """owner.method (a bulk read) answers, then a change through the mount comes (before the
    tree has the answer): change(what was asked)."""
    original = getattr(owner, method)

    async def then_changed(self: object, asked: Any) -> Any:
        found = await original(self, asked)
        change(asked)
        return found

    monkeypatch.setattr(owner, method, then_changed)


async def test_a_listing_reads_its_tags_ahead_so_lookups_read_nothing(tmp_path, monkeypatch):
    """`ls -l tags/` looks each tag up after the listing (entry timeout 0): the listing reads
    every tag's link and manifest in bulk in the background (a local root), so a lookup and
    stat of each reads no storage and answers what a tree that read nothing ahead answers.
    The damaged ones are left to their lookups, which fail as before; bounded as the tag
    cache is. In batches of 3 here: each cached as read."""
    monkeypatch.setattr(regfs.tree, "TAGS_READ_BATCH", 3)
    registry, driver = await tagged_root(tmp_path / "root", 2 * KEPT)
    tree = Tree(registry, tag_ttl=600)
    listing = await read_ahead(tree)
    section = SectionNode(NAME, "tags")
    fresh = Tree(registry, tag_ttl=600)
    for name, node in listing:
        if name in ("garbage", "orphan", "unpushed"):
            assert tree.cached_attr(node) is None, name
            continue
        driver.reads = 0
        assert await tree.lookup(section, name) == node
        attr = await tree.attr(node)
        assert driver.reads == 0, name
        assert attr == await fresh.attr(await fresh.lookup(section, name))
        assert driver.reads > 0  # the control: one that read nothing ahead reads
    reads = driver.reads
    for name, error in (("garbage", CorruptEntry), ("orphan", LookupError)):
        with pytest.raises(error):
            await tree.attr(await tree.lookup(section, name))
    with pytest.raises(LookupError):
        await tree.lookup(section, "unpushed")
    assert driver.reads > reads


async def test_a_listing_no_tag_is_looked_up_in_reads_no_tag_link(tmp_path):
    """A plain `ls tags/` (or `watch ls tags/`, once per --tag-ttl) looks nothing up: the
    listing reads no tag's link. The first lookup after it reads them ahead, once: a
    second lookup, or one after a listing served from the cache, starts nothing."""
    registry, driver = await tagged_root(tmp_path / "root", KEPT)
    tree = Tree(registry, tag_ttl=600)
    section = SectionNode(NAME, "tags")
    driver.reads = 0
    listing = await tree.children(section)
    await trio.sleep(0.05)  # what a system task started by the listing would do meanwhile
    assert driver.reads == 0
    assert [name for name, node in listing if tree.cached_attr(node)] == []
    await tree.lookup(section, "t001")
    assert NAME in tree._tags_reading
    with trio.fail_after(10):
        while NAME in tree._tags_reading:
            await trio.sleep(0.01)
    await tree.children(section)  # cached: not read from storage
    await tree.lookup(section, "t002")
    assert NAME not in tree._tags_reading


async def test_a_listing_chunk_waits_for_the_tags_being_read_ahead(tmp_path, monkeypatch):
    """While tags are read ahead (`ls -l` looked one up), readdir hands each tag the read
    will cover with its attributes, waiting for its batch (`Tree.ahead`, `entry_of`), so
    `ls -l` stats it without a LOOKUP: no read of its own, what a fresh tree reads, kept
    0.1 s. One the read-ahead leaves out (damaged) is still listed, as a placeholder
    (timeouts 0), and its lookup fails as before. A lookup waits for nothing: it reads the
    target it needs, and its attributes, itself."""
    monkeypatch.setattr(regfs.tree, "TAGS_READ_BATCH", 3)
    registry, driver = await tagged_root(tmp_path / "root", 2 * KEPT)
    gate = trio.Event()
    read_many = TagService.read_many

    async def gated(self: TagService, tags: list[str]) -> Any:
        await gate.wait()
        return await read_many(self, tags)

    monkeypatch.setattr(TagService, "read_many", gated)
    ops = Operations(Tree(registry, tag_ttl=600), MountOptions(str(tmp_path), "/mnt"))
    tree, attributes = ops.tree, ops.attributes
    section = SectionNode(NAME, "tags")
    await tree.children(section)
    looked_up = TagNode(NAME, TAGS[1])
    with trio.fail_after(5):
        await tree.lookup(section, TAGS[0])  # starts the read-ahead
        assert await tree.lookup(section, looked_up.tag) == looked_up
        assert not tree.ahead(looked_up)
        await attributes.entry_of(looked_up)  # while the read-ahead waits at the gate
    listed, garbage = TagNode(NAME, TAGS[2 * KEPT - 1]), TagNode(NAME, "garbage")
    assert attributes.listed(listed) is None and attributes.listed(garbage) is None
    got: dict[TagNode, EntryAttributes] = {}

    async def entry_of(node: TagNode) -> None:
        got[node] = await attributes.entry_of(node)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(entry_of, listed)
        nursery.start_soon(entry_of, garbage)
        await trio.sleep(0.05)
        assert got == {}  # they wait for the read-ahead
        driver.reads = 0
        gate.set()
    assert driver.reads == 0 and not tree.ahead(listed) and NAME not in tree._tags_reading
    fresh = Tree(registry, tag_ttl=600)
    real = await fresh.attr(await fresh.lookup(section, listed.tag))
    assert (got[listed].st_size, got[listed].st_mtime_ns) == (real.size, real.mtime_ns)
    assert got[listed].entry_timeout == LISTED_ENTRY_TIMEOUT
    assert (got[garbage].st_size, got[garbage].entry_timeout, got[garbage].attr_timeout) == (
        0,
        0,
        0,
    )
    with pytest.raises(CorruptEntry):
        await tree.attr(await tree.lookup(section, garbage.tag))


async def test_tags_read_ahead_are_as_many_as_the_cache_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(regfs.tree, "TAGS_KEPT", KEPT)
    registry, _ = await tagged_root(tmp_path / "root", 3 * KEPT)
    tree = Tree(registry, tag_ttl=600)
    listing = await read_ahead(tree)
    held = [name for name, node in listing if tree.cached_attr(node) is not None]
    assert held == [name for name, _ in listing[:KEPT] if name not in ("garbage", "orphan")]


async def test_a_change_while_tags_are_read_ahead_drops_what_was_read(tmp_path, monkeypatch):
    """A tag changed through the mount while its link was being read ahead: nothing read
    before the change is kept (it may be the old target)."""
    monkeypatch.setattr(regfs.tree, "TAGS_READ_BATCH", 3)
    registry, _ = await tagged_root(tmp_path / "root", KEPT)
    tree = Tree(registry, tag_ttl=600)
    change = lambda tags: tree.changed(TagNode(NAME, tags[0]))  # noqa: E731
    changed_after(monkeypatch, TagService, "read_many", change)
    listing = await read_ahead(tree)
    assert [name for name, node in listing if tree.cached_attr(node)] == []


async def test_tags_are_read_one_batch_ahead_of_those_cached_and_no_further(tmp_path, monkeypatch):
    """The next batch of tags is read (on a local root by the stat worker, on the other core)
    while one is cached, and no more than that one: what is held stays small. A change
    meanwhile stops both: the batch read ahead is neither kept nor followed by another."""
    monkeypatch.setattr(regfs.tree, "TAGS_READ_BATCH", 3)
    registry, _ = await tagged_root(tmp_path / "root", KEPT)
    tree = Tree(registry, tag_ttl=600)
    asked: list[list[str]] = []
    read_many, cache_tags = TagService.read_many, Tree._cache_tags
    caching, go_on = trio.Event(), trio.Event()

    async def counted(self: TagService, tags: list[str]) -> Any:
        asked.append(list(tags))
        return await read_many(self, tags)

    async def first_held(self: Tree, *args: Any) -> bool:
        if not caching.is_set():
            caching.set()
            await go_on.wait()
        return await cache_tags(self, *args)

    monkeypatch.setattr(TagService, "read_many", counted)
    monkeypatch.setattr(Tree, "_cache_tags", first_held)
    section = SectionNode(NAME, "tags")
    listing = await tree.children(section)
    await tree.lookup(section, TAGS[0])
    with trio.fail_after(10):
        await caching.wait()
        await trio.testing.wait_all_tasks_blocked()  # whatever would be read meanwhile is
    names = [name for name, _ in listing]
    assert asked == [names[0:3], names[3:6]]  # the first being cached, the second read
    tree.changed(TagNode(NAME, TAGS[0]))
    go_on.set()
    with trio.fail_after(10):
        while NAME in tree._tags_reading:
            await trio.sleep(0.01)
    assert asked == [names[0:3], names[3:6]]
    assert [name for name, node in listing if tree.cached_attr(node)] == []


async def test_digests_stated_in_bulk_are_bounded_and_dropped_by_a_change(tmp_path, monkeypatch):
    """A listing of layers/ stated in bulk keeps at most DIGESTS_KEPT attributes (the rest
    are answered, not kept); a change meanwhile keeps none."""
    monkeypatch.setattr(regfs.tree, "DIGESTS_KEPT", KEPT)
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    repo = registry.repository(NAME)
    for i in range(3 * KEPT):
        upload = await repo.layers.upload()
        await upload.write(b"%d" % i)
        await upload.finish(digest_bytes(b"%d" % i))
    tree = Tree(registry, tag_ttl=600)
    nodes = [node for _, node in await tree.children(SectionNode(NAME, "layers"))]
    attrs = await tree.read_attrs(nodes)
    assert [a is not None for a in attrs] == [True] * KEPT + [False] * 2 * KEPT
    fresh = Tree(registry, tag_ttl=600)
    assert attrs[:KEPT] == [await fresh.attr(node) for node in nodes[:KEPT]]
    assert len(tree._digests._entries) == KEPT
    assert await tree.read_attrs(nodes[:KEPT]) == attrs[:KEPT]  # kept: read no more

    tree = Tree(registry, tag_ttl=600)
    change = lambda digests: tree.changed(LayerNode(NAME, digests[0]))  # noqa: E731
    changed_after(monkeypatch, LayerService, "stats", change)
    assert await tree.read_attrs(nodes[:KEPT]) == attrs[:KEPT]
    assert len(tree._digests._entries) == 0


async def test_tags_of_one_image_keep_one_digest_and_manifest_node(tmp_path):
    """Memory with 100,000 tags (most of them on a few images): the tags a tree keeps, read
    ahead or looked up one by one, share one digest and one manifest node per image."""
    registry, _ = await tagged_root(tmp_path / "root", 2 * KEPT)
    section = SectionNode(NAME, "tags")
    ahead = Tree(registry, tag_ttl=600)
    await read_ahead(ahead)
    one_by_one = Tree(registry, tag_ttl=600)
    nodes = [TagNode(NAME, name) for name in TAGS[: 2 * KEPT]]
    for node in nodes:
        assert await one_by_one.attr(await one_by_one.lookup(section, node.tag)) is not None
    for tree in (ahead, one_by_one):
        assert len({id(tree._tags.get(node)) for node in nodes}) == 1
        kept = [tree._tag_attrs.get(node) for node in nodes]
        assert len({id(pair[1]) for pair in kept if pair is not None}) == 1
        assert None not in kept


def test_digest_nodes_hashed_once_are_still_keys_by_value():
    """Layer and manifest nodes keep their hash (computed once, at creation): equal nodes
    made apart are one key, a layer and a manifest of one digest two, as dataclasses were."""
    digest = digest_bytes(b"layer")
    table = {LayerNode(NAME, digest): "layer", ManifestNode(NAME, digest): "manifest"}
    assert table[LayerNode(NAME, digest)] == "layer"
    assert table[ManifestNode(NAME, digest)] == "manifest"
    assert LayerNode(NAME, digest) != ManifestNode(NAME, digest)
    assert LayerNode(NAME, digest_bytes(b"other")) not in table
    assert repr(LayerNode(NAME, digest)) == f"LayerNode(repo={NAME!r}, digest={digest!r})"
