"""Findings of a review of the "." and ".." every listing begins with (regfs/directories.py,
`_dots`), through a real mount: which listings show which dots, and that two readers of one
listing still each read it whole where the dots move."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount
from support.roots import build_root, write_tags
from support.tools import run

from regfs.directories import _dots, _fills_pages

pytestmark = pytest.mark.mount

NAME = "library/demo"


def page_gap_names() -> list[str]:
    """Tag names (beside `latest`) whose listing's kernel copy (`_fills_pages`: dirents of
    24 bytes and the name, 8-aligned, none across a page) ends on a page's end with "." and
    ".." first and with "." alone first, but not with no dot, nor with one "." last: `latest`
    and 125 five-letter names (32 bytes each) fill the first page to 4,032 bytes, so one of
    48 bytes (a 20-letter name) goes on the next page after one dot or two, on the first
    after none; the next page's 48 + 2 x 40 + 124 x 32 bytes are 4,096."""
    lengths = [5] * 125 + [20] + [12] * 2 + [5] * 124
    return [f"t{i:04d}" + "x" * (length - 5) for i, length in enumerate(lengths)]


def test_a_listing_that_fits_no_dot_first_still_shows_one(tmp_path: Path, mount: Callable) -> None:
    """ext4 lists "." in every directory, and `ls -a` of one prints it. Where "." and ".."
    first, and "." alone first, would each end the kernel's copy on a page's end, `_dots`
    put a "." last only if the entries alone fill it; here they do not, so the listing had
    neither "." nor "..", though a "." last fits (its copy then ends 32 bytes short of a
    page's end). Two readers of it at once still read it whole."""
    names = page_gap_names()
    entries = [(name, None) for name in ["latest", *names]]
    lengths = [len(name) for name, _ in entries]
    assert _fills_pages([1, 2, *lengths]) and _fills_pages([1, *lengths])
    assert not _fills_pages(lengths) and not _fills_pages([*lengths, 1])
    assert _dots(entries)[0] == 0
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], names)
    m: Mount = mount(root)
    tags = m.path(NAME, "tags")
    want = sorted(["latest", *names])
    with os.scandir(tags) as a, os.scandir(tags) as b:
        first_a = [next(a).name for _ in range(5)]  # one getdents each: its first chunk
        first_b = [next(b).name for _ in range(5)]
        seen_a = first_a + [entry.name for entry in a]
        seen_b = first_b + [entry.name for entry in b]
    assert sorted(seen_a) == sorted(seen_b) == want
    listed = run("ls", "-1af", tags).stdout.decode().splitlines()
    assert sorted(listed) == sorted([".", *want]), [n for n in listed if n.startswith(".")]
