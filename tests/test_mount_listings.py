"""Listings and what the kernel may keep of them (issue 18), through a real mount.

A listing of tags reads no tag's link: a tag whose attributes the daemon holds is handed to
the kernel with them and an entry timeout of 0.1 s, any other with a placeholder the kernel
never uses (timeouts of 0); on a local root the daemon reads the tags ahead at the first
lookup of one after the listing (what `ls -l` sends; a plain `ls` sends none), in bulk, for
the lookups it sends next (a readdir chunk sent meanwhile waits for what it hands). A lookup
of a tag gets an entry timeout of 0.1 s too and attribute timeout `--tag-ttl`. Digests
(layers/, manifests/) get entry timeouts of 0.1 s. So `ls tags/` costs no storage read per
tag, and `ls -l` of tags, layers or manifests within the TTL no round trip per entry. What
must stay true: a tag changed through the mount is seen at once (also tags deleted with
their manifest), one changed beside it within the TTL and at SIGHUP, a digest deleted beside
it at SIGHUP too; and nothing the kernel keeps ever needs the daemon to invalidate it, so a
daemon killed mid-listing, mid-push or mid-rm always frees its clients and its mount
(docs/concurrency.md).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.clients import CALL, calls_after, kill_mid, listing_loop
from support.images import directory, file, symlink
from support.mounts import Mount, hang_up, kernel_inodes, wait_until
from support.roots import build_root, link_blobs, put_layer_image, put_tagged, write_tags
from support.tools import errno_closing, ls, run

from regfs import fusefeatures
from regfs.tree import LISTED_ENTRY_TIMEOUT, LISTED_LATE
from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver
from storage.paths import BlobData, LayerLink, TagCurrentLink, path_for
from storage.registry import Registry

pytestmark = pytest.mark.mount

NAME = "library/demo"


def padded(manifest: bytes, pad: int) -> bytes:
    """The same image with an annotation: another manifest, of another size."""
    body = json.loads(manifest)
    body["annotations"] = {"org.example.pad": "x" * pad}
    return json.dumps(body).encode()


def the_way(m: Mount, path: Path) -> list[str]:
    """The inode numbers of the directories from the mount's root down to `path`."""
    way = [path, *path.relative_to(m.mountpoint).parents]
    return [str(os.stat(m.mountpoint / p).st_ino) for p in way]


def assert_getattrs_only_on_the_way(m: Mount, start: int, way: list[str], seconds: float) -> None:
    """Every GETATTR logged after byte `start` is of a directory on `way` (`the_way`, taken
    before the pass), none of an entry listed. A tool stats each entry by its full path and,
    with default_permissions, the kernel refreshes each directory on it whose 0.1 s
    attributes expired (and the listed one's after each READDIR, for its atime): so a pass of
    `seconds` on a slow machine sends one per directory per 0.1 s (seen under load: root,
    library, demo and tags after the READDIR, 4), never one per entry."""
    getattrs = [first for name, first in CALL.findall(m.log_text()[start:]) if name == "getattr"]
    assert set(getattrs) <= set(way), (getattrs, way)
    rounds = 1 + int(seconds / LISTED_ENTRY_TIMEOUT)
    assert len(getattrs) <= len(way) * rounds + 1, (getattrs, seconds)


def test_a_tag_changed_through_the_mount_is_seen_at_once(tmp_path: Path, mount: Callable) -> None:
    """Whatever the kernel keeps of a tag, a stat right after a change through the mount
    shows the change: a rewrite (also half way, while open), a `cp` over it, a deletion
    with its manifest. The TTL is long, so only the kernel's own updates could explain it."""
    image = trio.run(build_root, tmp_path / "root", NAME, 1000)
    first, second = image["manifest"], padded(image["manifest"], 500)
    m: Mount = mount(tmp_path / "root", "--tag-ttl", "60")
    tags = m.path(NAME, "tags")
    latest = tags / "latest"
    run("ls", "-l", tags)  # the kernel now holds the entry and its attributes
    assert os.stat(latest).st_size == len(first)

    fd = os.open(latest, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, second[:100])
        assert os.fstat(fd).st_size == 100
        assert os.stat(latest).st_size == 100  # a lookup while written: the pending size
        os.write(fd, second[100:])
    finally:
        os.close(fd)
    assert os.stat(latest).st_size == len(second)
    assert latest.read_bytes() == second

    (tmp_path / "first.json").write_bytes(first)
    run("cp", tmp_path / "first.json", latest)
    assert os.stat(latest).st_size == len(first)
    assert latest.read_bytes() == first
    run("cp", latest, tags / "other")
    assert sorted(ls(tags)) == ["latest", "other"]

    run("rm", m.path(NAME, "manifests", str(digest_bytes(first))))  # takes both tags along
    assert errno_closing(lambda: os.stat(latest)) == errno.ENOENT
    assert errno_closing(lambda: os.stat(tags / "other")) == errno.ENOENT
    assert ls(tags) == []


