"""Review of issue 16 (session 21): the lines of the issue that only an in-process test held
the `rootfs/` view to, held to them again through real mounts of images built with umoci,
pushed with skopeo to docker-registry and compared with `umoci unpack`:

- hard links keep the content they had when their layer was applied, over three layers (a
  link to a link, the target and one name of a pair replaced later, a name whited out);
- odd member names (`./`, `//`, `/./`, `d/../`) land where umoci puts them;
- symlink loops that no member's path goes through are shown as stored, and open as loops;
- `security.capability` (a PAX xattr beyond `user.`), a hard link to a device node;
- Docker's schema 2 (what `docker push` makes) and a Docker manifest list;
- one layer twice in an image is applied twice; a layer two images share is indexed once;
- a sparse member is refused as bad input (umoci 0.4.7 unpacks PAX's: a difference);
- names, ids, times, link targets, devices and xattrs at their edges; a PAX xattr record
  with an empty value, which POSIX says deletes it, sets no xattr (as umoci unpacks it);
  an empty PAX `path` or `linkpath` record leaves the header's own name (POSIX), as umoci;
- reads at random offsets and lengths of a 6 MiB file in a gzip, tar and zstd layer;
- the index cache: kept under `~/.cache` when XDG_CACHE_HOME is unset; `--index-cache-size`
  keeps its bound across mounts; a damaged `.idx` or `.gzi` left by one mount is not trusted
  by the next, which shows the same tree and the same bytes.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import struct
import tarfile
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.images import (
    MTIME,
    Entry,
    build_layered_image,
    device,
    differences,
    directory,
    file,
    hardlink,
    shown_tree,
    symlink,
    tree_of_dir,
    umoci_unpack,
    whiteout,
)
from support.mounts import Mount, mounted_at, wait_until
from support.oci import CommandError, OciImage, new_image, read_oci_layout, skopeo_push
from support.registry import RegistryServer
from support.tools import MIB, errno_of, run

from storage.manifest_format import DOCKER_LIST, DOCKER_MANIFEST
from storage.rootfs import treefile
from storage.rootfs.members import Kind

pytestmark = [pytest.mark.mount, pytest.mark.registry]

REPO = "review/rootfs"
BIG = random.Random(21).randbytes(6 * MIB)  # a gzip layer of several seek points

# security.capability as `setcap cap_net_raw+ep` writes it (vfs_cap_data, revision 2): a
# file capability, which real images carry (ping) and a tar keeps as a PAX xattr.
CAP = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
SPARSE_FORMS = ("gnu", "posix")
EMPTY_RECORDS = ("path", "linkpath")
SPARSE_SIZE, SPARSE_DATA = 4 * MIB, random.Random(5).randbytes(8192)
BASE = [
    directory("."),
    file("target", b"v0"),
    file("other", b"o0"),
    file("solo", b"s0"),
    directory("d"),
    file("d/in", b"in0"),
]
IMAGES: dict[str, list[list[Entry]]] = {
    "links": [
        BASE,
        [
            hardlink("keep", "target"),  # cross-layer: the content target has now (v0)
            hardlink("chain", "keep"),  # a link to a link made in this layer
            hardlink("twin", "other"),
            hardlink("solo2", "solo"),
            hardlink("moved", "d/in"),
        ],
        [
            file("target", b"v2"),  # replaced after: keep and chain stay v0
            file("twin", b"t2"),  # one name of a pair replaced: other stays o0
            whiteout("solo"),  # one name of a pair whited out: solo2 stays
            file("d", b"d2"),  # the directory of a link's target, now a file: moved stays
        ],
    ],
    "shared": [BASE, [file("extra", b"extra")]],  # BASE's layer, the same blob as links'
    # BASE's layer again after one that changed and removed its files (as an image whose
    # empty layer repeats, or one that reverts to its base): one blob twice in the manifest.
    "repeat": [BASE, [file("target", b"changed"), whiteout("other"), whiteout("d")], BASE],
    "names": [
        [
            directory("."),
            file("./dot", b"dot"),
            directory("a"),
            file("a//double", b"double"),
            file("a/./single", b"single"),
            directory("b"),
            file("b/../up", b"up"),
            file("c/./d//e", b"e"),  # parents never declared
        ]
    ],
    "edges": [
        [
            directory("."),
            file("日" * 85, b"255 bytes of UTF-8"),
            file("new\nline and back\\slash", b"odd"),
            file("big-ids", b"ids", uid=5_000_000, gid=4_000_000),  # PAX uid and gid
            file("old", b"1969", mtime="-86400.25"),
            symlink("long-target", "t/" * 2000),
            device("nvme", Kind.BLOCK, 259, 1_048_575),
            file("many-xattrs", b"x", xattrs=tuple((f"user.k{i}", b"v" * i) for i in range(1, 61))),
            file("big-xattr", b"x", xattrs=(("user.big", bytes(range(250)) * 8),)),
        ]
    ],
    # POSIX pax: a record with an empty value deletes the keyword; umoci sets no xattr.
    "empty-xattr": [[directory("."), file("e", b"e", xattrs=(("user.e", b""), ("user.f", b"1")))]],
    "loops": [
        [
            directory("."),
            symlink("a", "b"),
            symlink("b", "a"),
            symlink("self", "self"),
            directory("d"),
            symlink("d/up", ".."),  # a loop for a walk that follows links
            file("d/ok", b"ok"),
        ]
    ],
    "big": [[directory("."), file("big", BIG), file("small", b"small\n")]],
    "caps": [
        [
            directory("."),
            file("ping", b"#!/bin/sh\n", mode=0o755, xattrs=(("security.capability", CAP),)),
            device("null", Kind.CHAR, 1, 3),
            file("fifo-later", b"a file first"),
        ],
        [hardlink("null-link", "null"), device("fifo-later", Kind.FIFO, 0, 0)],
    ],
}


@dataclass
class Built:
    """Every image of IMAGES pushed by skopeo into one storage root, and its layout."""

    base: Path
    images: dict[str, OciImage] = field(default_factory=dict)
    unpacked: dict[str, Path] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base / "root"

    def unpack(self, tag: str) -> Path:
        if tag not in self.unpacked:
            self.unpacked[tag] = umoci_unpack(self.base / "oci", tag, self.base / "bundles" / tag)
        return self.unpacked[tag]

    def mount(self, where: Path, cache: Path, *args: str) -> AbstractContextManager[Mount]:
        return mounted_at(str(self.root), where, cache, *args)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    made = Built(tmp_path_factory.mktemp("review-rootfs"))
    for tag, layers in IMAGES.items():
        made.images[tag] = build_layered_image(made.base / "oci", tag, layers)
    for how in ("tar", "zstd"):  # `big` again, as a plain tar and a zstd layer
        made.images[f"big-{how}"] = build_layered_image(
            made.base / "oci", f"big-{how}", IMAGES["big"], how
        )
    for form in SPARSE_FORMS:
        made.images[f"sparse-{form}"] = sparse_image(made.base, form)
    for record in EMPTY_RECORDS:
        made.images[f"empty-{record}"] = empty_pax_record_image(made.base, record)
    with RegistryServer(made.root, workdir=made.base / "registry") as server:
        for tag in made.images:
            skopeo_push(made.base / "oci", tag, server.host, REPO)
        put_docker_forms(made.base / "oci", server)
    return made


def put_docker_forms(layout: Path, server: RegistryServer) -> None:
    """`links-docker`: the `links` image as skopeo converts it to Docker's schema 2 (what
    `docker push` makes: Docker media types, the same layer blobs); `list-docker`: a
    Docker manifest list naming it for linux/arm64/v8, put over the registry's API."""
    destination = f"docker://{server.host}/{REPO}:links-docker"
    run("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
        "--format", "v2s2", f"oci:{layout}:links", destination)  # fmt: skip
    docker = server.client().get_manifest(REPO, "links-docker")
    assert docker.media_type == DOCKER_MANIFEST
    platform = {"os": "linux", "architecture": "arm64", "variant": "v8"}
    entry = {"mediaType": DOCKER_MANIFEST, "digest": docker.digest, "size": len(docker.body)}
    body = {
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [entry | {"platform": platform}],
    }
    server.client().put_manifest(REPO, "list-docker", json.dumps(body).encode(), DOCKER_LIST)


