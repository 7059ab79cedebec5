"""`pyfuse3.readdir_reply_names` (regfs's pyfuse3 build, third_party/pyfuse3): a run of a
listing's entries by name, inode number and type in one call, names as str. Two mounts of the
small filesystem below, one handing its entries with one `readdir_reply(lookup=False)` each,
one in runs (every 97th one by one between them, as regfs hands an entry that needs Python),
show `ls -f` and `find` the same names, d_ino and types, across many READDIRPLUS; hostile
arguments raise before anything is written, and a token kept past its readdir reports
nothing. Then what regfs does with it: `ls` of a fresh mount's tags/ shows each tag with the
inode number its lookup gives; the "." that ends a listing filling its last page is decided
as before; the filesystem driver lists a directory of directories by its names alone and
still leaves a symlink out.

    python tests/test_pyfuse3_names_reply.py MOUNTPOINT single|bulk|auto|keeps   (the filesystem)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import stat
import subprocess
import sys
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.mounts import is_mounted, wait_until
from support.roots import build_root

from regfs import fusefeatures
from regfs.directories import _dots, _fills_pages
from storage.digests import Digest, digest_bytes
from storage.drivers.filesystem import FilesystemDriver
from storage.paths import BlobData, RevisionLink, TagCurrentLink, TagIndexLink, path_for

NAME = "library/demo"
ENTRIES = 3000
ONE_BY_ONE = 97
NAMED = pyfuse3.ROOT_INODE + 1
FIRST = 1000  # the inode of entry 0 (entry i: FIRST + i)
needs_names = pytest.mark.skipif(
    not hasattr(pyfuse3, "readdir_reply_names"), reason="a pyfuse3 without readdir_reply_names"
)


def _name(i: int) -> str:
    if i == 5:
        return "L" * 250 + f"{i:05d}"  # 255 bytes
    if i == 6:
        return "é" * 127 + "x"  # 255 bytes, 128 characters
    if i % 10 == 3:
        return f"é-日本-{i}"
    return f"f{i:05d}"


def _kind(i: int) -> int:
    return stat.S_IFDIR if i % 7 == 0 else stat.S_IFREG


class NamesFs(pyfuse3.Operations):
    """named/: ENTRIES entries by name only, files and directories, handed one by one
    ("single"), in runs ("bulk"; "auto": in runs, the kernel asking READDIRPLUS only where
    it wants attributes, and the daemon printing how many of each it got), or through a
    token kept from the first readdir ("keeps", which prints what that late call returned
    or raised)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.enable_readdirplus_auto = mode == "auto"
        self.asked = {True: 0, False: 0}  # readdirs of named/ by token.plus
        self.names = [_name(i) for i in range(ENTRIES)]
        self.inodes = array("q", range(FIRST, FIRST + ENTRIES))
        self.templates = {kind: _entry(0, kind) for kind in (stat.S_IFDIR, stat.S_IFREG)}
        self.kept: pyfuse3.ReaddirToken | None = None

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, NAMED):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return _entry(inode, stat.S_IFDIR)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == b"named":
            return _entry(NAMED, stat.S_IFDIR)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == pyfuse3.ROOT_INODE:
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"named", _entry(NAMED, stat.S_IFDIR), 1)
            return
        if self.mode == "keeps":
            self._keeps(token)
            return
        self.asked[token.plus] += 1
        index = start_id
        while index < ENTRIES:
            kind = _kind(index)
            if self.mode == "single" or index % ONE_BY_ONE == 0:
                entry = _entry(FIRST + index, kind)
                if not pyfuse3.readdir_reply(
                    token, self.names[index].encode(), entry, index + 1, lookup=False
                ):
                    return
                index += 1
                continue
            stop = index + 1  # a run: entries of one type, up to the next one by one
            while stop < ENTRIES and stop % ONE_BY_ONE and _kind(stop) == kind:
                stop += 1
            done = pyfuse3.readdir_reply_names(
                token, self.names, self.inodes, self.templates[kind], 0, index, stop
            )
            if done < stop:
                return
            index = done

    def _keeps(self, token: pyfuse3.ReaddirToken) -> None:
        if self.kept is None:
            self.kept = token
            pyfuse3.readdir_reply(token, b"a", _entry(5, stat.S_IFREG), 1, lookup=False)
            return
        try:
            said = repr(
                pyfuse3.readdir_reply_names(
                    self.kept, ["late"], array("q", [6]), _entry(6, stat.S_IFREG), 100, 0, 1
                )
            )
        except Exception as exc:  # what a caller may rely on: it says so
            said = type(exc).__name__
        print(f"late: {said}", flush=True)


