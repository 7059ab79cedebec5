"""What a listing's source is read into, made in bulk (issue 18: the first READDIR of a cold
`ls -l` of 10,000 layers or manifests spends ~60 ms of Python beside its ~110 ms of
syscalls, a read ahead of 10,000 tags ~40 ms beside ~80): the bulk ways say exactly what
the one-at-a-time ways say."""

from __future__ import annotations

import copy
import pickle
import weakref
from pathlib import Path

import pytest
import trio
from support.oci import empty_image, image_manifest

import regfs.tree
from regfs.nodes import DigestNode, LayerNode, ManifestNode, Node, SectionNode, TagNode
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.tree import Tree
from storage.cache import TtlCache
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.paths import LayerLink, TagCurrentLink, path_for
from storage.registry import Registry

pytestmark = pytest.mark.storage

NAME = "org/app"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_put_many_keeps_what_a_put_each_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same entries, order (the oldest dropped first past the bound: one held moves to
    the end) and expiry as `put` of each; keys and values of one length."""
    clock = Clock()
    monkeypatch.setattr("storage.cache.time.monotonic", clock)
    one, bulk = TtlCache[str, int](5.0, max_size=6), TtlCache[str, int](5.0, max_size=6)
    for key, value in (("a", 1), ("b", 2), ("c", 3)):
        one.put(key, value)
    bulk.put_many(["a", "b", "c"], [1, 2, 3])
    clock.now += 3
    for key, value in (("d", 4), ("a", 5), ("e", 6), ("f", 7), ("g", 8)):
        one.put(key, value)  # "b" goes past the bound
    bulk.put_many(["d", "a", "e", "f", "g"], iter([4, 5, 6, 7, 8]))
    assert list(bulk.keys()) == list(one.keys()) == ["c", "d", "a", "e", "f", "g"]
    keys = ["a", "b", "c", "g"]
    assert [bulk.get(k) for k in keys] == [one.get(k) for k in keys] == [5, None, 3, 8]
    clock.now += 3  # "c" expired, the rest not
    assert [bulk.get(k) for k in keys] == [one.get(k) for k in keys] == [5, None, None, 8]
    with pytest.raises(ValueError):
        bulk.put_many(["y", "z"], [1])


async def test_tags_read_ahead_get_each_its_own_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tags on two images, alternating, read ahead in batches of 3 (each batch its own
    digest objects): each tag keeps its own manifest's digest and size, as a lookup reads
    them; one whose manifest is gone is left to its lookup."""
    monkeypatch.setattr(regfs.tree, "TAGS_READ_BATCH", 3)
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    repo = registry.repository(NAME)
    upload = await repo.layers.upload()
    await upload.write(b"layer")
    await upload.finish(digest_bytes(b"layer"))
    images = [await empty_image(repo), await repo.manifests.put(image_manifest(b"{}", [b"layer"]))]
    tags = [f"t{i:02d}" for i in range(11)]
    for at, tag in enumerate(tags):
        await repo.tags.put(tag, images[at % 2])
    # A tag whose manifest is not there (Tags.put refuses to make one: written directly).
    gone = path_for(TagCurrentLink(NAME, "gone"))
    await registry.driver.put_content(gone, str(digest_bytes(b"no such manifest")).encode())
    tree, fresh = Tree(registry, tag_ttl=600), Tree(registry, tag_ttl=600)
    section = SectionNode(NAME, "tags")
    await tree.children(section)
    await tree.lookup(section, tags[0])  # starts the read-ahead
    with trio.fail_after(10):
        while NAME in tree._tags_reading:
            await trio.sleep(0.01)
    for at, tag in enumerate(tags):
        node = TagNode(NAME, tag)
        assert tree._tags.get(node) == images[at % 2]
        assert tree.cached_attr(node) == await fresh.attr(await fresh.lookup(section, tag))
    assert tree.cached_attr(TagNode(NAME, "gone")) is None
    two = [tree.cached_attr(TagNode(NAME, tag)) for tag in tags[:2]]
    assert len({attr.size for attr in two if attr is not None}) == 2  # the images differ


@pytest.mark.parametrize("kind", [LayerNode, ManifestNode])
def test_digest_nodes_made_in_bulk_are_those_made_one_by_one(kind: type[DigestNode]) -> None:
    """`listing` makes (name, node) pairs equal to, hashed as, of the type of, and as weakly
    referable as (the tree shares one manifest node among a repository's tags) nodes made
    one at a time; never equal to the other kind's, nor to a tag's."""
    digests = [digest_bytes(b"%d" % i) for i in range(3)]
    listed = kind.listing(NAME, digests)
    assert listed == [(str(d), kind(NAME, d)) for d in digests]
    for (_, node), digest in zip(listed, digests, strict=True):
        assert type(node) is kind and hash(node) == hash(kind(NAME, digest))
        assert (node.repo, node.digest) == (NAME, digest)
        assert weakref.ref(node)() is node
        assert copy.copy(node) == node == pickle.loads(pickle.dumps(node))
        other = ManifestNode if kind is LayerNode else LayerNode
        held: set[Node] = {node}
        assert node != other(NAME, digest) and other(NAME, digest) not in held
        assert TagNode(NAME, str(digest)) not in held and kind(NAME, digest) in held
        assert not hasattr(node, "__dict__")  # slots: 108 bytes a node, not 140 (tracemalloc)
    assert kind.listing(NAME, []) == []


async def test_a_digest_listing_shows_what_is_there(tmp_path: Path) -> None:
    """layers/ as readdir lists it: every digest stated in bulk (the listing itself, not a
    copy), then without one whose link the registry's DELETE removed (its directory stays)."""
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    repo = registry.repository(NAME)
    digests = []
    for i in range(3):
        upload = await repo.layers.upload()
        await upload.write(b"%d" % i)
        await upload.finish(digest := digest_bytes(b"%d" % i))
        digests.append(digest)
    options = MountOptions(str(tmp_path / "root"), "/mnt", tag_ttl=600)
    ops = Operations(Tree(registry, options.tag_ttl), options)
    section = SectionNode(NAME, "layers")
    listed = await ops.directories._present(section)
    assert listed is await ops.tree.children(section)
    assert listed == LayerNode.listing(NAME, sorted(digests))
    (tmp_path / "root" / path_for(LayerLink(NAME, digests[1])).lstrip("/")).unlink()
    ops = Operations(Tree(registry, options.tag_ttl), options)
    expected = LayerNode.listing(NAME, sorted(d for d in digests if d != digests[1]))
    assert await ops.directories._present(section) == expected