def sparse_image(base: Path, form: str) -> OciImage:
    """`sparse-<form>`: one layer GNU tar wrote with --sparse (gnu: a type 'S' member;
    posix: PAX GNU.sparse 1.0), of `holes` (SPARSE_SIZE bytes, SPARSE_DATA in the middle,
    zeros around) and a plain file."""
    source = base / "sparse" / form
    source.mkdir(parents=True)
    with open(source / "holes", "wb") as f:
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE // 2)
        f.write(SPARSE_DATA)
    (source / "plain").write_bytes(b"plain\n")
    tar = base / "sparse" / f"{form}.tar"
    run("tar", "--sparse", "--hole-detection=raw", f"--format={form}", "--numeric-owner",
        "-C", source, "-cf", tar, ".")  # fmt: skip
    return one_layer_image(base, f"sparse-{form}", tar)


def one_layer_image(base: Path, tag: str, tar: Path) -> OciImage:
    """`tag` in the module's layout: the layer `tar` as it is (`umoci raw add-layer`)."""
    run("umoci", "raw", "add-layer", "--image", new_image(base / "oci", tag), tar)
    return read_oci_layout(base / "oci", tag)


def empty_pax_record_image(base: Path, record: str) -> OciImage:
    """`empty-<record>`: a file `a`, then `b` (a file, or a hard link to `a`) whose PAX
    `path` or `linkpath` record is empty: POSIX says the header's own field then holds."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        first = tarfile.TarInfo("a")
        first.size, first.mtime = 1, MTIME
        tar.addfile(first, io.BytesIO(b"a"))
        second = tarfile.TarInfo("b")
        second.mtime, second.pax_headers = MTIME, {record: ""}
        if record == "linkpath":
            second.type, second.linkname = tarfile.LNKTYPE, "a"
        tar.addfile(second, io.BytesIO(b""))
    path = base / f"empty-{record}.tar"
    path.write_bytes(out.getvalue())
    return one_layer_image(base, f"empty-{record}", path)


def rootfs(m: Mount, *parts: str) -> Path:
    return m.path(*REPO.split("/"), "rootfs", *parts)


def assert_as_umoci_unpacks(built: Built, m: Mount, tag: str) -> dict:
    expected = tree_of_dir(built.unpack(tag))
    actual = shown_tree(rootfs(m, tag))
    assert differences(expected, actual) == [], tag
    assert actual == expected, tag
    return actual.records


def passes(log: str, layer: str) -> int:
    """How many passes over `layer` a mount's log tells of."""
    return log.count(f"indexing layer {layer}")