def _entry(inode: int, kind: int) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino, entry.st_mode = inode, kind | 0o755
    return entry


def _serve(mountpoint: str, mode: str) -> None:
    fs = NamesFs(mode)
    pyfuse3.init(fs, mountpoint, ["fsname=namesreply", "ro"])
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
    if mode == "auto":
        print(f"READDIRPLUS {fs.asked[True]} READDIR {fs.asked[False]}", flush=True)


@contextlib.contextmanager
def _mounted(tmp_path: Path, mode: str) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    mountpoint = tmp_path / mode
    mountpoint.mkdir()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    daemon = subprocess.Popen(
        [sys.executable, __file__, str(mountpoint), mode],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: is_mounted(mountpoint) or daemon.poll() is not None, 30, mode)
        assert daemon.poll() is None, f"{mode} did not mount"
        yield mountpoint, daemon
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        if is_mounted(mountpoint):  # it mounted after the unmount above (a slow start)
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        if daemon.stdout is not None:
            daemon.stdout.close()


def _shown(mountpoint: Path) -> dict[str, object]:
    """What `ls -f` shows of named/, and each entry's name, d_ino and d_type (no stat)."""
    named = mountpoint / "named"
    listed = subprocess.run(["ls", "-f", named], check=True, capture_output=True, text=True)
    with os.scandir(named) as entries:
        found = [(e.name, e.inode(), e.is_dir(follow_symlinks=False)) for e in entries]
    return {"ls -f": listed.stdout, "scandir": found}


@needs_names
@pytest.mark.mount
def test_names_in_runs_show_what_one_by_one_shows(tmp_path: Path) -> None:
    with _mounted(tmp_path, "single") as (single, _):
        one_by_one = _shown(single)
    with _mounted(tmp_path, "bulk") as (bulk, _):
        in_runs = _shown(bulk)
    assert in_runs == one_by_one
    want = [(_name(i), FIRST + i, _kind(i) == stat.S_IFDIR) for i in range(ENTRIES)]
    assert in_runs["scandir"] == want  # in order, each once


@pytest.mark.mount
@pytest.mark.skipif(
    not hasattr(pyfuse3.ReaddirToken, "plus"), reason="a pyfuse3 that always asks READDIRPLUS"
)
def test_with_readdirplus_auto_a_plain_listing_goes_by_name(tmp_path: Path) -> None:
    """`enable_readdirplus_auto`: the first chunk of a listing comes in a READDIRPLUS, the
    rest of a plain `ls` in READDIRs (a token whose `plus` is False), whose entries the
    same calls hand by name, inode number and type, as many as fit (each ~5x smaller)."""
    with _mounted(tmp_path, "single") as (single, _):
        one_by_one = _shown(single)
    with _mounted(tmp_path, "auto") as (auto, daemon):
        in_runs = _shown(auto)
        subprocess.run(["fusermount3", "-u", "-z", auto], check=False)
        out = daemon.communicate(timeout=10)[0]
    assert in_runs == one_by_one
    asked = dict(zip(out.split()[::2], map(int, out.split()[1::2]), strict=True))
    assert asked["READDIRPLUS"] >= 1 and asked["READDIR"] >= 2, out


