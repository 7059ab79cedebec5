"""Review of `linked_stats` (storage/drivers/filesystem.py): a listing's links read by one
pread each, no fstat. What a hostile storage root can put where a link belongs (device
nodes, here ones without side effects: null, zero, full, random) is opened, read for at most
a digest's length + 1 bytes and only compared: never a blob stated for it, nothing hangs,
and the one-at-a-time path finds it absent too (so a listing shows the same).

The one-pass checks of a listing's names (`_relative` for a bulk call's link and blob
names, `valid_tags` for a registry's tags/list) judge every batch as one regex per name
would (hypothesis)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.drivers.base import _PATH_RE, PathNotFound
from storage.drivers.filesystem import FilesystemDriver
from storage.drivers.inmemory import InMemoryDriver
from storage.errors import InvalidPath
from storage.names import TAG_RE, valid_tags

pytestmark = pytest.mark.storage

TARGET = b"sha256:" + b"0" * 64
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "urandom": (1, 9)}


async def test_device_nodes_where_links_belong_state_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    (root / "l").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "b" / "data").write_bytes(b"blob")
    (root / "l" / "plain").write_bytes(TARGET)
    for name, (major, minor) in DEVICES.items():
        os.mknod(root / "l" / name, stat.S_IFCHR | 0o644, os.makedev(major, minor))
    drv = FilesystemDriver(root)
    names = ["plain", *DEVICES]
    with trio.fail_after(5):
        stated = await drv.linked_stats("/l", names, [TARGET] * len(names), "/b", ["data"] * 5)
    assert stated[0] == (4, os.stat(root / "b" / "data").st_mtime_ns)
    assert stated[1:] == [None] * len(DEVICES)
    for name in DEVICES:  # asked alone, as a listing then does: absent, and logged
        with pytest.raises(PathNotFound):
            await drv.get_content(f"/l/{name}")
        assert f"'/l/{name}' is a character device, not a regular file" in caplog.text


# Names a bulk call's one-pass check (`_relative`) must judge as one regex each would:
# components of the storage alphabet, with the separators, dots and bytes around its edges.
NAME_PARTS = ["a", "Z9", ".", "..", "...", "-", "_", "/", "", "\0", "\n", "é", "\udcff", " "]
names = st.lists(st.lists(st.sampled_from(NAME_PARTS), max_size=4).map("".join), max_size=5)


@settings(max_examples=400, deadline=None)
@given(names)
def test_bulk_name_checks_judge_as_one_regex_per_name(batch: list[str]) -> None:
    """`contents` and `linked_stats` check a listing's names in one pass over them joined:
    a batch is refused exactly when one of its names is no relative storage path (the
    culprit named), whatever the names around it."""
    drv = InMemoryDriver()
    bad = [n for n in batch if _PATH_RE.fullmatch("/" + n) is None]

    async def check() -> None:
        try:
            await drv.contents("/c", batch)
        except InvalidPath as exc:
            assert bad and exc.path == bad[0]
        else:
            assert not bad
        try:
            await drv.linked_stats("/c", batch, [b""] * len(batch), "/c", ["x"] * len(batch))
        except InvalidPath as exc:
            assert bad and exc.path == bad[0]
        else:
            assert not bad

    trio.run(check)


TAG_PARTS = ["a", "Z", "0", "_", ".", "-", "\n", "\r", " ", "é", "/", ":", "a" * 60]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(st.sampled_from(TAG_PARTS), max_size=4).map("".join), max_size=5))
def test_a_tags_lists_one_pass_check_keeps_what_one_regex_per_name_keeps(batch: list[str]) -> None:
    """`valid_tags` (a hostile tags/list's names, checked in one pass) keeps exactly the
    names TAG_RE accepts one by one, in order: no newline or other byte makes two tags of
    one, or lets a bad name through beside good ones."""
    assert valid_tags(batch) == [n for n in batch if TAG_RE.fullmatch(n)]
