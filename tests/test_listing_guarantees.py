"""What issue 18 promises of listings that no other test held the daemon to: memory stays
bounded with 100,000 tags in a repository because the tree keeps the targets and attributes
of the TAGS_KEPT most recent tags only (regfs/tree.py). Checked in process on a `Tree` with
the bound made small: what is kept is answered without storage, what is not is read again.
"""

from __future__ import annotations

import pytest
from support.oci import empty_image, image_manifest

import regfs.tree
from regfs.nodes import SectionNode, TagNode
from regfs.tree import Tree
from storage.drivers import InMemoryDriver
from storage.registry import Registry

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
