"""A kept tree numbered breadth first with a few hard links (`treefile._breadth_first`) took
each further name out of a copy of every entry's directory one `del` at a time: each moved
all the entries after it, so a file of millions of entries with its links near the front
cost ~0.8 ms a link at 3M entries. Now the runs between them are copied once: links at the
front cost what links at the end cost."""

from __future__ import annotations

import statistics
import time
from array import array

import pytest

from storage.rootfs.treefile import _FEW_LINKS, _any_order, _breadth_first

pytestmark = pytest.mark.storage

FILES = 3_000_000


def tree(front: bool) -> tuple[array[int], list[int], list[int]]:
    """A root of FILES files (inodes 2...), and _FEW_LINKS further names of inode 2, right
    after its first name or after every other entry."""
    firsts, links = list(range(2, FILES + 2)), [2] * _FEW_LINKS
    child = array("I", firsts[:1] + links + firsts[1:] if front else firsts + links)
    return child, [1] * len(child), [1] + [0] * FILES


def cpu_seconds(trees: dict[bool, tuple[array[int], list[int], list[int]]], front: bool) -> float:
    child, owners, is_dir = trees[front]
    started = time.thread_time()
    found = _breadth_first(child, owners, is_dir)
    took = time.thread_time() - started
    assert found is not None and found.nlink[1] == 1 + _FEW_LINKS
    return took


def test_hard_links_near_the_front_cost_what_links_at_the_end_cost() -> None:
    trees = {front: tree(front) for front in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(5):  # alternately, the first of each left out (allocations grow)
        for front in (True, False):
            times[front].append(cpu_seconds(trees, front))
    front, end = (statistics.median(times[f][1:]) for f in (True, False))
    # measured (CPU, medians, load 6.8): 203-221 and 213-229 ms; before, 365-461 and 192-195
    assert front < 1.3 * end + 0.01, f"front {front * 1e3:.0f} ms, end {end * 1e3:.0f} ms"


def test_links_anywhere_give_what_any_order_gives() -> None:
    child = array("I", [2, 2, 3, 4, 2, 5, 3, 6])
    owners, is_dir = [1] * len(child), [1, 0, 0, 0, 0, 0]
    assert _breadth_first(child, owners, is_dir) == _any_order(child, owners, is_dir)
