"""Listings and what the kernel may keep of them (issue 18), through a real mount.

Tags get kernel attribute timeouts (`--tag-ttl`) but entry timeouts of 0, and the daemon keeps
a tag's attributes with its target: `ls -l tags/` then costs five round trips per entry, not
six. What must stay true: a tag changed through the mount is seen at once, one changed beside
it at SIGHUP; and nothing the kernel keeps ever needs the daemon to invalidate it, so a daemon
killed mid-listing or mid-push always frees its clients and its mount (docs/concurrency.md).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.mounts import Mount, wait_until
from support.roots import build_root
from support.tools import errno_closing, ls, run

from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver
from storage.paths import TagCurrentLink, TagIndexLink, path_for
from storage.registry import Registry

pytestmark = pytest.mark.mount

NAME = "library/demo"
DEAD = ("Transport endpoint is not connected", "Software caused connection abort")


def padded(manifest: bytes, pad: int) -> bytes:
    """The same image with an annotation: another manifest, of another size."""
    body = json.loads(manifest)
    body["annotations"] = {"org.example.pad": "x" * pad}
    return json.dumps(body).encode()


def sighup(m: Mount) -> None:
    """SIGHUP, and wait until the daemon has taken it."""
    before = m.log_text().count("SIGHUP")
    for pid in m.pids():
        os.kill(pid, signal.SIGHUP)
    wait_until(lambda: m.log_text().count("SIGHUP") > before, what="the daemon to take SIGHUP")


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
    sighup(m)
    assert os.stat(latest).st_size == len(second)
    assert latest.read_bytes() == second


def add_tags(root: Path, name: str, digest: str, count: int) -> None:
    """`count` tags on one manifest, written as the registry's link files (fast)."""
    for i in range(count):
        tag = f"t{i:05d}"
        for location in (TagCurrentLink(name, tag), TagIndexLink(name, tag, Digest.parse(digest))):
            path = root / path_for(location).lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(digest)


def test_kill_9_mid_listing_and_mid_push_frees_clients_and_mount(
    tmp_path: Path, mount: Callable
) -> None:
    """kill -9 while `ls -l` lists 2000 tags (the kernel holding their attributes) and `cp`
    pushes tags into the same directory: both clients fail at once with a dead connection,
    never hang, and the mountpoint takes a new mount that lists every tag."""
    root = tmp_path / "root"
    image = trio.run(build_root, root, NAME, 1000)
    add_tags(root, NAME, image["digest"], 2000)
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(image["manifest"])
    m: Mount = mount(root)
    tags = m.path(NAME, "tags")
    listed = tmp_path / "listed"
    scripts = {
        "ls": f'while ls -l "{tags}" > /dev/null; do echo >> "{listed}"; done; exit 1',
        "cp": f'i=0; while cp "{manifest}" "{tags}/c$i"; do i=$((i+1)); done; exit 1',
    }
    clients = {
        what: subprocess.Popen(["bash", "-c", script], stderr=subprocess.PIPE)
        for what, script in scripts.items()
    }
    try:
        pushed = root / path_for(TagCurrentLink(NAME, "c2")).lstrip("/")
        wait_until(lambda: listed.exists() and pushed.exists(), 60, "a listing and 3 pushes")
        (pid,) = m.pids()
        os.kill(pid, signal.SIGKILL)
        for what, client in clients.items():
            try:
                _, stderr = client.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what} still hangs on the mount of the killed daemon")
            assert any(d in stderr.decode() for d in DEAD), (what, stderr.decode())
    finally:
        for client in clients.values():
            if client.poll() is None:
                subprocess.run(["umount", "-f", m.mountpoint], capture_output=True, timeout=10)
                client.kill()
                client.wait(10)
    with Mount(str(root), m.mountpoint, tmp_path / "again.log") as again:
        names = ls(again.path(NAME, "tags"))
    assert len(names) > 2001 and {"latest", "t01999", "c0", "c2"} <= set(names)