def cache_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()} if directory.exists() else {}


# --------------------------------------------------------------------------- the merge


def test_hard_links_keep_the_content_of_their_layer(built, tmp_path):
    with built.mount(tmp_path, tmp_path / "cache") as m:
        records = assert_as_umoci_unpacks(built, m, "links")
        image = rootfs(m, "links")
        shown = {
            name: ((image / name).read_bytes(), os.lstat(image / name).st_nlink)
            for name in ("keep", "chain", "target", "twin", "other", "solo2", "moved", "d")
        }
        assert os.lstat(image / "keep").st_ino == os.lstat(image / "chain").st_ino
    assert shown == {
        "keep": (b"v0", 2),
        "chain": (b"v0", 2),
        "target": (b"v2", 1),
        "twin": (b"t2", 1),
        "other": (b"o0", 1),
        "solo2": (b"s0", 1),
        "moved": (b"in0", 1),
        "d": (b"d2", 1),
    }
    assert "solo" not in records and "d/in" not in records


def test_docker_schema_2_images_and_manifest_lists_as_umoci_unpacks_them(built, tmp_path):
    """What `docker push` makes (Docker media types for the manifest, its config and
    layers) and a Docker manifest list of it: each the tree umoci unpacks of the OCI form."""
    expected = tree_of_dir(built.unpack("links"))
    with built.mount(tmp_path, tmp_path / "cache") as m:
        assert os.listdir(rootfs(m, "list-docker")) == ["linux-arm64-v8"]
        for path in ("links-docker", "list-docker/linux-arm64-v8"):
            actual = shown_tree(rootfs(m, *path.split("/")))
            assert differences(expected, actual) == [], path


def test_a_layer_twice_in_one_image_is_applied_twice(built, tmp_path):
    layers = built.images["repeat"].layer_digests
    assert layers[0] == layers[2] != layers[1]
    with built.mount(tmp_path, tmp_path / "cache") as m:
        records = assert_as_umoci_unpacks(built, m, "repeat")
        assert (rootfs(m, "repeat", "target")).read_bytes() == b"v0"
        assert passes(m.log_text(), layers[0]) == 1
    assert {"other", "d/in"} <= records.keys()


def test_odd_member_names_land_where_umoci_puts_them(built, tmp_path):
    with built.mount(tmp_path, tmp_path / "cache") as m:
        records = assert_as_umoci_unpacks(built, m, "names")
        assert (rootfs(m, "names", "c", "d", "e")).read_bytes() == b"e"
    assert {"dot", "a/double", "a/single", "up", "c/d/e"} <= records.keys()


