"""The `rootfs/` view mounted (issue 16): images built with umoci, pushed with skopeo to the
real registry, mounted, and held to `umoci unpack` of the same image with real tools.

One module-wide storage root holds every image: the rule-covering image as gzip, plain tar and
zstd layers, a second version of it, an index of two platforms and an attestation, and
images whose one layer is bad (not a tar, a gzip cut short, bytes that are not its digest).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import random
import re
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.clients import kill_mid, listing_loop
from support.fault_server import Fault, FaultServer
from support.images import (
    Tree,
    build_layered_image,
    device,
    differences,
    directory,
    file,
    hardlink,
    layer_tar,
    layer_tars,
    opaque,
    symlink,
    tree_of_dir,
    umoci_unpack,
    whiteout,
)
from support.layers import MEDIA_TYPES, compress, estargz
from support.mounts import Mount, wait_until
from support.oci import OciImage, image_manifest, skopeo_push
from support.registry import OCI_INDEX, OCI_MANIFEST, RegistryServer, blob_data_path, v2_root
from support.roots import CONFIG, link_blobs, put_tagged
from support.tools import digest_of, errno_of, run

from regfs import fusefeatures
from regfs import rootfs as rootfs_view
from regfs.attributes import PACKED
from regfs.nodes import Attr, Listing, Node, SectionNode
from regfs.operations import Operations
from regfs.options import MountOptions
from regfs.rootfs import PAUSE_GC_AT, RootfsView
from regfs.tree import Tree as RegfsTree
from storage.drivers import FilesystemDriver
from storage.registry import Registry
from storage.rootfs import treefile
from storage.rootfs.cache import IndexCache
from storage.rootfs.image import TOC_DIGEST
from storage.rootfs.members import Kind

pytestmark = [pytest.mark.mount, pytest.mark.registry]

REPO = "library/img"
BIG = random.Random(16).randbytes(400_000)
LONG = "long/" + "n" * 200 + "/" + "f" * 150
# A POSIX ACL as a tar carries it (xattr system.posix_acl_access): version 2, then user::rw-,
# user:1000:r--, group::r--, mask::r--, other::r-- (tag, permissions, id); one that says more
# than the mode, so that a filesystem keeps it.
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in ((1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                             (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF))
)  # fmt: skip


def layers_v1() -> list[list]:
    """Every rule the view must show as umoci does, in three layers (the last one empty)."""
    base = [
        directory(".", mode=0o755),
        directory("etc"),
        file("etc/os-release", b"ID=test\nVERSION=1\n"),
        file("etc/shadow", b"root:*:19000::::::\n", mode=0o600),
        file("etc/motd", b"hello\n"),
        directory("usr"),
        directory("usr/bin"),
        file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755, uid=1000, gid=1000),
        file("usr/bin/big", BIG, mode=0o755),
        hardlink("usr/bin/tool-link", "usr/bin/tool"),
        symlink("bin", "usr/bin"),
        symlink("etc/abs", "/etc/os-release"),
        symlink("dangling", "../nowhere"),
        directory("dev"),
        device("dev/null", Kind.CHAR, 1, 3),
        device("dev/sda", Kind.BLOCK, 8, 0),
        device("dev/fifo", Kind.FIFO, 0, 0),
        file("xattr.txt", b"x", xattrs=(("user.a", b"1"), ("user.bin", b"\x00\xff"))),
        file("acl.txt", b"acl", xattrs=(("system.posix_acl_access", ACL),)),
        directory("gone"),
        file("gone/a", b"a"),
        directory("opq", mode=0o750, uid=7),
        file("opq/old", b"old"),
        file("f2d", b"a file first"),
        file("target", b"v0"),
        file(LONG, b"long"),
        file("ünïcode.txt", b"u", uid=100000, gid=200000),
    ]
    second = [
        whiteout("gone"),
        opaque("opq"),
        file("opq/new", b"new"),
        directory("f2d", mode=0o700),
        file("f2d/child", b"c"),
        hardlink("keep", "target"),
        file("target", b"v1", mtime="1700000000.5"),
    ]
    return [base, second, []]


def layers_v2() -> list[list]:
    return [
        *layers_v1(),
        [file("etc/os-release", b"ID=test\nVERSION=2\n"), whiteout("etc/motd"), file("etc/added")],
    ]


def platform_index(children: dict[str, OciImage], attestation: OciImage) -> bytes:
    """An OCI index of `children` by `<os>-<arch>[-<variant>]`, a buildkit-style attestation
    entry and platforms that are no file name (which the view must all skip)."""
    entries = []
    for name, image in children.items():
        os_, arch, *variant = name.split("-")
        platform = {"os": os_, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        entries.append(_descriptor(image) | {"platform": platform})
    entries.append(
        _descriptor(attestation)
        | {
            "platform": {"os": "unknown", "architecture": "unknown"},
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
        }
    )
    for hostile in ({"os": "..", "architecture": "x"}, {"os": "a/../..", "architecture": "b"}):
        entries.append(_descriptor(attestation) | {"platform": hostile})  # no such file name
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


def _descriptor(image: OciImage) -> dict[str, object]:
    return {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest)}


async def put_image(root: Path, tag: str, config: bytes, layers: list[bytes], kind: str) -> str:
    """An image of `layers` (blobs as given) tagged `tag` in REPO, through storage/."""
    await link_blobs(root, REPO, [config, *layers])
    repo = Registry(FilesystemDriver(root)).repository(REPO)
    digest = await repo.manifests.put(image_manifest(config, layers, kind))
    await repo.tags.put(tag, digest)
    return str(digest)


async def put_manifest(root: Path, tag: str, data: bytes) -> str:
    return await put_manifest_in(root, REPO, tag, data)


async def put_manifest_in(root: Path, name: str, tag: str, data: bytes) -> str:
    repo = Registry(FilesystemDriver(root)).repository(name)
    digest = await repo.manifests.put(data)
    await repo.tags.put(tag, digest)
    return str(digest)


class Images:
    """The module's storage root, its OCI layout, and what was built into them."""

    def __init__(self, base: Path) -> None:
        self.layout = base / "oci"
        self.root = base / "root"
        self.cache = base / "cache"  # XDG_CACHE_HOME of every mount here
        self.built: dict[str, OciImage] = {}
        self.bad: dict[str, str] = {}  # tag → the bad layer's digest
        self.bundles = base / "bundles"
        self.stargz: list[str] = []  # the eStargz image's layer digests
        self.unpacked: dict[str, Path] = {}

    def build(self, workdir: Path) -> None:
        for tag, layers, compression in [
            ("v1", layers_v1(), "gzip"),
            ("v1-tar", layers_v1(), "tar"),
            ("v1-zstd", layers_v1(), "zstd"),
            ("v2", layers_v2(), "gzip"),
        ]:
            self.built[tag] = build_layered_image(self.layout, tag, layers, compression)
        with RegistryServer(self.root, workdir=workdir) as server:
            for tag in self.built:
                skopeo_push(self.layout, tag, server.host, REPO)
        trio.run(self._put_more)

    async def _put_more(self) -> None:
        v1, v2 = self.built["v1"], self.built["v2"]
        config = v1.blob(json.loads(v1.manifest)["config"]["digest"])
        index = platform_index({"linux-amd64": v1, "linux-arm-v7": v2}, self.built["v1-tar"])
        await put_manifest(self.root, "multi", index)
        await self._put_estargz(config)
        await self._put_artifact(config)
        first_gzip = v1.blob(json.loads(v1.manifest)["layers"][0]["digest"])
        tar = layer_tars(self.built["v1-tar"])[0]
        bad = {
            "notatar": (random.Random(1).randbytes(20_000), MEDIA_TYPES["tar"]),
            "cutgzip": (first_gzip[: len(first_gzip) // 2], MEDIA_TYPES["gzip"]),
            "baddigest": (tar + b"\0" * 1024, MEDIA_TYPES["tar"]),
            "badmerge": (layer_tar([file("a"), hardlink("h", "nothing")]), MEDIA_TYPES["tar"]),
        }
        for tag, (data, kind) in bad.items():
            await put_image(self.root, tag, config, [data], kind)
            self.bad[tag] = digest_of(data)
        # The blob's bytes change under its digest (damage): same size, one member's content.
        path = blob_data_path(self.root, self.bad["baddigest"])
        data = bytearray(path.read_bytes())
        at = data.index(b"ID=test")
        data[at : at + 2] = b"XX"
        path.write_bytes(bytes(data))

    async def _put_estargz(self, config: bytes) -> None:
        """v1's layers as eStargz, each with its TOC digest annotated as the manifest would."""
        layers = [estargz(tar) for tar in layer_tars(self.built["v1-tar"])]
        await link_blobs(self.root, REPO, [config, *(blob for blob, _ in layers)])
        descriptor = {"digest": digest_of(config), "size": len(config)}
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor | {"mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": [
                {
                    "mediaType": MEDIA_TYPES["gzip"],
                    "digest": digest_of(blob),
                    "size": len(blob),
                    "annotations": {TOC_DIGEST: toc},
                }
                for blob, toc in layers
            ],
        }
        await put_manifest(self.root, "stargz", json.dumps(body).encode())
        self.stargz = [digest_of(blob) for blob, _ in layers]

    async def _put_artifact(self, blob: bytes) -> None:
        """An artifact (a Helm chart's config type): a tag that rootfs/ does not show."""
        await link_blobs(self.root, REPO, [blob])
        descriptor = {"digest": digest_of(blob), "size": len(blob)}
        body = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor | {"mediaType": "application/vnd.cncf.helm.config.v1+json"},
            "layers": [descriptor | {"mediaType": MEDIA_TYPES["tar"]}],
        }
        await put_manifest(self.root, "chart", json.dumps(body).encode())

    def unpack(self, tag: str) -> Path:
        """`umoci unpack` of the tag, once per module."""
        if tag not in self.unpacked:
            self.unpacked[tag] = umoci_unpack(self.layout, tag, self.bundles / tag)
        return self.unpacked[tag]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    base = tmp_path_factory.mktemp("rootfs")
    built = Images(base)
    built.build(base / "registry")
    return built


def start_mount(images: Images, where: Path, *args: str) -> Mount:
    """A mount of the module's root whose index cache is the module's (XDG_CACHE_HOME)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(images.cache))
        m = Mount(str(images.root), where / "mnt", where / "regfs.log", list(args), False)
        try:
            return m.start()
        except BaseException:
            m.stop()
            raise


@pytest.fixture(scope="module")
def mounted(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    m = start_mount(images, tmp_path_factory.mktemp("mount"))
    try:
        yield m
    finally:
        m.stop()
        m.check_log()


def rootfs(m: Mount, *parts: str) -> Path:
    return m.path(*REPO.split("/"), "rootfs", *parts)


def view_tree(path: Path) -> Tree:
    """tree_of_dir of a mounted image root, without the two xattrs regfs adds to that root
    (checked on their own)."""
    tree = tree_of_dir(path)
    root = tree.records[""]
    names = {name for name, _ in root.xattrs}
    assert {"user.regfs.index", "user.regfs.digest"} <= names
    shown = tuple((n, v) for n, v in root.xattrs if not n.startswith("user.regfs."))
    records = {**tree.records, "": type(root)(**{**vars(root), "xattrs": shown})}
    return Tree(records, tree.links)


# --------------------------------------------------------------------------- the same tree


@pytest.mark.parametrize(
    ("tag", "reference"), [("v1", "v1"), ("v1-tar", "v1-tar"), ("v1-zstd", "v1"), ("v2", "v2")]
)
def test_rootfs_equals_umoci_unpack(images, mounted, tag, reference):
    """Same paths, types, modes, owners, sizes, link targets, device numbers, xattrs,
    sha256 of every file, link counts, mtimes and hard-link groups (zstd against its gzip
    twin: umoci 0.4.7 cannot unpack zstd)."""
    expected = tree_of_dir(images.unpack(reference))
    run("ls", rootfs(mounted, tag))  # the first listing indexes and merges the image
    actual = view_tree(rootfs(mounted, tag))
    assert differences(expected, actual) == []
    assert actual == expected
    links = {frozenset({"usr/bin/tool", "usr/bin/tool-link"})}
    assert links <= actual.links and actual.records["keep"].sha256 == digest_of(b"v0")


def test_listing_and_names(images, mounted):
    """rootfs/ lists nothing and answers every image's tag and digest (autofs without
    `browse`): see test_find_du_and_grep_of_the_mount_index_no_image."""
    assert "rootfs" in os.listdir(mounted.path(*REPO.split("/")))
    assert os.listdir(rootfs(mounted)) == []
    # Tags that are images (the bad ones too: they are found, and fail when entered).
    for tag in [*images.built, "multi", "stargz", *images.bad]:
        assert rootfs(mounted, tag).is_dir(), tag
    digest = images.built["v1"].digest
    assert (rootfs(mounted, digest) / "etc" / "os-release").read_bytes() == b"ID=test\nVERSION=1\n"
    assert not rootfs(mounted, "nosuchtag").exists()
    assert "chart" in os.listdir(mounted.path(*REPO.split("/"), "tags"))
    assert not rootfs(mounted, "chart").exists()  # an artifact: no root filesystem
    st = os.lstat(rootfs(mounted, "v1", "usr", "bin", "tool"))
    link = os.lstat(rootfs(mounted, "v1", "usr", "bin", "tool-link"))
    assert (st.st_ino, st.st_nlink) == (link.st_ino, 2)
    assert os.readlink(rootfs(mounted, "v1", "etc", "abs")) == "/etc/os-release"
    assert os.readlink(rootfs(mounted, "v1", "bin")) == "usr/bin"


def test_everyday_tools(images, mounted, tmp_path):
    v1 = rootfs(mounted, "v1")
    unpacked = images.unpack("v1")
    assert run("cat", v1 / "etc" / "os-release").stdout == b"ID=test\nVERSION=1\n"
    assert run("cat", v1 / "usr" / "bin" / "big").stdout == BIG
    assert run("cat", v1 / "bin" / "tool").stdout == b"#!/bin/sh\necho tool\n"  # through a symlink
    found = run("find", v1, "-printf", "%P %y %m %U:%G\n").stdout.splitlines()
    want = run("find", unpacked, "-printf", "%P %y %m %U:%G\n").stdout.splitlines()
    assert sorted(found) == sorted(want)

    def ls_ln(root: Path) -> list[bytes]:
        """`ls -ln` of two directories, paths relative, without `total` (blocks differ)."""
        out = run("ls", "-ln", "--time-style=+%s", root / "usr" / "bin", root / "dev").stdout
        return [line for line in out.replace(bytes(root), b"").splitlines() if b"total" not in line]

    listing = ls_ln(v1)
    assert listing == ls_ln(unpacked)
    assert any(line.startswith(b"-rwsr-xr-x 2 1000 1000") for line in listing)
    grep = run("grep", "-r", "VERSION", v1 / "etc").stdout.decode()
    assert grep.strip() == f"{v1}/etc/os-release:VERSION=1"
    # cp -a of one directory out of the mount: the same tree as umoci's.
    run("cp", "-a", v1 / "usr", tmp_path / "usr")
    assert differences(tree_of_dir(unpacked / "usr"), tree_of_dir(tmp_path / "usr")) == []

    # diff -r between two versions says what it says of the two unpacked trees (devices left
    # out: diff reports a fifo, or a device, depending on what it finds of its inode).
    def diff(old: Path, new: Path) -> list[str]:
        result = run("diff", "-r", "--no-dereference", old, new, check=False)
        assert result.returncode == 1, result.stderr
        text = result.stdout.decode().replace(f"{old}/", "OLD/").replace(f"{new}/", "NEW/")
        return text.replace(f"{old}:", "OLD:").replace(f"{new}:", "NEW:").splitlines()

    lines = diff(v1 / "etc", rootfs(mounted, "v2", "etc"))
    assert lines == diff(unpacked / "etc", images.unpack("v2") / "etc")
    assert "< VERSION=1" in lines and "> VERSION=2" in lines
    assert {"Only in NEW: added", "Only in OLD: motd"} <= set(lines)
    out = run("getfattr", "--only-values", "-n", "user.regfs.index", v1).stdout.decode()
    assert out.startswith("indexed: 3 layers")
    assert run("getfattr", "--only-values", "-n", "user.a", v1 / "xattr.txt").stdout == b"1"


def test_ls_l_asks_no_label_or_acl_per_file(images, tmp_path):
    """`ls -l` asks every file for its SELinux label and its ACL. A view's file without
    them answers "not supported" (as the registry's files do; rootfs/ shows no label), and
    ls stops asking for the rest of the mount: with "no such attribute" it made two round
    trips per file. A file whose tar carries an ACL shows it, to ls too. And below an
    image's root the kernel keeps every name (immutable), and the root's name, which moves
    with the tag, for 0.1 s: a second `ls -lR` looks up nothing but that name, about once
    per 0.1 s (with an entry timeout of 0, once per path it walks: 43 for these 36 files)."""
    m = start_mount(images, tmp_path, "--debug")
    try:
        root = rootfs(m, "v1")
        run("ls", root)  # the image is built first
        for _ in range(2):
            start = len(m.log_text())
            began = time.monotonic()
            listed = run("ls", "-lR", root).stdout.decode().splitlines()
            took = time.monotonic() - began
            asked = m.log_text()[start:].count("wrapper: getxattr(")
            assert len(listed) > 30 and asked <= 4, asked
        looked_up = re.findall(r"wrapper: lookup\(\d+, b'(.*?)'\)", m.log_text()[start:])
        assert set(looked_up) <= {"v1"}, looked_up
        assert len(looked_up) <= 2 + 2 * int(took / 0.1), (looked_up, took)
        motd = root / "etc" / "motd"
        for name in ("security.selinux", "system.posix_acl_access"):
            assert errno_of(partial(os.getxattr, motd, name)) == errno.EOPNOTSUPP
        assert errno_of(partial(os.getxattr, root / "xattr.txt", "user.b")) == errno.ENODATA
        assert os.getxattr(root / "acl.txt", "system.posix_acl_access") == ACL
        assert run("ls", "-l", root / "acl.txt").stdout.split()[0].endswith(b"+")
    finally:
        m.stop()
    m.check_log()


@pytest.mark.skipif(not fusefeatures.READDIR_ENDED, reason="a pyfuse3 without readdir_ended")
def test_a_cold_find_reaches_readdir_once_per_directory(images, tmp_path):
    """Linux reads a listing until a READDIR answers nothing: two READDIRs per directory.
    The second of an image's directory (which never changes) is answered in pyfuse3's C
    callback (`readdir_ended`), so a cold `find` reaches `readdir` once per directory, at
    offset 0 (before 834dd61: once more each, at its end), and finds what umoci unpacked."""
    m = start_mount(images, tmp_path, "--debug")
    try:
        start = len(m.log_text())
        found = run("find", rootfs(m, "v1")).stdout.splitlines()
        asked = re.findall(r" DEBUG \S+\.wrapper: readdir\(\d+, (\d+),", m.log_text()[start:])
    finally:
        m.stop()
    m.check_log()
    unpacked = images.unpack("v1")
    directories = run("find", unpacked, "-type", "d").stdout.splitlines()
    assert len(found) == len(run("find", unpacked).stdout.splitlines()) > len(directories) > 5
    assert asked == ["0"] * len(directories)


def test_device_nodes_are_shown_not_opened(mounted):
    """nodev, nosuid: an image's device nodes and setuid files keep no power on the host."""
    dev = rootfs(mounted, "v1", "dev")
    st = os.lstat(dev / "sda")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (8, 0)
    with pytest.raises(PermissionError):
        open(dev / "null", "rb").close()
    options = [
        line.split()[3]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1] == str(mounted.mountpoint)
    ]
    assert {"nosuid", "nodev"} <= set(options[0].split(","))