def test_a_listing_while_a_tag_is_appended_to_keeps_its_size(
    tmp_path: Path, mount: Callable
) -> None:
    """A listing hands a tag with a writer its real (pending) size, never the placeholder's
    0: the kernel takes a listed entry's size for its inode's, and an O_APPEND write lands
    at that size. So an append with listings in between adds to the end."""
    image = trio.run(build_root, tmp_path / "root", NAME, 1000)
    m: Mount = mount(tmp_path / "root")
    tags = m.path(NAME, "tags")
    fd = os.open(tags / "latest", os.O_WRONLY | os.O_APPEND)
    try:
        for piece in (b"\n", b" \n"):
            assert ls(tags) == ["latest"]  # readdirplus while the writer is open
            os.write(fd, piece)
    finally:
        os.close(fd)
    assert (tags / "latest").read_bytes() == image["manifest"] + b"\n \n"


def test_a_tag_changed_beside_the_mount_is_seen_at_sighup(tmp_path: Path, mount: Callable) -> None:
    """The registry moves a tag: within the TTL the daemon may still show the old one, and
    the kernel adds nothing of its own; after SIGHUP a stat shows the new one at once."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    second = padded(image["manifest"], 500)
    m: Mount = mount(root, "--tag-ttl", "60")
    latest = m.path(NAME, "tags", "latest")
    run("ls", "-l", m.path(NAME, "tags"))
    assert os.stat(latest).st_size == len(image["manifest"])

    async def retag() -> None:
        repo = Registry(FilesystemDriver(root)).repository(NAME)
        await repo.tags.put("latest", await repo.manifests.put(second))

    trio.run(retag)
    assert os.stat(latest).st_size == len(image["manifest"])  # the daemon's cache (TTL)
    hang_up(m)
    assert os.stat(latest).st_size == len(second)
    assert latest.read_bytes() == second


def test_a_listing_right_after_sighup_shows_a_tag_moved_beside_the_mount(
    tmp_path: Path, mount: Callable
) -> None:
    """The kernel keeps listed tags' entries for 0.1 s, and SIGHUP cannot reach them; but the
    daemon forgets their attributes, so the next listing hands the kernel placeholders (timeouts
    0) and `ls -l` right after SIGHUP looks each tag up: the moved tag shows at once."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(50))
    second = padded(image["manifest"], 500)
    m: Mount = mount(root, "--tag-ttl", "60")
    tags = m.path(NAME, "tags")

    def sizes() -> set[str]:
        lines = run("ls", "-l", tags).stdout.decode().splitlines()
        return {line.split()[4] for line in lines if line.endswith(" latest")}

    assert sizes() == sizes() == {str(len(image["manifest"]))}  # the second: kept entries

    async def retag() -> None:
        repo = Registry(FilesystemDriver(root)).repository(NAME)
        await repo.tags.put("latest", await repo.manifests.put(second))

    trio.run(retag)
    assert sizes() == {str(len(image["manifest"]))}  # the daemon's cache (TTL)
    hang_up(m)
    assert sizes() == {str(len(second))}


def test_ls_l_of_digests_needs_no_round_trip_per_entry(tmp_path: Path, mount: Callable) -> None:
    """readdirplus hands the kernel each entry of layers/ and manifests/ with its attributes
    and an entry timeout (a digest's name never changes meaning), so `ls -l` walks no path
    through the daemon (with entry timeouts of 0, as tags, three lookups per entry). And the
    getxattrs `ls -l` makes of every file (security.selinux, the ACL) are answered "not
    supported", so ls stops asking after the first (ENODATA: two per entry)."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    trio.run(link_blobs, root, NAME, [b"layer %d" % i for i in range(30)])

    async def manifests() -> None:
        repo = Registry(FilesystemDriver(root)).repository(NAME)
        for pad in range(30):
            await repo.manifests.put(padded(image["manifest"], pad))

    trio.run(manifests)
    m: Mount = mount(root, "--debug", "--tag-ttl", "60")
    for section, count in (("layers", 32), ("manifests", 31)):
        run("stat", m.path(NAME, section))  # the path down to the section
        way = the_way(m, m.path(NAME, section))
        start, began = len(m.log_text()), time.monotonic()
        out = run("ls", "-l", m.path(NAME, section)).stdout
        seconds = time.monotonic() - began
        assert len(out.splitlines()) == count + 1  # `total` first
        assert_getattrs_only_on_the_way(m, start, way, seconds)
        calls = calls_after(m, start, m.path(NAME, section))
        # 0 but for a loaded machine's pauses over LISTED_ENTRY_TIMEOUT; 3 per entry before
        assert calls["lookup in parent"] < count // 2, (section, calls)
        assert calls["getxattr"] <= 4, (section, calls)
        time.sleep(0.2)  # the entries expired: a listing the kernel kept would cost a LOOKUP each
        start = len(m.log_text())
        run("ls", "-l", m.path(NAME, section))  # listed again with attributes (KeptListings)
        calls = calls_after(m, start, m.path(NAME, section))
        assert calls["lookup in parent"] < count // 2 and calls["readdir"] >= 1, calls


def test_a_listing_of_tags_reads_no_link(tmp_path: Path, mount: Callable) -> None:
    """`ls tags/` reads no tag's link (one request per tag on a remote or S3 source): shown
    by links that are all garbage. ls lists every tag and the daemon logs nothing; a stat of
    one reads its link, and that is EIO with the log line that names it."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, "garbage", [f"g{i:03d}" for i in range(300)], index=False)
    m: Mount = mount(root)
    tags = m.path(NAME, "tags")
    assert ls(tags) == sorted(["latest", *(f"g{i:03d}" for i in range(300))])
    assert "ERROR" not in m.log_text()
    assert errno_closing(lambda: os.stat(tags / "g007")) == errno.EIO
    assert "/tags/g007/current/link" in m.log_text()
    assert os.stat(tags / "latest").st_size == len(image["manifest"])