def test_names_ids_times_targets_devices_and_xattrs_at_their_edges(built, tmp_path):
    """A name of 255 bytes of UTF-8, one with a newline; ids past the octal fields (PAX);
    an mtime before 1970; a 4,000-byte link target; a device of major 259, minor 2^20-1;
    60 xattrs on a file, one of 2,000 bytes (ext4 keeps no more): each as umoci unpacks it."""
    with built.mount(tmp_path, tmp_path / "cache") as m:
        records = assert_as_umoci_unpacks(built, m, "edges")
    assert records["big-ids"].uid == 5_000_000 and records["nvme"].rdev == (259, 1_048_575)


def test_an_empty_pax_xattr_record_sets_no_xattr(built, tmp_path):
    with built.mount(tmp_path, tmp_path / "cache") as m:
        assert os.listxattr(rootfs(m, "empty-xattr", "e")) == ["user.f"]
        assert_as_umoci_unpacks(built, m, "empty-xattr")


@pytest.mark.parametrize("record", EMPTY_RECORDS)
def test_an_empty_pax_path_record_keeps_the_header_name(built, tmp_path, record):
    want = b"a" if record == "linkpath" else b""  # b: a hard link to a, or an empty file
    with built.mount(tmp_path, tmp_path / "cache") as m:
        assert (rootfs(m, f"empty-{record}", "b")).read_bytes() == want
        assert_as_umoci_unpacks(built, m, f"empty-{record}")


def test_symlink_loops_no_path_goes_through_are_shown_as_stored(built, tmp_path):
    with built.mount(tmp_path, tmp_path / "cache") as m:
        records = assert_as_umoci_unpacks(built, m, "loops")
        image = rootfs(m, "loops")
        for name in ("a", "self"):
            result = run("cat", image / name, check=False)
            assert b"Too many levels of symbolic links" in result.stderr, name
        walked = run("find", "-L", image, check=False)  # says loop, ends, lists the rest
        assert b"d/ok" in walked.stdout
        assert (image / "d" / "ok").read_bytes() == b"ok"
    assert records["self"].target == "self" and records["d/up"].target == ".."


def test_file_capabilities_and_a_hard_linked_device_as_umoci_unpacks_them(built, tmp_path):
    """A `security.capability` PAX xattr is shown as stored (not only `user.` ones), a hard
    link to a device node is one inode with it, and a file replaced by a fifo is a fifo."""
    with built.mount(tmp_path, tmp_path / "cache") as m:
        records = assert_as_umoci_unpacks(built, m, "caps")
        image = rootfs(m, "caps")
        assert os.getxattr(image / "ping", "security.capability") == CAP
        null, link = os.lstat(image / "null"), os.lstat(image / "null-link")
    assert (link.st_ino, link.st_nlink, link.st_rdev) == (null.st_ino, 2, os.makedev(1, 3))
    assert records["fifo-later"].type == "fifo"


@pytest.mark.parametrize("form", SPARSE_FORMS)
def test_a_sparse_member_umoci_unpacks_is_eio_for_its_image_only(built, tmp_path, form):
    """The view refuses a layer with a sparse member (`tarscan`) as bad input: EIO for that
    image only, a log line naming the layer and the reason; the rest reads on. umoci 0.4.7
    refuses GNU's (typeflag 'S') too, but unpacks PAX's: a difference (docs/rootfs.md)."""
    tag = f"sparse-{form}"
    if form == "gnu":
        with pytest.raises(CommandError, match="unknown typeflag"):
            built.unpack(tag)
    else:
        holes = (built.unpack(tag) / "holes").read_bytes()
        middle = SPARSE_SIZE // 2
        assert holes == bytes(middle) + SPARSE_DATA + bytes(middle - len(SPARSE_DATA))
    layer = built.images[tag].layer_digests[0]
    with built.mount(tmp_path, tmp_path / "cache") as m:
        assert errno_of(lambda: os.listdir(rootfs(m, tag))) == errno.EIO
        wait_until(lambda: layer in m.log_text(), 5, "the log line")
        lines = [line for line in m.log_text().splitlines() if layer in line and "ERROR" in line]
        assert lines and "sparse tar member './holes' is not supported" in lines[0], lines
        assert (rootfs(m, "big", "small")).read_bytes() == b"small\n"