@needs_names
@pytest.mark.mount
def test_a_token_kept_past_its_readdir_reports_nothing(tmp_path: Path) -> None:
    with _mounted(tmp_path, "keeps") as (mountpoint, daemon):
        assert os.listdir(mountpoint / "named") == ["a"]
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False)
        out = daemon.communicate(timeout=10)[0]
    assert out.splitlines() == ["late: 0"] or out.startswith("late: RuntimeError"), out


@needs_names
@pytest.mark.storage
@pytest.mark.parametrize(
    ("names", "inodes", "start", "stop", "error"),
    [
        (["a", "b"], [1], 0, 2, "2 names but 1 inodes"),
        (["a"], [1], 0, 2, "entries 0 to 2 of 1"),
        (["a"], [1], 1, 0, "entries 1 to 0 of 1"),
        (["a"], [1], -1, 1, "entries -1 to 1 of 1"),
        (["a", 5], [1, 2], 0, 2, "name 1 is not bytes or str"),
        (["a", ""], [1, 2], 0, 2, "name 1 is 0 bytes long"),
        (["x" * 256], [1], 0, 1, "name 0 is 256 bytes long"),
        (["é" * 128], [1], 0, 1, "name 0 is 256 bytes long"),  # 128 characters
        (["a\0b"], [1], 0, 1, "NUL"),
        (["../etc"], [1], 0, 1, '"/"'),
        ([b"ok", "\udcff"], [1, 2], 0, 2, "surrogates not allowed"),
    ],
)
def test_hostile_names_raise_before_anything_is_written(
    names: list[str], inodes: list[int], start: int, stop: int, error: str
) -> None:
    token = pyfuse3.ReaddirToken()  # no request, no buffer: nothing may be written to it
    with pytest.raises((ValueError, TypeError), match=error):
        pyfuse3.readdir_reply_names(
            token, names, array("q", inodes), pyfuse3.EntryAttributes(), 0, start, stop
        )


@needs_names
@pytest.mark.storage
def test_names_checked_pass_on_to_the_token() -> None:
    """Valid names get as far as the token, whose readdir is over (RuntimeError)."""
    with pytest.raises(RuntimeError, match="has returned"):
        pyfuse3.readdir_reply_names(
            pyfuse3.ReaddirToken(), ["a", b"b", "é" * 127 + "x"], array("q", [1, 2, 3]),
            pyfuse3.EntryAttributes(), 0, 0, 3,
        )  # fmt: skip


@needs_names
@pytest.mark.storage
def test_the_feature_is_detected() -> None:
    assert fusefeatures.READDIRPLUS_AUTO