def test_ls_l_of_tags_within_the_ttl_needs_no_round_trip_per_entry(
    tmp_path: Path, mount: Callable
) -> None:
    """The first `ls -l` of tags looks up only the few its first readdir chunk gave (the
    listing read no link): the first lookup reads the tags ahead, and the next chunk waits
    for them and hands them with their attributes. Within the TTL the listing hands the kernel
    what was read, so the next one walks no path through the daemon. Both show every tag's
    real size and mtime: never the placeholder's."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(200))
    m: Mount = mount(root, "--debug", "--tag-ttl", "60")
    tags = m.path(NAME, "tags")
    run("stat", tags)
    way = the_way(m, tags)
    listings = []
    for _ in range(2):
        start, began = len(m.log_text()), time.monotonic()
        listings.append(run("ls", "-l", "--time-style=+%s", tags).stdout.decode())
        seconds = time.monotonic() - began
        listings.append(calls_after(m, start, tags))
    cold_out, cold, warm_out, warm = listings
    assert cold_out == warm_out
    sizes = {line.split()[4] for line in cold_out.splitlines()[1:]}
    assert sizes == {str(len(image["manifest"]))} and len(cold_out.splitlines()) == 202
    assert 1 <= cold["lookup in parent"] < 100, cold  # the first chunk's placeholders only
    # 0 but for a loaded machine's pauses over LISTED_ENTRY_TIMEOUT
    assert warm["lookup in parent"] < 100, warm
    assert_getattrs_only_on_the_way(m, start, way, seconds)  # the warm pass's


@pytest.mark.parametrize("handed", ["listed", "looked up"])
def test_tags_deleted_with_their_manifest_are_gone_when_rm_returns(
    tmp_path: Path, mount: Callable, handed: str
) -> None:
    """`rm manifests/<digest>` deletes the tags that point at it, which the kernel does not
    see; the kernel keeps tags' entries, listed or looked up, for 0.1 s and nothing
    invalidates them. So the rm returns only once those have expired: a stat right after it
    finds no tag. The daemon waits for the tag entries it handed out (`Tree.remove`); it
    also waits for the attributes of a tags/ whose listing the kernel keeps, which would
    hide a lost record of the entries: so each round is a repository whose tags/ was never
    listed before (its first listing, or none), and the tags' attributes the listing hands
    were read over LISTED_LATE earlier. (With the entries' record turned off, both fail in
    the first round or two: the rm and the stats take less than 0.1 s.)"""
    root = tmp_path / "root"
    repos, gone = [f"library/r{i}" for i in range(5)], ["o0", "o1"]
    digests = {}
    for repo in repos:
        image = trio.run(build_root, root, repo, 1000)
        for tag in gone:
            digests[repo] = trio.run(put_tagged, root, repo, tag, padded(image["manifest"], 100))
    m: Mount = mount(root, "--tag-ttl", "60")
    if handed == "listed":
        for repo in repos:  # the daemon now holds their attributes, for the listing to hand
            assert all(os.stat(m.path(repo, "tags", tag)).st_size for tag in gone)
        time.sleep(LISTED_LATE + LISTED_ENTRY_TIMEOUT + 0.1)  # these are waited for no more
    for repo in repos:
        tags = m.path(repo, "tags")
        if handed == "listed":
            assert sorted(os.listdir(tags)) == ["latest", *gone]  # hands them; rm follows
        else:
            assert all(os.stat(tags / tag).st_size for tag in gone)
        os.unlink(m.path(repo, "manifests", digests[repo]))
        there = [tag for tag in gone if errno_closing((tags / tag).stat) is None]
        assert there == [], (repo, there)
        assert ls(tags) == ["latest"]


def test_a_tag_moved_beside_the_mount_is_seen_within_the_ttl(
    tmp_path: Path, mount: Callable
) -> None:
    """The registry moves a tag while `ls -l` keeps listing it: the listings' entries never
    make the old one last beyond the daemon's TTL (plus the kernel's 0.1 s)."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(50))
    second = padded(image["manifest"], 500)
    m: Mount = mount(root, "--tag-ttl", "1")
    tags = m.path(NAME, "tags")

    def size_listed() -> int:
        line = next(x for x in run("ls", "-l", tags).stdout.decode().splitlines() if "latest" in x)
        return int(line.split()[4])

    assert size_listed() == size_listed() == len(image["manifest"])

    async def retag() -> None:
        repo = Registry(FilesystemDriver(root)).repository(NAME)
        await repo.tags.put("latest", await repo.manifests.put(second))

    trio.run(retag)
    moved = time.monotonic()
    wait_until(lambda: size_listed() == len(second), 5, "ls -l to show the moved tag")
    assert time.monotonic() - moved < 1 + 0.1 + 0.5  # TTL, the kernel's entry, a slow ls
    assert os.stat(tags / "latest").st_size == len(second)