@pytest.mark.parametrize("tag", ["big", "big-tar", "big-zstd"])
def test_reads_at_any_offset_and_length_give_the_files_bytes(built, tmp_path, tag):
    """pread of 6 MiB of random bytes (gzip: a seek point every ~1 MiB; zstd: 256 KiB
    frames) at 200 random offsets and lengths, across windows, frames and the file's end,
    from two descriptors in turn; each kind of layer in a fresh mount and index cache."""
    rng = random.Random(tag)
    with built.mount(tmp_path, tmp_path / "cache") as m:
        path = rootfs(m, tag, "big")
        first, second = os.open(path, os.O_RDONLY), os.open(path, os.O_RDONLY)
        try:
            for n in range(200):
                at = rng.randrange(len(BIG) + 10)
                size = rng.choice([1, 4095, 4097, 65536, 300_000, 1_100_000])
                got = os.pread(first if n % 2 else second, size, at)
                assert got == BIG[at : at + size], (at, size)
        finally:
            os.close(first)
            os.close(second)


# --------------------------------------------------------------------------- the index cache


def test_a_layer_two_images_share_is_indexed_once(built, tmp_path):
    shared = built.images["links"].layer_digests[0]
    assert built.images["shared"].layer_digests[0] == shared  # umoci wrote the same blob
    with built.mount(tmp_path, tmp_path / "cache") as m:
        assert (rootfs(m, "links", "other")).read_bytes() == b"o0"
        assert (rootfs(m, "shared", "other")).read_bytes() == b"o0"
        assert (rootfs(m, "shared", "extra")).read_bytes() == b"extra"
        top = built.images["shared"].layer_digests[1]
        log = m.log_text()
    assert passes(log, shared) == passes(log, top) == 1
    # The log says which layer was indexed and how fast (issue 16: "and how fast").
    rate = rf"indexed layer {shared} \(gzip, 6 members\) in [\d.]+ s, [\d.]+ MB/s"
    assert re.search(rate, log), log


def test_the_index_is_kept_under_the_home_cache_by_default(built, tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir(mode=0o700)
    m = Mount(str(built.root), tmp_path / "mnt", tmp_path / "regfs.log")
    with m:
        assert (rootfs(m, "big", "small")).read_bytes() == b"small\n"
    layer = built.images["big"].layer_digests[0].split(":")[1]
    assert f"{layer}.idx" in cache_files(tmp_path / "home" / ".cache" / "regfs" / "index")


def test_the_cache_bound_holds_across_mounts(built, tmp_path):
    """`--index-cache-size` set to what the first image's entries take: each later mount,
    which indexes another image, leaves the cache within that bound, or holding its own
    image's entries only (they alone may pass it); what it evicted it logs."""
    directory = tmp_path / "cache" / "regfs" / "index"
    bound = 1 << 30
    for number, tag in enumerate(("loops", "names", "links")):
        where = tmp_path / str(number)
        with built.mount(where, tmp_path / "cache", "--index-cache-size", str(bound)) as m:
            run("ls", "-R", rootfs(m, tag))
        files = cache_files(directory)
        if number == 0:
            bound = sum(files.values())
            continue
        layers = built.images[tag].layer_digests
        own = {f"{treefile.key(layers)}.tree"} | {
            f"{d.split(':')[1]}.{suffix}" for d in layers for suffix in ("idx", "gzi")
        }
        assert sum(files.values()) <= bound or set(files) <= own, (tag, bound, files)
        assert "evicted from" in m.log_text(), tag
    assert not set(files) & {f"{d.split(':')[1]}.idx" for d in built.images["loops"].layer_digests}


@pytest.mark.parametrize("suffix", ["idx", "gzi"])
def test_a_damaged_index_left_by_one_mount_is_not_trusted_by_the_next(built, tmp_path, suffix):
    """The first mount indexes `big` (one gzip layer) and reads it; a byte of its `.idx`
    or `.gzi` is flipped between mounts. The next mount shows the same tree and the same
    bytes of every file (the big one's tail too, read from a seek point), and passes the
    layer again rather than read by what it cannot trust."""
    cache = tmp_path / "cache"
    layer = built.images["big"].layer_digests[0]
    with built.mount(tmp_path / "first", cache) as m:
        assert (rootfs(m, "big", "big")).read_bytes() == BIG
        assert passes(m.log_text(), layer) == 1
    kept = cache / "regfs" / "index" / f"{layer.split(':')[1]}.{suffix}"
    data = bytearray(kept.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kept.write_bytes(bytes(data))
    with built.mount(tmp_path / "second", cache) as m:
        with open(rootfs(m, "big", "big"), "rb") as f:
            f.seek(len(BIG) - 100_000)
            assert f.read() == BIG[-100_000:]
        assert_as_umoci_unpacks(built, m, "big")
        log = m.log_text()
    assert passes(log, layer) == 1, log[-3000:]
    assert re.search(r"WARNING .*" + re.escape(layer.split(":")[1]), log), log[-3000:]
