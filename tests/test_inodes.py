"""Inode numbers that survive a remount: a keyed hash of what a node names, the user's key
kept in their state directory (regfs/inodes.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from regfs.inodes import KEY_FILE, KEY_SIZE, InodeTable, inode_key
from regfs.nodes import DirNode, LayerNode, SectionNode, TagNode, UploadNode
from storage.digests import Digest

pytestmark = pytest.mark.storage

NODES = [
    DirNode("library"),
    SectionNode("library/demo", "tags"),
    TagNode("library/demo", "latest"),
    LayerNode("library/demo", Digest("sha256", "ab" * 32)),
    UploadNode("library/demo", "0" * 8 + "-0000-0000-0000-" + "0" * 12),
]


def test_the_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    key = inode_key(tmp_path)
    assert len(key) == KEY_SIZE
    assert inode_key(tmp_path) == key
    kept = tmp_path / "regfs" / KEY_FILE
    assert kept.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "regfs").stat().st_mode & 0o777 == 0o700


def test_a_short_key_file_is_made_again_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    (tmp_path / "regfs").mkdir(mode=0o700)
    kept = tmp_path / "regfs" / KEY_FILE
    kept.write_bytes(b"cut")  # a write of before this one's cut short
    key = inode_key(tmp_path)
    assert len(key) == KEY_SIZE and kept.read_bytes() == key
    assert inode_key(tmp_path) == key
    assert os.listdir(tmp_path / "regfs") == [KEY_FILE]  # no temporary file stays


def test_a_planted_state_directory_gives_a_key_for_this_mount_alone(tmp_path: Path, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    (shared / "regfs").symlink_to(tmp_path / "elsewhere")
    with caplog.at_level(logging.WARNING, logger="regfs.inodes"):
        assert inode_key(shared) is None  # numbers from hash(): this mount's alone
    assert not (tmp_path / "elsewhere").exists()
    assert "they last this mount only" in caplog.text


def test_numbers_depend_on_the_key_and_the_node_alone() -> None:
    key = os.urandom(KEY_SIZE)
    one, two, other = InodeTable(key), InodeTable(key), InodeTable(os.urandom(KEY_SIZE))
    numbers = [one.inode(node) for node in NODES]
    assert [two.inode(node) for node in reversed(NODES)][::-1] == numbers
    assert list(two.inode_all(list(NODES))) == numbers  # a listing numbers them alike
    assert len(set(numbers)) == len(NODES)
    assert [other.inode(node) for node in NODES] != numbers


def test_exchange_swaps_the_numbers_of_two_nodes() -> None:
    table = InodeTable(os.urandom(KEY_SIZE))
    a, b = TagNode("org/app", "a"), TagNode("org/app", "b")
    ino_a, ino_b = table.inode(a), table.inode(b)
    table.exchange(a, b)
    assert (table.inode(a), table.inode(b)) == (ino_b, ino_a)
    assert (table.node(ino_a), table.node(ino_b)) == (b, a)