def test_a_digest_deleted_through_the_mount_goes_at_once_and_beside_it_at_sighup(
    tmp_path: Path, mount: Callable
) -> None:
    """The kernel keeps a digest's entry for 0.1 s, and nothing invalidates it: an `rm` or
    `mv` through the mount moves the kernel's entry itself (seen at once), a DELETE beside
    the mount is seen at SIGHUP, however long the TTL; a read of it meanwhile fails or reads
    its bytes, never others."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    kept, gone = (b"kept layer", b"gone layer")
    digests = trio.run(link_blobs, root, NAME, [kept, gone])
    m: Mount = mount(root, "--tag-ttl", "3600")
    layers, manifest = m.path(NAME, "layers"), m.path(NAME, "manifests", image["digest"])
    run("ls", "-l", layers, manifest)

    run("rm", layers / digests[0])
    assert errno_closing(lambda: os.stat(layers / digests[0])) == errno.ENOENT
    assert digests[0] not in ls(layers)
    (tmp_path / "kept").write_bytes(kept)
    run("cp", tmp_path / "kept", m.path(NAME, "uploads", "again"))
    run("mv", m.path(NAME, "uploads", "again"), layers / digests[0])
    assert (layers / digests[0]).read_bytes() == kept

    async def delete_beside() -> None:
        repo = Registry(FilesystemDriver(root)).repository(NAME)
        await repo.layers.unlink(Digest.parse(digests[1]))

    trio.run(delete_beside)
    hang_up(m)  # the daemon forgets; the kernel kept its entry 0.1 s at most
    try:
        assert (layers / digests[1]).read_bytes() == gone  # a digest never shows other bytes
    except OSError as exc:
        assert exc.errno in (errno.ENOENT, errno.EIO)
    wait_until(  # at once, unless the kernel's entry is younger than 0.1 s (a fast machine)
        lambda: errno_closing(lambda: os.stat(layers / digests[1])) == errno.ENOENT,
        1,
        "the kernel's entry of a layer deleted beside the mount to expire",
    )
    assert ls(layers) == sorted([digests[0], *image["blobs"]])

    run("rm", manifest)
    assert errno_closing(lambda: os.stat(manifest)) == errno.ENOENT


def numbered(count: int) -> list[str]:
    """The names of `count` tags: t00000, t00001, ..."""
    return [f"t{i:05d}" for i in range(count)]


def add_layers(root: Path, name: str, count: int) -> list[str]:
    """`count` small blobs linked into repository `name`, their files written directly
    (through storage/, an upload each: slow for thousands); their digests."""
    digests = []
    for i in range(count):
        data = b"layer %d" % i
        digest = digest_bytes(data)
        link = str(digest).encode()
        for location, content in ((BlobData(digest), data), (LayerLink(name, digest), link)):
            path = root / path_for(location).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        digests.append(str(digest))
    return digests


def test_kill_9_mid_listing_and_mid_push_frees_clients_and_mount(
    tmp_path: Path, mount: Callable
) -> None:
    """kill -9 while `ls -l` lists 2000 tags (the kernel holding their attributes) and `cp`
    pushes tags into the same directory: both clients fail at once with a dead connection,
    never hang, and the mountpoint takes a new mount that lists every tag."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(2000))
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(image["manifest"])
    m: Mount = mount(root)
    tags = m.path(NAME, "tags")
    listed = tmp_path / "listed"
    scripts = {
        # A tag being pushed is listed once its directory is made, before its current link
        # (the registry's order, tags/list alike): ls -l may find it not there yet (ENOENT).
        "ls": listing_loop(tags, listed),
        "cp": f'i=0; while cp "{manifest}" "{tags}/c$i"; do i=$((i+1)); done; exit 1',
    }
    pushed = root / path_for(TagCurrentLink(NAME, "c2")).lstrip("/")
    kill_mid(m, scripts, lambda: listed.exists() and pushed.exists())
    with Mount(str(root), m.mountpoint, tmp_path / "again.log") as again:
        names = ls(again.path(NAME, "tags"))
    assert len(names) > 2001 and {"latest", "t01999", "c0", "c2"} <= set(names)