def test_writes_are_refused(mounted):
    v1 = rootfs(mounted, "v1")
    for args in (
        ["touch", v1 / "new"],
        ["touch", v1 / "etc" / "os-release"],
        ["rm", v1 / "etc" / "motd"],
        ["mkdir", v1 / "newdir"],
        ["ln", "-s", "x", v1 / "link"],
        ["mv", v1 / "target", v1 / "moved"],
        ["chmod", "600", v1 / "target"],
        ["setfattr", "-n", "user.x", "-v", "1", v1 / "target"],
    ):
        result = run(*args, check=False)
        assert result.returncode != 0 and b"Operation not permitted" in result.stderr, args
    with pytest.raises(PermissionError) as caught:
        open(v1 / "etc" / "os-release", "r+b").close()
    assert caught.value.errno == errno.EPERM
    assert (v1 / "etc" / "os-release").read_bytes() == b"ID=test\nVERSION=1\n"


def test_a_read_only_mount_answers_erofs(images, tmp_path):
    with Mount(str(images.root), tmp_path / "mnt", tmp_path / "regfs.log", ["--read-only"]) as m:
        v1 = rootfs(m, "v1-tar")
        for args in (["touch", v1 / "new"], ["rm", v1 / "etc" / "motd"], ["mkdir", v1 / "d"]):
            result = run(*args, check=False)
            assert b"Read-only file system" in result.stderr, args
        assert (v1 / "etc" / "motd").read_bytes() == b"hello\n"


