"""The read-ahead of a listing's attributes (regfs/statahead.py) goes as far as its reader
asks and a window beyond, no further: an `ls | head` states what it reads, not the whole
listing, and a listing let go stops being read."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.statworkers import put_layers

from regfs import statahead
from regfs.nodes import LayerNode
from regfs.tree import Tree
from storage.drivers import FilesystemDriver
from storage.registry import Registry

pytestmark = pytest.mark.storage

COUNT = 3000  # some windows (AHEAD) long


@pytest.fixture
async def listing(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A tree over a local root of COUNT layers, and their nodes in listing order."""
    root = tmp_path / "root"
    nodes = [LayerNode("a/b", digest) for digest in put_layers(root, "a/b", COUNT)]
    driver = FilesystemDriver(root)
    try:
        yield Tree(Registry(driver), tag_ttl=3600), nodes
    finally:
        driver._stat_worker.close()


async def test_a_reader_that_stops_leaves_the_rest_unread(listing) -> None:  # type: ignore[no-untyped-def]
    tree, nodes = listing
    ahead = statahead.StatAhead(tree, nodes)
    assert await ahead.ready(0) > 0  # the first READDIR
    await trio.sleep(0.5)  # and no other: `ls | head` was done
    assert ahead.read <= statahead.AHEAD
    assert tree.held_attr(nodes[statahead.AHEAD]) is None
    assert tree.held_attr(nodes[statahead.AHEAD - 1]) is not None


async def test_the_window_moves_with_the_reader_to_the_end(listing) -> None:  # type: ignore[no-untyped-def]
    tree, nodes = listing
    ahead = statahead.StatAhead(tree, nodes)
    index = 0
    while index < COUNT:  # READDIRPLUSes of ~145 digests, as `ls -l` asks them
        read = await ahead.ready(index)
        assert read > index
        index = min(read, index + 145)
    assert all(tree.held_attr(node) is not None for node in nodes[-1000:])


async def test_a_listing_let_go_is_read_no_further(listing) -> None:  # type: ignore[no-untyped-def]
    tree, nodes = listing
    ahead = statahead.StatAhead(tree, nodes)
    assert await ahead.ready(0) > 0
    ahead.stop()  # its snapshot was let go: no READDIR comes for the rest
    with trio.fail_after(5):  # one that still asks is answered at once, with what is read
        assert await ahead.ready(COUNT - 1) <= statahead.AHEAD
    await trio.sleep(0.3)
    assert tree.held_attr(nodes[statahead.AHEAD + statahead.CHUNK]) is None