def test_kill_9_mid_listing_and_mid_rm_of_layers_frees_clients_and_mount(
    tmp_path: Path, mount: Callable
) -> None:
    """The same for the entries the kernel keeps (layers/): kill -9 while `ls -l` lists 2000
    layers and `rm` deletes others, each then moving the kernel's entries: no client hangs,
    and a new mount lists what is left."""
    root = tmp_path / "root"
    digests = add_layers(root, NAME, 2000)
    m: Mount = mount(root, "--tag-ttl", "60")
    layers = m.path(NAME, "layers")
    listed, removed = tmp_path / "listed", tmp_path / "removed"
    doomed = " ".join(digests[1000:])
    scripts = {
        # not `|| stat`: a stat can be answered from the kernel's cache, dead mount or not
        "ls": listing_loop(layers, listed),
        "rm": f'cd "{layers}"; for d in {doomed}; do rm "$d" || exit 1; echo >> "{removed}"; done',
    }
    started = lambda: listed.exists() and removed.exists() and len(removed.read_bytes()) > 3  # noqa: E731
    kill_mid(m, scripts, started)
    with Mount(str(root), m.mountpoint, tmp_path / "again.log") as again:
        names = set(ls(again.path(NAME, "layers")))
    assert set(digests[:1000]) <= names and len(names) < 2000


def test_kill_9_mid_listing_and_mid_rm_of_tagged_manifests_frees_clients_and_mount(
    tmp_path: Path, mount: Callable
) -> None:
    """The new wait: an `rm` of a tagged manifest waits for the tag entries a listing gave
    the kernel to expire. kill -9 while `ls -l` lists 2000 tags (within the TTL: entries the
    kernel keeps) and a loop tags a manifest and removes it (each rm waiting): no client
    hangs, and a new mount lists every tag the loop did not remove."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(2000))
    other = padded(image["manifest"], 100)
    (tmp_path / "other.json").write_bytes(other)
    m: Mount = mount(root, "--tag-ttl", "60")
    tags, manifest = m.path(NAME, "tags"), m.path(NAME, "manifests", str(digest_bytes(other)))
    listed, removed = tmp_path / "listed", tmp_path / "removed"
    scripts = {
        "ls": listing_loop(tags, listed),
        "rm": f'i=0; while cp "{tmp_path}/other.json" "{tags}/x$i" && rm "{manifest}"; do'
        f' i=$((i+1)); echo >> "{removed}"; done; exit 1',
    }
    started = lambda: listed.exists() and removed.exists() and len(removed.read_bytes()) > 3  # noqa: E731
    kill_mid(m, scripts, started)
    with Mount(str(root), m.mountpoint, tmp_path / "again.log") as again:
        names = set(ls(again.path(NAME, "tags")))
    assert {"latest", "t00000", "t01999"} <= names and len(names) <= 2002


def test_kill_9_mid_listing_and_mid_upload_finish_frees_clients_and_mount(
    tmp_path: Path, mount: Callable
) -> None:
    """The wait for a kept listing: an upload closed under its digest waits for the kernel's
    attributes of layers/ and uploads/ to expire, when the kernel keeps their listings. kill
    -9 while `ls -l` lists layers/ again and again and a loop pushes blobs into uploads/ (each
    close waiting): no client hangs, and a new mount lists every layer the loop finished."""
    root = tmp_path / "root"
    digests = add_layers(root, NAME, 500)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for i in range(200):
        (blobs / str(digest_bytes(b"pushed %d" % i))).write_bytes(b"pushed %d" % i)
    m: Mount = mount(root, "--tag-ttl", "60")
    layers, uploads = m.path(NAME, "layers"), m.path(NAME, "uploads")
    listed, pushed = tmp_path / "listed", tmp_path / "pushed"
    scripts = {
        "ls": listing_loop(layers, listed),
        "cp": f'cd "{blobs}"; for d in *; do cp "$d" "{uploads}/$d" || exit 1;'
        f' echo "$d" >> "{pushed}"; done; while ls "{uploads}" > /dev/null; do :; done; exit 1',
    }
    started = lambda: listed.exists() and pushed.exists() and len(pushed.read_bytes()) > 3  # noqa: E731
    kill_mid(m, scripts, started)
    finished = pushed.read_text().split()
    with Mount(str(root), m.mountpoint, tmp_path / "again.log") as again:
        names = set(ls(again.path(NAME, "layers")))
    assert set(digests) | set(finished) <= names, len(names)


def test_kill_9_mid_read_ahead_frees_clients_and_mount(tmp_path: Path, mount: Callable) -> None:
    """What a listing reads in bulk on a worker thread: kill -9 while `ls -l` lists 5000 tags
    and 2000 layers again and again (a TTL of 0.2 s: each listing is read again, its tags
    read ahead, its layers stated in bulk) and `cp` pushes tags: no client hangs, and a new
    mount lists every tag."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(5000))
    add_layers(root, NAME, 2000)
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(image["manifest"])
    m: Mount = mount(root, "--debug", "--tag-ttl", "0.2")
    tags, layers = m.path(NAME, "tags"), m.path(NAME, "layers")
    listed = tmp_path / "listed"
    scripts = {
        "tags": listing_loop(tags, listed),
        "layers": listing_loop(layers, listed),
        "cp": f'i=0; while cp "{manifest}" "{tags}/c$i"; do i=$((i+1)); done; exit 1',
    }
    started = lambda: listed.exists() and "tags ahead" in m.log_text()  # noqa: E731
    kill_mid(m, scripts, started)
    with Mount(str(root), m.mountpoint, tmp_path / "again.log") as again:
        names = ls(again.path(NAME, "tags"))
    assert len(names) > 5001 and {"latest", "t04999", "c0"} <= set(names)