# --------------------------------------------------------------------------- an image index


def test_an_index_shows_one_directory_per_platform(mounted):
    multi = rootfs(mounted, "multi")
    assert sorted(os.listdir(multi)) == ["linux-amd64", "linux-arm-v7"]  # no attestation
    assert (multi / "linux-amd64" / "etc" / "os-release").read_bytes().endswith(b"VERSION=1\n")
    assert (multi / "linux-arm-v7" / "etc" / "os-release").read_bytes().endswith(b"VERSION=2\n")
    assert run("getfattr", "--only-values", "-n", "user.regfs.digest", multi).stdout.startswith(
        b"sha256:"
    )


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("notatar", "not a tar"),
        ("cutgzip", "gzip|end of data"),
        ("baddigest", "hash to"),
        ("badmerge", "'nothing', which does not exist"),
    ],
)
def test_a_bad_layer_is_eio_for_its_image_only(images, mounted, tag, reason):
    with pytest.raises(OSError) as caught:
        os.listdir(rootfs(mounted, tag))
    assert caught.value.errno == errno.EIO
    with pytest.raises(OSError) as again:  # the outcome is kept: no second pass
        os.stat(rootfs(mounted, tag, "etc"))
    assert again.value.errno == errno.EIO
    layer = images.bad[tag]
    wait_until(lambda: layer in mounted.log_text(), 5, "the log line")
    lines = [line for line in mounted.log_text().splitlines() if layer in line and "ERROR" in line]
    assert lines and re.search(reason, lines[0].lower()), lines
    status = run("getfattr", "--only-values", "-n", "user.regfs.index", rootfs(mounted, tag))
    assert status.stdout.startswith(b"failed: ") and layer.encode() in status.stdout
    # The rest of the mount keeps working.
    assert (rootfs(mounted, "v1", "etc", "motd")).read_bytes() == b"hello\n"
    assert mounted.pids()


