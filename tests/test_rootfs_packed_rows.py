"""An image's attributes are packed in a worker thread (`rootfs._packed_rows`), whose every
whole-column call in C holds the GIL: for a 1M-entry image ~15 such calls kept the trio
loop waiting 80-320 ms at a time, and the temporary columns peaked at twice the 88 MB
result. Packed PACK_RUN entries at a time: the same rows, a peak near the result's size."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from regfs import rootfs
from regfs.attributes import packed
from storage.rootfs.members import Kind, Member
from storage.rootfs.merge import merge

pytestmark = pytest.mark.storage

TESTS = Path(__file__).resolve().parent


def test_rows_packed_in_runs_are_the_whole_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    members = [Member("", Kind.DIR, 0o755, 0, 0, 1)]
    for d in range(5):
        members.append(Member(f"d{d}", Kind.DIR, 0o750, d, d, 2 + d))
        for f in range(9):
            members.append(Member(f"d{d}/f{f}", Kind.FILE, 0o644, 1, 2, 3 + f, size=f * 1000))
        members.append(Member(f"d{d}/s", Kind.SYMLINK, 0o777, 0, 0, 5, linkname="f1" * d))
        members.append(Member(f"d{d}/c", Kind.CHAR, 0o600, 0, 0, 6, devmajor=d, devminor=7))
        members.append(Member(f"d{d}/h", Kind.HARDLINK, 0, 0, 0, 0, linkname=f"d{d}/f2"))
    tree = merge([members])
    whole = packed(rootfs._columns(*tree.entry_columns()))
    monkeypatch.setattr(rootfs, "PACK_RUN", 7)  # runs that end inside directories
    assert rootfs._packed_rows(tree) == whole
    assert len(whole) > 7 * 8 * rootfs.PACKED


PEAK = textwrap.dedent(
    """
    import gc
    from regfs import rootfs
    from storage.rootfs.members import Kind, Member
    from storage.rootfs.merge import merge

    def rss(key):
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith(key))

    members = []
    for d in range(1000):
        members.append(Member(f"d{d:03}", Kind.DIR, 0o755, 0, 0, 0))
        for f in range(999):
            members.append(Member(f"d{d:03}/f{f:03}", Kind.FILE, 0o644, 0, 0, 0, size=1))
    tree = merge([members])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM: the peak below is the packing's own
    base = rss("VmRSS")
    rows = rootfs._packed_rows(tree)
    print(len(rows) * rows.itemsize, rss("VmHWM") - base)
    """
)


def test_a_million_entries_pack_within_a_fifth_more_than_their_rows() -> None:
    """Measured: 95 MB for 88 MB of rows (182 MB with whole columns)."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK],
        capture_output=True,
        text=True,
        check=True,
        cwd=TESTS.parent,
    ).stdout
    result, peak = (int(x) for x in out.split())
    assert result == 1_000_000 * rootfs.PACKED * 8
    assert peak <= result * 1.2, f"peak {peak / 1e6:.0f} MB for {result / 1e6:.0f} MB of rows"