def test_the_daemon_runs_the_patched_pyfuse3() -> None:
    """`make install` builds pyfuse3 with third_party/pyfuse3/regfs.patch; the tests below
    show what it saves, and fail as this one does if a stock pyfuse3 came in."""
    assert fusefeatures.PATCHED, "run third_party/pyfuse3/install .venv (make install does)"


def test_listing_tags_makes_no_inode_and_shows_the_numbers_stat_shows(
    tmp_path: Path, mount: Callable
) -> None:
    """`ls tags/` hands the kernel tags it has not read by name and type only: no inode in
    the kernel (nor in the daemon, which counts only what the kernel holds) per tag, counted
    in this mount's own inodes (`kernel_inodes`); the `ls -l` after it, which looks each tag
    up, is the control that the count sees them (not all: the kernel drops an entry whose
    0.1 s ran out before ls let go of it, a quarter under load). The number a listing gives
    (d_ino, what `ls -i` shows) is the one stat shows."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    count = 3000
    write_tags(root, NAME, image["digest"], numbered(count))
    m: Mount = mount(root, "--tag-ttl", "60")
    tags = m.path(NAME, "tags")
    run("stat", tags)
    assert len(ls(tags)) == count + 1
    numbers = {entry.name: entry.inode() for entry in os.scandir(tags)}  # no lookup: d_ino
    listed = kernel_inodes(m, numbers.values())
    run("ls", "-l", tags)
    looked_up = kernel_inodes(m, numbers.values())
    assert listed == 0 and looked_up > count // 2, (listed, looked_up)
    listed_i = run("ls", "-i", tags).stdout.decode().splitlines()
    assert {name: int(number) for number, name in map(str.split, listed_i)} == numbers
    for tag in ("latest", "t00000", f"t{count - 1:05d}"):
        assert numbers[tag] == os.stat(tags / tag).st_ino, tag
        assert os.stat(tags / tag).st_size == len(image["manifest"])


def test_the_kernel_keeps_every_listing(tmp_path: Path, mount: Callable) -> None:
    """opendir answers ENOSYS, so the kernel sends no OPENDIR or RELEASEDIR and keeps every
    listing: a warm `find` and `ls -lR` of an image (whose directories never change) send no
    directory request at all, nor a READLINK (the kernel keeps link targets too), and `ls`
    of tags/ again, namespaces and repositories no READDIR (at most a GETATTR of each
    directory once its 0.1 s attributes expired). Before: an OPENDIR and a RELEASEDIR per
    directory per walk, a READLINK per link, and READDIRs outside images."""
    root = tmp_path / "root"
    trio.run(build_root, root, NAME, 1000)
    dirs = [directory(f"d{i}") for i in range(8)] + [directory(f"d{i}/e") for i in range(8)]
    files = [file(f"d{i}/e/f{j}", b"x") for i in range(8) for j in range(20)]
    links = [symlink(f"d{i}/link", f"e/f{i}") for i in range(8)]
    trio.run(put_layer_image, root, NAME, "img", [directory("."), *dirs, *files, *links])
    m: Mount = mount(root, "--debug", "--tag-ttl", "60")
    image = m.path(NAME, "rootfs", "img")
    outside = [m.path(NAME, "tags"), m.path("library"), m.path(NAME), m.mountpoint]
    cold = [run("find", image).stdout, run("ls", "-lR", image).stdout]
    cold += [run("ls", path).stdout for path in outside]
    way, outside_way = the_way(m, image), the_way(m, outside[0])
    start, began = len(m.log_text()), time.monotonic()
    warm = [run("find", image).stdout, run("ls", "-lR", image).stdout]
    assert_getattrs_only_on_the_way(m, start, way, time.monotonic() - began)
    image_calls = calls_after(m, start, image)
    start, began = len(m.log_text()), time.monotonic()
    warm += [run("ls", path).stdout for path in outside]
    assert_getattrs_only_on_the_way(m, start, outside_way, time.monotonic() - began)
    outside_calls = calls_after(m, start, image)
    assert warm == cold and len(cold[0].splitlines()) == 1 + 16 + 160 + 8
    for calls in (image_calls, outside_calls):
        assert calls["opendir"] == calls["readdir"] == calls["releasedir"] == 0, calls
    assert image_calls["lookup in parent"] == image_calls["lookup"] == 0, image_calls
    assert image_calls["readlink"] == 0, image_calls
    image_calls["getattr"] = 0  # only of the directories on the way, as above
    assert sum(image_calls.values()) <= 5, image_calls  # ls's getxattrs, statfs


def test_kept_listings_show_changes_beside_the_mount_within_the_ttl(
    tmp_path: Path, mount: Callable
) -> None:
    """Tags, layers and repositories added or removed by the registry after the kernel kept
    their listings show in `ls` within --tag-ttl (and the 0.1 s the kernel keeps a
    directory's attributes): a GETATTR of a kept listing whose daemon copy expired lists it
    again and moves the directory's mtime if the names moved. Within the TTL the old names
    (the daemon's cache); never a later mtime than the one shown after the change."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(3))
    m: Mount = mount(root, "--tag-ttl", "1")
    tags, layers, library = m.path(NAME, "tags"), m.path(NAME, "layers"), m.path("library")
    before = {path: ls(path) for path in (tags, layers, library)}
    mtimes = {path: os.stat(path).st_mtime_ns for path in before}
    assert before == {path: ls(path) for path in before}  # kept by the kernel now

    shutil.rmtree(root / path_for(TagCurrentLink(NAME, "t00001")).lstrip("/").rsplit("/", 2)[0])
    (added,) = add_layers(root, NAME, 1)
    write_tags(root, NAME, image["digest"], numbered(1))  # t00000 again: no change
    write_tags(root, NAME, image["digest"], ["new"])
    trio.run(build_root, root, "library/other", 1000)
    changed = time.monotonic()
    expected = {
        tags: sorted({*before[tags], "new"} - {"t00001"}),
        layers: sorted([*before[layers], added]),
        library: ["demo", "other"],
    }
    for path, names in expected.items():
        wait_until(lambda p=path, n=names: ls(p) == n, 5, f"ls {path} to show the change")
    assert time.monotonic() - changed < 1 + 0.1 + 0.8  # the TTL, 0.1 s, a slow machine
    for path in expected:
        assert os.stat(path).st_mtime_ns > mtimes[path], path


def test_kept_listings_show_changes_through_the_mount_at_once(
    tmp_path: Path, mount: Callable
) -> None:
    """Changes through the mount that the kernel does not see itself change listings it
    keeps: a tag written adds its manifest to manifests/, an upload closed under its digest
    moves from uploads/ to layers/, `rm` of a manifest takes its tags from tags/. Each is in
    the next `ls`, however long the TTL (the change waits for the kernel's 0.1 s attributes
    of the directory to expire; its mtime moved). mkdir and rmdir of a repository too."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    m: Mount = mount(root, "--tag-ttl", "60")
    section = lambda name: m.path(NAME, name)  # noqa: E731
    listed = {name: ls(section(name)) for name in ("tags", "manifests", "layers", "uploads")}
    listed |= {name: ls(section(name)) for name in listed}  # now kept by the kernel
    library = ls(m.path("library"))

    other = padded(image["manifest"], 300)
    (tmp_path / "other.json").write_bytes(other)
    run("cp", tmp_path / "other.json", section("tags") / "latest")  # a manifest more
    assert ls(section("manifests")) == sorted([*listed["manifests"], str(digest_bytes(other))])
    blob = b"a layer pushed through the mount"
    (tmp_path / "blob").write_bytes(blob)
    run("cp", tmp_path / "blob", section("uploads") / str(digest_bytes(blob)))
    assert ls(section("layers")) == sorted([*listed["layers"], str(digest_bytes(blob))])
    assert ls(section("uploads")) == listed["uploads"] == []
    run("cp", tmp_path / "other.json", section("tags") / "second")
    assert ls(section("tags")) == ["latest", "second"]
    run("rm", section("manifests") / str(digest_bytes(other)))  # takes both tags along
    assert ls(section("tags")) == []

    run("mkdir", m.path("library", "made"))
    assert ls(m.path("library")) == sorted([*library, "made"])
    run("rmdir", m.path("library", "made"))
    assert ls(m.path("library")) == library


def test_kept_listings_are_read_again_after_sighup(tmp_path: Path, mount: Callable) -> None:
    """SIGHUP moves the mtime of every directory whose listing the kernel keeps: a tag and a
    repository added beside the mount show in the next `ls` (within the 0.1 s the kernel
    keeps a directory's attributes), however long the TTL."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    m: Mount = mount(root, "--tag-ttl", "3600")
    tags, library = m.path(NAME, "tags"), m.path("library")
    assert ls(tags) == ["latest"] and ls(library) == ["demo"]
    write_tags(root, NAME, image["digest"], ["new"])
    trio.run(build_root, root, "library/other", 1000)
    time.sleep(0.2)  # the kernel's attributes expired: it asks, the daemon's cache answers
    assert ls(tags) == ["latest"] and ls(library) == ["demo"]
    hang_up(m)
    wait_until(lambda: ls(tags) == ["latest", "new"], 1, "ls tags/ to show the new tag")
    wait_until(lambda: ls(library) == ["demo", "other"], 1, "ls to show the new repository")


@pytest.mark.parametrize(("count", "dots"), [(1023, [".", ".."]), (1021, ["."])])
def test_a_listing_begun_before_the_kept_one_is_read_to_its_end(
    tmp_path: Path, mount: Callable, count: int, dots: list[str]
) -> None:
    """Two readers of one tags/ at once, each in its own snapshot: A reads its first chunk,
    B its own, A reads to the end (the kernel keeps A's listing), then B reads on. Where
    the kernel's copy ends on a page's end, Linux told B the listing ended (32 names of
    1,024) instead of asking the daemon. With `count` + 1 names of 32-byte dirents, "."
    and ".." first: 1,021 would make 1,024 (a copy of 8 pages to the end), so that listing
    begins with "." alone (regfs/directories.py, `_dots`)."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(count))
    want = {"latest", *numbered(count)}
    m: Mount = mount(root)
    tags = m.path(NAME, "tags")
    with os.scandir(tags) as a, os.scandir(tags) as b:
        first_a = [next(a).name for _ in range(5)]  # one getdents each: its first chunk
        first_b = [next(b).name for _ in range(5)]
        seen_a = first_a + [entry.name for entry in a]
        seen_b = first_b + [entry.name for entry in b]
    assert sorted(seen_a) == sorted(want)
    assert sorted(seen_b) == sorted(want)
    listed = run("ls", "-1a", tags).stdout.decode().splitlines()
    assert [name for name in listed if name.startswith(".")] == dots


def test_an_image_directory_begun_twice_is_read_to_its_end(tmp_path: Path, mount: Callable) -> None:
    """The same for a directory inside an image (listed with attributes, two chunks): 256
    names of four letters fill two pages of the kernel's copy exactly."""
    root = tmp_path / "root"
    trio.run(build_root, root, NAME, 1000)
    names = [f"f{i:03d}" for i in range(256)]
    entries = [directory("."), directory("d"), *(file(f"d/{name}", b"x") for name in names)]
    trio.run(put_layer_image, root, NAME, "img", entries)
    m: Mount = mount(root)
    listed = m.path(NAME, "rootfs", "img", "d")
    with os.scandir(listed) as a, os.scandir(listed) as b:
        first_a = [next(a).name for _ in range(5)]
        first_b = [next(b).name for _ in range(5)]
        seen_a = first_a + [entry.name for entry in a]
        seen_b = first_b + [entry.name for entry in b]
    assert sorted(seen_a) == sorted(seen_b) == names


def test_concurrent_listings_of_a_changing_directory_skip_and_repeat_nothing(
    tmp_path: Path, mount: Callable
) -> None:
    """Two processes list ~1,000 tags (several READDIRs each) again and again while tags are
    pushed and removed through the mount and beside it, and the short TTL makes the daemon
    list them again meanwhile: no listing shows a name twice or misses one that never
    changed. The count passes 1,024 names, whose kernel copy fills its pages exactly (failed
    half the runs before `_fills_pages`). A readdir offset names its snapshot, so the chunks
    of one listing (and the kernel's kept copy) never mix two listings."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    write_tags(root, NAME, image["digest"], numbered(1000))
    stable = {"latest", *numbered(1000)}
    (tmp_path / "manifest.json").write_bytes(image["manifest"])
    m: Mount = mount(root, "--tag-ttl", "0.2")
    tags = m.path(NAME, "tags")
    stop = tmp_path / "stop"
    script = (
        "import os, sys\n"
        "while not os.path.exists(sys.argv[2]):\n"
        "    names = os.listdir(sys.argv[1])\n"
        "    print(len(names), len(set(names)), len(set(names) & set(sys.argv[3:])), flush=True)\n"
    )
    sample = sorted(stable)[:: len(stable) // 30]
    listers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tags), str(stop), *sample], stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        for i in range(40):
            run("cp", tmp_path / "manifest.json", tags / f"c{i % 7}")
            write_tags(root, NAME, image["digest"], [f"b{i:04d}"])
            if i % 3 == 0:
                run("rm", "-f", tags / f"c{(i + 3) % 7}")
        stop.touch()
        results = [lister.communicate(timeout=60)[0].decode().split("\n") for lister in listers]
    finally:
        stop.touch()
        for lister in listers:
            lister.kill()
            lister.wait()
    for lines in results:
        counts = [tuple(map(int, line.split())) for line in lines if line]
        assert len(counts) > 10, counts  # listings interleaved with the changes
        for total, distinct, kept in counts:
            assert total == distinct and kept == len(sample), (total, distinct, kept)
        assert counts[-1][0] > counts[0][0]  # the new tags showed up