# --------------------------------------------------------------------------- other sources


@pytest.mark.remote
def test_a_remote_mount_shows_the_same_tree(images, mounted, tmp_path):
    """The same images served by docker-registry over HTTP: the same tree, read by Range."""
    with (
        RegistryServer(images.root, workdir=tmp_path / "registry") as server,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh cache: a pass
        with Mount(server.url, tmp_path / "mnt", tmp_path / "regfs.log") as remote:
            for tag in ("v1", "v1-zstd"):
                run("ls", rootfs(remote, tag))
                assert view_tree(rootfs(remote, tag)) == view_tree(rootfs(mounted, tag))
            assert "indexing layer" in remote.log_text()


@contextlib.contextmanager
def proxied_mount(images: Images, tmp_path: Path) -> Iterator[tuple[Mount, FaultServer]]:
    """A mount of the images over HTTP through a FaultServer (which records each request),
    with the module mount's index cache: no pass."""
    with (
        RegistryServer(images.root, workdir=tmp_path / "registry") as server,
        FaultServer(upstream=server.url) as proxy,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("XDG_CACHE_HOME", str(images.cache))  # the module mount's
        with Mount(proxy.url, tmp_path / "mnt", tmp_path / "regfs.log") as remote:
            yield remote, proxy


@pytest.mark.remote
def test_a_remote_image_opens_its_layers_with_no_request(images, mounted, tmp_path):
    """Over HTTP a layer is opened with the size its manifest's descriptor gives: no HEAD
    of its blob (it cost one per layer while the image was built, before stop 27, i). So
    `ls` of an image (a build, no read) asks nothing of its blobs, and a `cat` after it
    only GETs bytes."""
    run("ls", rootfs(mounted, "v1-tar"))  # its indexes are in the session's cache: no pass

    def blob_requests(method: str, since: int = 0) -> list[str]:
        seen = proxy.seen[since:]
        return [
            s.path.rsplit("/", 1)[1] for s in seen if s.method == method and "/blobs/" in s.path
        ]

    with proxied_mount(images, tmp_path) as (remote, proxy):
        run("ls", rootfs(remote, "v1-tar"))
        before = len(proxy.seen)
        assert rootfs(remote, "v1-tar", "etc", "motd").read_bytes() == b"hello\n"
        assert blob_requests("GET", before) and not blob_requests("HEAD")
        assert "indexing layer" not in remote.log_text()


@pytest.mark.remote
def test_a_layer_the_registry_lacks_fails_the_read_that_needs_it(images, mounted, tmp_path):
    """With no HEAD to open a layer, a blob the registry answers 404 for (its index kept)
    is found by the read's GET: that read fails with EIO (as after a HEAD's 404), logged,
    and the mount goes on reading other images."""
    run("ls", rootfs(mounted, "v1-tar"), rootfs(mounted, "v1"))  # both indexed: no pass
    layers = json.loads(images.built["v1-tar"].manifest)["layers"]
    with proxied_mount(images, tmp_path) as (remote, proxy):
        for layer in layers:
            proxy.inject(Fault(status=404, method="GET", path=layer["digest"]), times=20)
        with pytest.raises(OSError) as raised:
            rootfs(remote, "v1-tar", "etc", "motd").read_bytes()
        assert raised.value.errno == errno.EIO
        logged = remote.log_text()
        assert any(f"blobs/{d['digest']}: 404" in logged for d in layers), logged  # named
        assert rootfs(remote, "v1", "etc", "motd").read_bytes()  # other layers: read


def index_status(root: Path) -> str:
    return run("getfattr", "--only-values", "-n", "user.regfs.index", root).stdout.decode()


@contextlib.contextmanager
def held_up_mount(images: Images, tmp_path: Path, layer: str, delay: float) -> Iterator[Mount]:
    """A mount of the images over HTTP, with no index cache yet, whose registry holds back
    the GET of `layer` for `delay` seconds (then 503) each time; the mount stops first."""
    with (
        RegistryServer(images.root, workdir=tmp_path / "registry") as server,
        FaultServer(upstream=server.url) as proxy,
        pytest.MonkeyPatch.context() as patch,
        contextlib.ExitStack() as stack,
    ):
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no index yet: a pass
        m = stack.enter_context(Mount(proxy.url, tmp_path / "mnt", tmp_path / "regfs.log"))
        proxy.inject(Fault(status=503, delay=delay, method="GET", path=layer))
        yield m


@pytest.mark.remote
def test_getfattr_tells_how_far_indexing_is(images, tmp_path):
    """A layer whose GET the registry holds back for 3 s: while a `cat` waits for the index,
    user.regfs.index on the image's root names the layer being indexed."""
    layer = json.loads(images.built["v2"].manifest)["layers"][0]["digest"]
    with held_up_mount(images, tmp_path, layer, 3) as m:
        root = rootfs(m, "v2")
        assert index_status(root).startswith("not indexed yet: 4 layers")
        with subprocess.Popen(["cat", root / "etc" / "added"], stdout=subprocess.PIPE) as cat:
            wait_until(lambda: "indexing" in index_status(root), 10, "the pass to start")
            status = index_status(root)
            assert status.startswith("indexing: 0 of 4 layers indexed"), status
            assert f"{layer}: indexing" in status, status
            assert cat.communicate(timeout=60)[0] == b""
            assert cat.returncode == 0
        assert index_status(root).startswith("indexed: 4 layers")


# --------------------------------------------------------------------------- the index cache


def test_a_second_mount_reuses_the_index_cache(images, mounted, tmp_path):
    """The module's mount indexed v1-tar's layers and kept its merged tree; another mount
    with the same cache makes no pass at all (the indexer logs each pass), loads the tree
    instead of merging, and shows the same tree."""
    run("ls", rootfs(mounted, "v1-tar"))
    passes = [line for line in mounted.log_text().splitlines() if "indexing layer" in line]
    layers = [d["digest"] for d in json.loads(images.built["v1-tar"].manifest)["layers"]]
    assert set(layers) <= {word for line in passes for word in line.split()}
    kept = images.cache / "regfs" / "index" / f"{treefile.key(layers)}.tree"
    wait_until(kept.exists, what="the merged tree kept")  # stored once the listing went
    second = start_mount(images, tmp_path)
    try:
        expected = view_tree(rootfs(mounted, "v1-tar"))
        assert view_tree(rootfs(second, "v1-tar")) == expected
        assert "indexing layer" not in second.log_text()
        assert "merged before (the tree kept)" in second.log_text()
    finally:
        second.stop()
    second.check_log()


def test_an_unsafe_cache_directory_is_not_used(images, tmp_path):
    """A cache directory whose parent anyone may write could be swapped for another's: the
    mount says so and keeps its indexes in a private directory that goes with it."""
    shared = tmp_path / "xdg"
    (shared / "regfs").mkdir(parents=True)
    (shared / "regfs").chmod(0o777)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(shared))
        m = Mount(str(images.root), tmp_path / "mnt", tmp_path / "regfs.log")
        with m:
            assert rootfs(m, "v1-tar", "etc", "motd").read_bytes() == b"hello\n"
            line = next(s for s in m.log_text().splitlines() if "this mount only" in s)
            private = Path(line.rsplit("(", 1)[1].rstrip(")"))
            assert "WARNING" in line and private.is_dir()
            assert (private.stat().st_mode & 0o777) == 0o700
    assert not private.exists()
    assert not (shared / "regfs" / "index").exists() or not os.listdir(shared / "regfs" / "index")


def test_a_layer_in_use_reads_on_when_the_index_cache_evicts_it(images, tmp_path):
    """`--index-cache-size` with room for the first image's entry alone: indexing a second
    image evicts the first's entry while its tree is in memory. Its one-frame zstd layer is
    read from the re-framed copy, which that eviction used to remove: every open of its
    files then failed (ENOENT, the copy's FileNotFoundError let through) until the image
    left memory. The copy is held by the index and stays until then, and the bound is
    logged as passed."""
    v1 = images.built["v1"]
    config = v1.blob(json.loads(v1.manifest)["config"]["digest"])
    big = random.Random(17).randbytes(6 << 20)  # one zstd frame past REFRAME_ABOVE
    zstd = compress(layer_tar([directory("."), file("big", big), file("small", b"z\n")]), "zstd")
    other = compress(layer_tar([directory("."), file("small", b"g\n"), file("big", big)]), "gzip")
    root = tmp_path / "root"
    trio.run(put_image, root, "zstd", config, [zstd], MEDIA_TYPES["zstd"])
    trio.run(put_image, root, "gzip", config, [other], MEDIA_TYPES["gzip"])
    cache = tmp_path / "xdg" / "regfs" / "index"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        with Mount(str(root), tmp_path / "mnt", tmp_path / "first.log") as m:
            run("ls", rootfs(m, "zstd"))  # indexed, the copy made: how big its entry is
        bound = str(sum(p.stat().st_size for p in cache.iterdir()))
        m = Mount(
            str(root), tmp_path / "mnt", tmp_path / "regfs.log", ["--index-cache-size", bound]
        )
        with m:
            run("ls", rootfs(m, "zstd"))  # loaded, the copy held
            run("ls", rootfs(m, "gzip"))  # indexed: everything else is evicted that may be
            assert (cache / f"{digest_of(zstd).split(':')[1]}.zst").is_file()  # in use
            assert rootfs(m, "zstd", "big").read_bytes() == big
            assert rootfs(m, "zstd", "small").read_bytes() == b"z\n"
            assert f"past its bound of {bound}: the rest is in use" in m.log_text()
    m.check_log()


async def test_only_the_last_merged_trees_are_kept(images, tmp_path, caplog):
    """In the daemon's view (no FUSE): with room for two trees, a third image drops the
    least recently used one, which is merged again from the kept indexes, with no pass."""
    registry = Registry(FilesystemDriver(images.root))
    view = RootfsView(registry, IndexCache(tmp_path / "index"), 5.0, max_images=2)
    try:
        section = SectionNode(REPO, "rootfs")
        roots = [await view.lookup(section, tag) for tag in ("v1", "v1-tar", "v2")]
        for root in roots:
            assert "etc" in [name for name, _ in await view.children(root)]
        passes = view.indexer.passes
        with caplog.at_level(logging.INFO, logger="regfs.rootfs"):
            for root in reversed(roots):  # v2 and v1-tar are kept, v1 is merged again
                assert "etc" in [name for name, _ in await view.children(root)]
        merged = [r.getMessage() for r in caplog.records if "merged" in r.getMessage()]
        assert len(merged) == 1 and images.built["v1"].digest in merged[0]
        assert view.indexer.passes == passes
    finally:
        await view.aclose()


async def test_a_name_that_is_not_utf8_is_not_listed(tmp_path, caplog):
    """In the daemon's view (no FUSE): a directory listed with its entries' attributes
    shows every name but those whose bytes are not UTF-8 (logged), and its entries the
    inodes and attributes a lookup and a stat of each give."""
    tar = layer_tar(
        [
            directory("plain"),
            file("plain/é", b"1"),
            symlink("plain/s", "é"),
            directory("mixed"),
            file("mixed/ok", b"22"),
            file(os.fsdecode(b"mixed/bad\xff"), b"333"),
        ]
    )
    await link_blobs(tmp_path, REPO, [CONFIG, tar])
    await put_tagged(tmp_path, REPO, "t", image_manifest(CONFIG, [tar]))
    view = RootfsView(Registry(FilesystemDriver(tmp_path)), IndexCache(tmp_path / "index"), 5.0)
    try:
        root = await view.lookup(SectionNode(REPO, "rootfs"), "t")
        with caplog.at_level(logging.INFO, logger="regfs.rootfs"):
            listed = {}
            for name in ("plain", "mixed"):
                directory_node = await view.lookup(root, name)
                listing = await view.children(directory_node)
                assert isinstance(listing, Listing) and listing.rows is not None
                assert listing.encoded == [n.encode() for n, _ in listing]
                listed[name] = [n for n, _ in listing]
                for i, (entry, node) in enumerate(listing):
                    assert node == await view.lookup(directory_node, entry)
                    row = listing.rows[i * PACKED : (i + 1) * PACKED].tolist()
                    assert row == packed_row(await view.attr(node))
        assert listed == {"plain": ["s", "é"], "mixed": ["ok"]}
        assert "not UTF-8" in caplog.text and "bad" in caplog.text
    finally:
        await view.aclose()


def packed_row(attr: Attr) -> list[int]:
    """What stat shows of a fixed file's attr, field by field, in `PACKED_FIELDS` order."""
    blksize = 4096 if stat.S_ISDIR(attr.mode or 0) else 1 << 20
    shown = {"st_mode": attr.mode, "st_nlink": attr.nlink, "st_uid": attr.uid,
             "st_gid": attr.gid, "st_rdev": attr.rdev, "st_size": attr.size,
             "st_blocks": (attr.size + 511) // 512, "st_blksize": blksize}  # fmt: skip
    times = {f"st_{t}time_ns": attr.mtime_ns for t in "amc"}
    return [(shown | times)[name] for name in fusefeatures.PACKED_FIELDS]


async def test_a_big_directory_is_listed_with_no_collection(tmp_path):
    """Listing an image's directory makes two tracked objects an entry: one of more than
    PAUSE_GC_AT entries sets off no cyclic collection while it is made (a cold `find`
    lists every directory once); the GC is on again after, and one young collection walks
    the listing's objects once (made without the pause: 4 here)."""
    tar = layer_tar([directory("big"), *(file(f"big/f{i:04}", b"") for i in range(1000))])
    await link_blobs(tmp_path, REPO, [CONFIG, tar])
    await put_tagged(tmp_path, REPO, "t", image_manifest(CONFIG, [tar]))
    view = RootfsView(Registry(FilesystemDriver(tmp_path)), IndexCache(tmp_path / "index"), 5.0)
    started: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    try:
        big = await view.lookup(await view.lookup(SectionNode(REPO, "rootfs"), "t"), "big")
        assert len(await view.children(big)) == 1000 > PAUSE_GC_AT  # built: no merge below
        gc.collect()
        gc.callbacks.append(count)
        try:
            listing = await view.children(big)
        finally:
            gc.callbacks.remove(count)
        assert len(listing) == 1000 and started in ([], [0]) and gc.isenabled()
    finally:
        await view.aclose()


def test_a_tag_that_moves_shows_the_new_image(images, mounted):
    """The kernel keeps rootfs/<tag> for 0.1 s, and every change of a tag through the mount
    (written, mv onto it, rm) returns only once that entry has expired: the next path walk,
    however soon, reaches the new image (fails without the wait). A tag moved by someone else
    is followed once the daemon reads it again (tag_ttl, SIGHUP)."""
    repo = mounted.path(*REPO.split("/"))
    tag, spare = repo / "tags" / "moving", repo / "tags" / "spare"
    release = rootfs(mounted, "moving", "etc", "os-release")
    shown = {"v1": b"ID=test\nVERSION=1\n", "v2": b"ID=test\nVERSION=2\n"}
    run("cp", repo / "manifests" / images.built["v2"].digest, tag)
    assert release.read_bytes() == shown["v2"]
    run("cp", repo / "manifests" / images.built["v1"].digest, tag)
    assert release.read_bytes() == shown["v1"]
    assert not rootfs(mounted, "moving", "etc", "added").exists()
    # Each change right after a walk that handed the kernel rootfs/moving (a few ms apart).
    for name in ("v2", "v1", "v2"):
        tag.write_bytes(images.built[name].manifest)
        assert release.read_bytes() == shown[name]
    spare.write_bytes(images.built["v1"].manifest)
    assert release.read_bytes() == shown["v2"]
    os.rename(spare, tag)
    assert release.read_bytes() == shown["v1"]
    os.unlink(tag)
    assert errno_of(release.read_bytes) == errno.ENOENT
    tag.write_bytes(images.built["v1"].manifest)
    assert release.read_bytes() == shown["v1"]
    # Moved behind the mount's back (through storage/): seen after SIGHUP.
    trio.run(put_manifest, images.root, "moving", images.built["v2"].manifest)
    for pid in mounted.pids():
        os.kill(pid, signal.SIGHUP)
    wait_until(lambda: release.read_bytes() == b"ID=test\nVERSION=2\n", 10, "the new image")


def test_kill_9_mid_tag_write_with_a_walk_below_it_frees_clients_and_mount(images, tmp_path):
    """A tag written through the mount waits (a plain sleep) for the kernel's rootfs/<tag>
    entries to expire. kill -9 while `cp` writes that tag in a loop and `ls -lR` walks below
    rootfs/<tag>: both clients fail at once with a dead connection, none hangs, and the
    mountpoint takes a new mount."""
    manifests = {}
    for name in ("v1", "v2"):
        manifests[name] = tmp_path / f"{name}.json"
        manifests[name].write_bytes(images.built[name].manifest)
    m = start_mount(images, tmp_path / "first")
    try:
        tag = m.path(*REPO.split("/"), "tags", "killed")
        tag.write_bytes(images.built["v1"].manifest)
        listed, written = tmp_path / "listed", tmp_path / "written"
        scripts = {
            "ls": listing_loop(rootfs(m, "killed"), listed, "-lR"),
            "cp": f'while cp "{manifests["v2"]}" "{tag}" && cp "{manifests["v1"]}" "{tag}"; do'
            f' echo >> "{written}"; done; exit 1',
        }

        def under_way() -> bool:
            return listed.exists() and written.exists() and len(written.read_bytes()) >= 2

        kill_mid(m, scripts, under_way)
    finally:
        m.stop()
    again = start_mount(images, tmp_path / "first")  # the same mountpoint
    try:
        assert (rootfs(again, "killed") / "etc" / "os-release").read_bytes().startswith(b"ID=test")
        os.unlink(again.path(*REPO.split("/"), "tags", "killed"))
    finally:
        again.stop()
        again.check_log()


@pytest.mark.remote
def test_sigterm_during_a_pass_unmounts_at_once(images, tmp_path):
    """A pass held up by the registry (10 s) does not hold up an unmount: the build is
    cancelled, the request waiting for it gets EIO, the daemon exits cleanly."""
    layer = json.loads(images.built["v1"].manifest)["layers"][1]["digest"]
    with held_up_mount(images, tmp_path, layer, 10) as m:
        root = rootfs(m, "v1")
        with subprocess.Popen(["cat", root / "etc" / "motd"], stderr=subprocess.PIPE) as cat:
            wait_until(lambda: "indexing" in index_status(root), 10, "the pass to start")
            wait_until(lambda: layer in index_status(root), 10, "the held-up layer")
            started = time.monotonic()
            for pid in m.pids():
                os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not m.pids(), 5, "the daemon to exit")
            assert time.monotonic() - started < 5
            _, err = cat.communicate(timeout=10)
            assert cat.returncode != 0 and b"Input/output error" in err
        assert "the mount is going away" in m.log_text()


def test_find_du_and_grep_of_the_mount_index_no_image(images, mounted):
    """A walk of the whole mount (find, du, grep -r) sees the registry's files only: it
    does not enter rootfs/, so it starts no index or merge of any image (each would read
    and decompress every layer) and counts no image file on top of the blobs."""
    built = mounted.log_text().count("rootfs: image ")
    found = run("find", mounted.mountpoint).stdout.decode().splitlines()
    assert rootfs(mounted).as_posix() in found
    assert not [f for f in found if "/rootfs/" in f]
    total = run("du", "-sb", mounted.mountpoint).stdout.decode().split()[0]
    files = [Path(f) for f in found if Path(f).is_file()]  # directories show size 0
    assert int(total) == sum(f.stat().st_size for f in files)
    run("grep", "-rq", "ID=test", mounted.mountpoint, check=False)
    assert mounted.log_text().count("rootfs: image ") == built


def test_a_tag_that_cannot_be_read_is_an_error_for_itself_only(images, mounted):
    """One tag whose link is garbage (damage): its image is EIO, the others work."""
    name, image = "library/damaged", images.built["v1-tar"]
    manifest = json.loads(image.manifest)
    blobs = [image.blob(d["digest"]) for d in [manifest["config"], *manifest["layers"]]]
    trio.run(link_blobs, images.root, name, blobs)
    for tag in ("good", "bad"):
        trio.run(put_manifest_in, images.root, name, tag, image.manifest)
    link = v2_root(images.root) / "repositories" / name / "_manifests/tags/bad/current/link"
    link.write_bytes(b"garbage")
    section = mounted.path(*name.split("/"), "rootfs")
    assert os.listdir(section) == []
    assert (section / "good" / "etc" / "motd").read_bytes() == b"hello\n"
    assert errno_of(lambda: os.stat(section / "bad")) == errno.EIO


def test_an_estargz_image_is_read_from_its_tocs(images, mounted):
    """Layers with a TOC the manifest vouches for: no pass, and the tree of the same layers
    as plain tar plus what any runtime unpacking the tar.gz makes of it: the top layer's
    `stargz.index.json` (a real tar entry; stargz-snapshotter alone hides it)."""
    run("ls", rootfs(mounted, "stargz"))
    expected, actual = view_tree(rootfs(mounted, "v1-tar")), view_tree(rootfs(mounted, "stargz"))
    toc = actual.records.pop("stargz.index.json")
    assert (toc.type, toc.mode) == ("file", 0o644)
    assert differences(expected, actual) == []
    log = mounted.log_text()
    for layer in images.stargz:
        assert f"layer {layer}: " in log and "from its eStargz TOC" in log
        assert f"indexing layer {layer}" not in log


async def test_an_image_directory_is_handed_alike_in_bulk_and_one_by_one(tmp_path, monkeypatch):
    """In the daemon's operations (no FUSE): readdirplus of an image's directory hands the
    same names, inodes, attributes, timeouts and offsets whether its entries go in runs of
    `readdir_reply_many` or, on a pyfuse3 without it, one `readdir_reply` each; each with
    one lookup counted, and each directory's entry kept for its GETATTRs."""
    tar = layer_tar(
        [
            directory("d", mode=0o750, uid=3, gid=4),
            file("d/a", b"x" * 513, mode=0o4755),
            hardlink("d/b", "d/a"),
            symlink("d/s", "a"),
            device("d/null", Kind.CHAR, 1, 3),
            directory("d/sub"),
            file("d/sub/f", b""),
        ]
    )
    await link_blobs(tmp_path, REPO, [CONFIG, tar])
    await put_tagged(tmp_path, REPO, "t", image_manifest(CONFIG, [tar]))
    handed: list[tuple[object, ...]] = []

    def reply(token, name, entry, next_id, lookup=True):
        handed.append((name, entry.st_ino, *_fields(entry), entry.attr_timeout, next_id, lookup))
        return True

    def reply_many(token, names, inodes, fields, template, base, start, stop, lookup=True):
        for i in range(start, stop):
            row = tuple(fields[i * PACKED : (i + 1) * PACKED])
            handed.append((names[i], inodes[i], *row, template.attr_timeout, base + i + 1, lookup))
        return stop

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    monkeypatch.setattr(pyfuse3, "readdir_reply_many", reply_many, raising=False)
    monkeypatch.setattr(pyfuse3, "readdir_ended", lambda token, next_id: None, raising=False)
    shown = {}
    for bulk in (True, False):
        monkeypatch.setattr(fusefeatures, "REPLY_MANY", bulk)
        view = RootfsView(Registry(FilesystemDriver(tmp_path)), IndexCache(tmp_path / "ix"), 5.0)
        options = MountOptions(str(tmp_path), "/mnt")
        ops = Operations(RegfsTree(view.registry, 5.0, views={"rootfs": view}), options)
        try:
            inode = pyfuse3.ROOT_INODE
            for name in (*REPO.split("/"), "rootfs", "t", "d"):
                inode = (await ops.lookup(inode, name.encode(), None)).st_ino
            handed.clear()
            await ops.readdir(inode, 0, ReaddirTokenFor(inode))
            dots, handed[:2] = handed[:2], []  # "." and "..": the kernel takes no lookup
            assert [(name, lookup) for name, *_, lookup in dots] == [(b".", False), (b"..", False)]
            counts = {ino: ops.inodes._lookups[ino] for _, ino, *_ in handed}
            fixed = [ops.inodes.fixed(ino) for _, ino, *_ in handed]
            kept = [_fields(entry) for entry in fixed if entry is not None]
            shown[bulk] = (list(handed), counts, kept)
        finally:
            await view.aclose()
    assert shown[True] == shown[False]
    names = [entry[0] for entry in shown[True][0]]
    assert names == [b"a", b"b", b"null", b"s", b"sub"] and len(shown[True][2]) == 1
    assert set(shown[True][1].values()) == {1, 2}  # a and b: one inode, a lookup each


class ReaddirTokenFor:
    """What `Operations.readdir` reads of a token: the directory's inode, and that the
    kernel asked a READDIRPLUS (entries with their attributes)."""

    def __init__(self, inode: int) -> None:
        self.inode = inode
        self.plus = True


def _fields(entry: pyfuse3.EntryAttributes) -> tuple[int, ...]:
    return tuple(getattr(entry, name) for name in fusefeatures.PACKED_FIELDS)


async def test_an_image_is_packed_once_in_a_worker_thread(tmp_path, monkeypatch):
    """What stat shows of an image's entries is packed at its first listing, off the trio
    thread (an image of millions of entries takes seconds): listings that come meanwhile
    wait for that one packing, and all of them show their entries."""
    tar = layer_tar([directory("d"), file("d/f", b"1"), directory("e"), file("e/g", b"22")])
    await link_blobs(tmp_path, REPO, [CONFIG, tar])
    await put_tagged(tmp_path, REPO, "t", image_manifest(CONFIG, [tar]))
    view = RootfsView(Registry(FilesystemDriver(tmp_path)), IndexCache(tmp_path / "ix"), 5.0)
    threads: list[bool] = []
    packed_rows = rootfs_view._packed_rows

    def counted(tree: object) -> object:
        threads.append(_in_worker())
        time.sleep(0.05)  # the other listings arrive meanwhile
        return packed_rows(tree)

    monkeypatch.setattr(rootfs_view, "_packed_rows", counted)
    try:
        root = await view.lookup(SectionNode(REPO, "rootfs"), "t")
        nodes = [root, await view.lookup(root, "d"), await view.lookup(root, "e")]
        listed: dict[int, list[str]] = {}

        async def list_one(i: int) -> None:
            listed[i] = [name for name, _ in await view.children(nodes[i])]

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(list_one, i)
        assert listed == {0: ["d", "e"], 1: ["f"], 2: ["g"]} and threads == [True]
    finally:
        await view.aclose()


def _in_worker() -> bool:
    """Whether this runs outside the trio thread."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return True
    return False


async def _view_of_one_directory(tmp_path: Path) -> RootfsView:
    """A view of a storage root holding one image, tag `t`: `d/f`."""
    tar = layer_tar([directory("d"), file("d/f", b"1")])
    await link_blobs(tmp_path, REPO, [CONFIG, tar])
    await put_tagged(tmp_path, REPO, "t", image_manifest(CONFIG, [tar]))
    return RootfsView(Registry(FilesystemDriver(tmp_path)), IndexCache(tmp_path / "ix"), 5.0)


async def _list_after_packing_began(view: RootfsView, node: Node, listed: list[list[str]]) -> None:
    """List node once the first listing of its image began packing (20 ms in)."""
    await trio.sleep(0.02)
    listed.append([name for name, _ in await view.children(node)])


async def test_a_packing_that_failed_is_tried_again_by_the_next_listing(tmp_path, monkeypatch):
    """A packing that raised (a bug) fails its own listing only: a listing that waited for
    it packs again, and shows its entries."""
    view = await _view_of_one_directory(tmp_path)
    packed_rows, calls = rootfs_view._packed_rows, []

    def failing_once(tree: object) -> object:
        calls.append(tree)
        time.sleep(0.05)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return packed_rows(tree)

    monkeypatch.setattr(rootfs_view, "_packed_rows", failing_once)
    try:
        root = await view.lookup(SectionNode(REPO, "rootfs"), "t")
        directory_node = await view.lookup(root, "d")
        listed: list[list[str]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_list_after_packing_began, view, directory_node, listed)
            with pytest.raises(RuntimeError):
                await view.children(root)
        assert listed == [["f"]] and len(calls) == 2
    finally:
        await view.aclose()
