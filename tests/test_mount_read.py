"""The read side through a real mount, driven by real tools in subprocesses.

Every check goes through the kernel: `ls`, `cat`, `dd`, `stat`, `getfattr`, `tar` and
`sha256sum` run as their own processes against a `regfs mount` started by the real command
line, and compare with what the storage (or the OCI layout that was pushed) holds.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from support.mounts import Mount, parse_getfattr
from support.oci import build_image, build_large_image, skopeo_push
from support.registry import OCI_MANIFEST, blob_data_path, repo_path
from support.roots import build_root, link_blobs
from support.tools import (
    ls,
    run,
    sha256_file,
)

pytestmark = pytest.mark.mount

SECTIONS = ["layers", "manifests", "rootfs", "tags", "uploads"]


# --------------------------------------------------------------------------- helpers


def parse_ls_recursive(out: str, top: Path) -> dict[str, list[str]]:
    """`ls -R` output → {relative dir: entries}."""
    tree = {}
    for block in out.strip("\n").split("\n\n"):
        header, *names = block.split("\n")
        assert header.endswith(":"), block
        rel = os.path.relpath(header[:-1], top)
        tree["" if rel == "." else rel] = names
    return tree


# --------------------------------------------------------------------------- starters


async def test_basic_tree_and_bytes(tmp_path, mount):
    image = await build_root(tmp_path / "root")
    m = mount(tmp_path / "root")
    repo = m.path("library", "demo")
    assert sorted(os.listdir(m.mountpoint)) == ["library"]
    assert sorted(os.listdir(repo)) == SECTIONS
    assert sorted(os.listdir(repo / "layers")) == sorted(image["blobs"])
    assert (repo / "tags" / "latest").read_bytes() == image["manifest"]
    assert (repo / "manifests" / image["digest"]).read_bytes() == image["manifest"]
    for digest, data in image["blobs"].items():
        out = run("sha256sum", repo / "layers" / digest).stdout.decode()
        assert out.split()[0] == digest.removeprefix("sha256:")
        assert os.stat(repo / "layers" / digest).st_size == len(data)


async def test_write_paths_refused(tmp_path, mount):
    """The quick version; test_mount_errors.py covers every write call."""
    image = await build_root(tmp_path / "root", size=1000)
    m = mount(tmp_path / "root")
    layer = m.path("library", "demo", "layers", image["layer"])
    for call in (
        lambda: os.open(layer, os.O_WRONLY),
        lambda: os.chmod(layer, 0o600),
        lambda: os.truncate(layer, 0),
        lambda: os.link(layer, m.path("x")),
    ):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.EPERM
    assert "refused" in m.log_text()


# --------------------------------------------------------------------------- a real registry

FILES = {
    "etc/hello.txt": b"hello from regfs\n",
    "bin/tool": bytes(range(256)) * 40,
    "usr/share/doc/readme": b"read me\n" * 500,
    "var/lib/data.bin": random.Random(7).randbytes(50_000),
}


@pytest.mark.registry
def test_real_registry_root(tmp_path, registry_server, client, mount):
    """A root written by the real docker-registry (pushed by skopeo) reads back exactly:
    tree, bytes, slices at any offset, sizes, mtimes, xattrs, and tar contents."""
    layout = tmp_path / "oci"
    small = build_image(layout, "v1", FILES, layers=3)
    big = build_large_image(layout, "big", 4 << 20, seed=3)
    for tag in ("v1", "big"):
        skopeo_push(layout, tag, registry_server.host, "library/demo")
    assert sorted(client.tags("library/demo")) == ["big", "v1"]
    registry_server.stop()  # regfs reads the storage at rest, with no registry running
    root = registry_server.root

    m = mount(root)
    repo = m.path("library", "demo")
    blobs = sorted({*small.blob_digests, *big.blob_digests})
    images = {"v1": small, "big": big}

    # The whole tree, as `ls -R` prints it.
    tree = parse_ls_recursive(run("ls", "-R", m.mountpoint).stdout.decode(), m.mountpoint)
    assert tree == {
        "": ["library"],
        "library": ["demo"],
        "library/demo": SECTIONS,
        "library/demo/layers": blobs,
        "library/demo/manifests": sorted([small.digest, big.digest]),
        "library/demo/rootfs": [],  # lists nothing: ls -R enters no image
        "library/demo/tags": ["big", "v1"],
        "library/demo/uploads": [],
    }

    # Every layer hashes to its digest (one sha256sum over all of them).
    out = run("sha256sum", *(repo / "layers" / d for d in blobs)).stdout.decode()
    sums = {Path(line.split(maxsplit=1)[1]).name: line.split()[0] for line in out.splitlines()}
    assert sums == {d: d.removeprefix("sha256:") for d in blobs}

    # Tags and manifests are the very bytes skopeo pushed from the OCI layout.
    for tag, image in images.items():
        assert run("cat", repo / "tags" / tag).stdout == image.manifest
        assert run("cat", repo / "manifests" / image.digest).stdout == image.manifest

    # Slices at random offsets, byte by byte and in 4 KiB blocks with byte offsets.
    rng = random.Random(1234)
    for digest in (big.layer_digests[0], small.layer_digests[-1]):
        data = blob_data_path(root, digest).read_bytes()
        size = len(data)
        offsets = [0, 131071, size - 10, *(rng.randrange(size) for _ in range(4))]
        for offset in offsets:
            path = repo / "layers" / digest
            count = rng.randint(1, 200)
            got = run("dd", f"if={path}", "bs=1", f"skip={offset}", f"count={count}").stdout
            assert got == data[offset : offset + count], (digest, offset, count)
            count = rng.randint(1, 300_000)
            flags = "iflag=skip_bytes,count_bytes"
            got = run("dd", f"if={path}", "bs=4096", f"skip={offset}", f"count={count}", flags)
            got = got.stdout
            assert got == data[offset : offset + count], (digest, offset, count)

    # Sizes and mtimes are the blob data files' (stat(1) prints whole-second mtimes).
    files = {repo / "layers" / d: d for d in blobs}
    files |= {repo / "manifests" / i.digest: i.digest for i in images.values()}
    files |= {repo / "tags" / t: i.digest for t, i in images.items()}
    out = run("stat", "-c", "%n|%s|%Y", *files).stdout.decode()
    assert len(out.splitlines()) == len(files)
    for line in out.splitlines():
        name, size, mtime = line.split("|")
        data_file = blob_data_path(root, files[Path(name)])
        assert int(size) == data_file.stat().st_size, name
        source = data_file  # a tag's mtime is its link's (when it last moved)
        if "/tags/" in name:
            tags_dir = repo_path(root, "library/demo") / "_manifests" / "tags"
            source = tags_dir / Path(name).name / "current" / "link"
        assert int(mtime) == int(source.stat().st_mtime), name
        assert os.stat(name).st_mtime_ns == source.stat().st_mtime_ns, name  # to the ns

    # Extended attributes: digest everywhere, media type on tags and manifests only.
    out = run("getfattr", "-d", "--absolute-names", *files).stdout.decode()
    xattrs = parse_getfattr(out)
    assert set(xattrs) == {str(p) for p in files}
    for path, digest in files.items():
        expected = {"user.regfs.digest": digest}
        if "/layers/" not in str(path):
            expected["user.regfs.mediatype"] = OCI_MANIFEST
        assert xattrs[str(path)] == expected, path

    # Real gzip layers list their files with tar.
    listed = set()
    for digest in small.layer_digests:
        listed |= set(run("tar", "-tzf", repo / "layers" / digest).stdout.decode().split())
    assert set(FILES) <= listed
    big_listing = run("tar", "-tzf", repo / "layers" / big.layer_digests[0]).stdout.decode()
    assert "big.bin" in big_listing.split()


# --------------------------------------------------------------------------- tree shape


def make_empty_repository(root: Path, name: str) -> None:
    """What the registry leaves for a repository with nothing in it: just `_layers`."""
    (repo_path(root, name) / "_layers").mkdir(parents=True)


async def test_namespaces_shadowing_and_empty_repositories(tmp_path, mount):
    """Namespaces nest, a repository can hold repositories, reserved names shadow (and say
    so in the log), and an empty repository shows four empty sections."""
    root = tmp_path / "root"
    ab = await build_root(root, "a/b", size=1000, config=b'{"repo":"a/b"}')
    abc = await build_root(root, "a/b/c", size=1000, config=b'{"repo":"a/b/c"}')
    x = await build_root(root, "x", size=1000, config=b'{"repo":"x"}')
    await build_root(root, "x/tags", size=1000, tag="nested-only", config=b'{"repo":"x/t"}')
    make_empty_repository(root, "empty")
    m = mount(root)

    assert ls(m.mountpoint) == ["a", "empty", "x"]
    assert ls(m.path("a")) == ["b"]
    assert ls(m.path("a", "b")) == ["c", *SECTIONS]
    assert ls(m.path("a", "b", "c")) == SECTIONS
    assert ls(m.path("a", "b", "layers")) == sorted(ab["blobs"])
    assert ls(m.path("a", "b", "c", "layers")) == sorted(abc["blobs"])
    assert run("cat", m.path("a", "b", "tags", "latest")).stdout == ab["manifest"]
    assert run("cat", m.path("a", "b", "c", "tags", "latest")).stdout == abc["manifest"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.path("a", "tags"))  # a namespace has no sections

    # x/tags is both x's tags section and a nested repository: the section wins.
    assert ls(m.path("x")) == SECTIONS
    assert ls(m.path("x", "tags")) == ["latest"]
    assert run("cat", m.path("x", "tags", "latest")).stdout == x["manifest"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.path("x", "tags", "nested-only"))
    warnings = [line for line in m.log_text().splitlines() if "WARNING" in line]
    assert any("x/tags" in line and "hidden" in line for line in warnings), m.log_text()

    assert ls(m.path("empty")) == SECTIONS
    for section in SECTIONS:
        assert ls(m.path("empty", section)) == []


def write_tags_directly(root: Path, name: str, digest: str, tags: list[str]) -> None:
    """Tag links as the registry writes them (current + index), without the storage layer's
    fsync per file: thousands in a fraction of a second."""
    base = repo_path(root, name) / "_manifests" / "tags"
    hexdigest = digest.removeprefix("sha256:")
    for tag in tags:
        for link in (base / tag / "current", base / tag / "index" / "sha256" / hexdigest):
            link.mkdir(parents=True)
            (link / "link").write_text(digest)


async def test_three_thousand_tags(tmp_path, mount):
    """A big tags directory lists completely and fast on a cold mount."""
    root = tmp_path / "root"
    image = await build_root(root, "library/many", size=1000)
    tags = ["latest", *(f"v{i}" for i in range(1, 3000))]
    write_tags_directly(root, "library/many", image["digest"], tags[1:])
    m = mount(root)
    tags_dir = m.path("library", "many", "tags")

    started = time.monotonic()
    counted = run("sh", "-c", f'ls "{tags_dir}" | wc -l').stdout
    elapsed = time.monotonic() - started
    assert int(counted) == 3000
    assert elapsed < 2.0, f"ls tags | wc -l took {elapsed:.2f} s"
    assert ls(tags_dir) == sorted(tags)
    assert run("cat", tags_dir / "v1234").stdout == image["manifest"]
    assert os.stat(tags_dir / "v2999").st_size == len(image["manifest"])


# --------------------------------------------------------------------------- concurrency


async def test_parallel_cat_of_same_and_different_layers(tmp_path, mount):
    """Eight `cat`s at once, four of one layer and one each of four others: every copy is
    exact, so no reader got another's bytes or a short read."""
    root = tmp_path / "root"
    size = 4 << 20
    datas = [random.Random(seed).randbytes(size + seed) for seed in range(5)]
    digests = await link_blobs(root, "library/par", datas)
    m: Mount = mount(root)
    layers = m.path("library", "par", "layers")
    jobs = [digests[0]] * 4 + digests[1:]
    outputs = [tmp_path / f"out{i}" for i in range(len(jobs))]
    procs = []
    for digest, out in zip(jobs, outputs, strict=True):
        with open(out, "wb") as f:
            procs.append(subprocess.Popen(["cat", str(layers / digest)], stdout=f))
    codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0] * len(jobs)
    for digest, out in zip(jobs, outputs, strict=True):
        assert sha256_file(out) == digest, out
    assert m.pids(), "the daemon is gone"
