"""Inode numbers as SipHash-2-4 of what a node names under the user's key, and what a listing
by name shows where derived numbers clash (regfs/inodes.py)."""

from __future__ import annotations

import os

import pytest

import regfs.inodes
from regfs.inodes import KEY_SIZE, InodeTable
from regfs.nodes import DirNode, Node, TagNode
from regfs.rootfs import ImageNode
from storage.digests import Digest

pytestmark = pytest.mark.storage

KEY = bytes(range(KEY_SIZE))  # SipHash-2-4's reference key


def test_a_number_is_siphash_2_4_of_what_the_node_names() -> None:
    # What a remount (and the next release) gives the same file: these numbers must not move.
    table = InodeTable(KEY)
    assert table.inode(TagNode("org/app", "latest")) == 5913322364240893911
    assert table.inode(DirNode("org")) == 6944377071524842434
    # the reference vector of SipHash-2-4 (empty message), as the table takes 62 bits of it
    assert regfs.inodes._siphash(KEY, b"") == 0x726FDB47DD0E0E31


def test_a_tags_listing_is_numbered_as_its_lookups_number_it() -> None:
    tags: list[Node] = [TagNode("org/app", f"v{i}") for i in range(50)]
    mixed = [*tags[:3], DirNode("org"), *tags[3:6]]
    for nodes in (tags, mixed):
        listed = list(InodeTable(KEY).peek_all(nodes))
        looked_up = InodeTable(KEY)
        assert listed == [looked_up.inode(node) for node in nodes]
        assert len(set(listed)) == len(nodes)


@pytest.fixture
def clashing(monkeypatch: pytest.MonkeyPatch) -> list[Node]:
    """Four tags, the middle two given one derived number (as a 62-bit clash would)."""
    real = regfs.inodes._siphash

    def clash(key: bytes, named: bytes | str) -> int:
        text = named if isinstance(named, str) else named.decode()
        return 12345 if text.endswith(("\0b", "\0c")) else real(key, named)

    monkeypatch.setattr(regfs.inodes, "_siphash", clash)
    return [TagNode("org/app", tag) for tag in "abcd"]


def test_a_listing_shows_clashing_names_as_their_lookups_in_turn_number_them(
    clashing: list[Node],
) -> None:
    listed = list(InodeTable(KEY).peek_all(clashing))
    looked_up = InodeTable(KEY)
    assert listed == [looked_up.inode(node) for node in clashing]
    assert len(set(listed)) == 4
    # a node listed twice (a hard link's names) is one number, the others still apart
    twice = [*clashing[:3], clashing[1], clashing[3]]
    listed = list(InodeTable(KEY).peek_all(twice))
    assert listed[1] == listed[3] and len(set(listed)) == 4


def test_a_listing_of_names_the_kernel_holds_in_part_keeps_their_numbers(
    clashing: list[Node],
) -> None:
    table = InodeTable(KEY)
    held = table.inode(clashing[2])  # c holds the number b derives: b gets the counter's
    listed = list(table.peek_all(clashing))
    assert listed[2] == held and table.peek(clashing[1]) == listed[1] != held
    assert listed == [table.inode(node) for node in clashing]
    assert len(set(listed)) == 4


def test_without_a_key_a_listing_still_agrees_with_its_lookups() -> None:
    nodes: list[Node] = [TagNode("org/app", f"v{i}") for i in range(20)]
    table = InodeTable(None)
    assert list(table.peek_all(nodes)) == [table.inode(node) for node in nodes]
    assert InodeTable(os.urandom(KEY_SIZE)).inode(nodes[0]) != table.inode(nodes[0])


def test_an_images_entries_are_numbered_alike_in_a_listing_and_one_by_one() -> None:
    latest = ImageNode("org/app", ("latest",), Digest("sha256", "ab" * 32))
    pinned = ImageNode("org/app", ("sha256:" + "ab" * 32,), Digest("sha256", "ab" * 32))
    one_image: list[Node] = [latest, *latest.below_all(range(2, 300))]
    two_images: list[Node] = [*one_image[:5], *pinned.below_all(range(1, 5)), one_image[7]]
    for nodes in (one_image, two_images):
        listed = InodeTable(KEY).inode_all(nodes)
        looked_up = InodeTable(KEY)
        assert list(listed) == [looked_up.inode(node) for node in nodes]
        assert len(set(listed)) == len(nodes)  # two ways to one image: two numbers each
    assert InodeTable(KEY).inode(latest) == 6723104322639194674  # kept across releases