@pytest.mark.mount
def test_ls_of_tags_shows_each_with_the_inode_its_lookup_gives(
    tmp_path: Path, mount: Callable
) -> None:
    """A fresh mount hands 1,000 tags by name (their numbers derived, nothing kept): `ls -i`
    shows each with the number stat then gets by looking it up, and every tag once."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    digest = Digest.parse(image["digest"])
    names = [f"t{i:04d}" for i in range(1000)]
    for name in names:
        for location in (
            TagCurrentLink(NAME, name),
            TagIndexLink(NAME, name, digest),
        ):
            path = root / path_for(location).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(digest))
    tags = mount(root).path(NAME, "tags")
    listed = subprocess.run(["ls", "-i1", tags], check=True, capture_output=True, text=True)
    shown = dict(line.split()[::-1] for line in listed.stdout.splitlines())
    assert sorted(shown) == sorted([*names, "latest"])
    script = 'cd "$1" && stat -c "%n %i" *'
    stats = subprocess.run(
        ["bash", "-c", script, "-", tags], check=True, capture_output=True, text=True
    )
    looked_up = dict(line.split() for line in stats.stdout.splitlines())
    assert looked_up == shown


@pytest.mark.mount
def test_ls_of_manifests_leaves_out_one_the_registry_deleted(
    tmp_path: Path, mount: Callable
) -> None:
    """300 manifests (their attributes read ahead of the READDIRs, in chunks), one of which
    the registry deleted (its revision's link gone, its directory left): `ls` of a fresh
    mount lists the other 299, whichever request hands them (with
    `enable_readdirplus_auto`, all but the first chunk come in READDIRs, by name)."""
    root = tmp_path / "root"
    digests = []
    for i in range(300):
        data = json.dumps({"schemaVersion": 2, "n": i}).encode()
        digest = digest_bytes(data)
        for location, text in (
            (BlobData(digest), data),
            (RevisionLink(NAME, digest), str(digest).encode()),
        ):
            path = root / path_for(location).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text)
        digests.append(str(digest))
    gone = sorted(digests)[200]
    (root / path_for(RevisionLink(NAME, Digest.parse(gone))).lstrip("/")).unlink()
    manifests = mount(root).path(NAME, "manifests")
    listed = subprocess.run(["ls", manifests], check=True, capture_output=True, text=True)
    assert listed.stdout.split() == sorted(set(digests) - {gone})


@pytest.mark.storage
def test_a_listing_ends_on_a_page_as_the_kernel_fills_them() -> None:
    """`_fills_pages` (one size of dirent: counted, not walked) against the kernel's rule:
    dirents of 24 bytes and the name, 8-aligned, none across a page."""

    def walked(lengths: list[int]) -> bool:
        used = 0
        for length in lengths:
            size = (24 + length + 7) // 8 * 8
            used = size if used + size > 4096 else used + size
        return used == 4096

    rng = random.Random(18)
    cases = [[6] * n for n in range(1, 2100)] + [[9] * n for n in (127, 128, 255, 256, 1024)]
    cases += [[rng.choice((1, 6, 7, 8, 9, 17, 255)) for _ in range(rng.randrange(1, 900))]
              for _ in range(300)]  # fmt: skip
    for lengths in cases:
        assert _fills_pages(lengths) == walked(lengths), lengths
    assert _fills_pages([6] * 1024) and _fills_pages([6] * 2048) and not _fills_pages([])


@pytest.mark.storage
def test_a_listing_begins_with_both_dots_unless_its_copy_would_then_fill_a_page() -> None:
    """`_dots`: "." and ".." first where the kernel's copy then ends short of a page's end,
    else "." alone first, else none first and "." last where the names alone fill it: the
    copy as handed never ends on a page's end, and each dot is handed once at most."""
    rng = random.Random(27)
    cases = [[6] * n for n in range(0, 1100)] + [[1] * 126, [2] * 125, [17] * 100]
    cases += [[rng.choice((1, 2, 6, 9, 17, 40)) for _ in range(rng.randrange(100, 300))]
              for _ in range(4000)]  # fmt: skip
    fronts = set()
    for lengths in cases:
        front, dot = _dots([("x" * n, None) for n in lengths])  # type: ignore[misc]
        handed = [1, 2][:front] + lengths + ([1] if dot else [])
        assert not handed or not _fills_pages(handed), (lengths, front, dot)
        assert not (dot and front), lengths
        if not _fills_pages([1, 2, *lengths]):
            assert front == 2, lengths
        fronts.add(front)
    assert fronts == {0, 1, 2}  # each way met (none first: ~1 in 1,000 of these)


@pytest.mark.storage
def test_the_driver_lists_directories_by_name_and_leaves_a_symlink_out(tmp_path: Path) -> None:
    base = tmp_path / "root" / "d"
    for name in ("b", "a", "c"):
        (base / name).mkdir(parents=True)
    driver = FilesystemDriver(str(tmp_path / "root"))
    assert trio.run(driver.list, "/d") == ["a", "b", "c"]
    (base / "z").symlink_to(base / "a")  # a link to a directory: three directories, four names
    assert trio.run(driver.list, "/d") == ["a", "b", "c"]
    (base / "z").unlink()
    (base / "f").write_text("x")
    assert trio.run(driver.list, "/d") == ["a", "b", "c", "f"]


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
