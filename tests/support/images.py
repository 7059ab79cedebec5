"""Images with hand-made layers (umoci), and one comparator for every view of a root filesystem.

`build_layered_image` puts hand-crafted tar layers into an OCI layout with
`umoci raw add-layer`, so a test can state exactly the members a rule needs: whiteouts, opaque
directories, hard links across layers, file/directory replacement, PAX xattrs and long names,
device nodes, empty layers. umoci 0.4.7 writes gzip layers only; plain tar and zstd layers are
re-encoded here from the gzip ones with `support.layers.compress` (`umoci unpack` reads plain
tar, not zstd). `members_of_tar` reads a layer's member table with the layer index's own pass.

`tree_of_dir` turns a directory (`umoci unpack`'s rootfs, later a mounted `rootfs/` view) into
`Tree` records; `tree_of_merge` does the same for a `MergedTree` plus the bytes of its files,
so one `==` (and `differences` to read a failure) compares any two.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import zstandard

from storage.digests import digest_bytes
from storage.rootfs.members import Kind, Member
from storage.rootfs.merge import MergedTree, merge
from storage.rootfs.tarscan import Limits, scan

from .layers import MEDIA_TYPES, compress
from .oci import OciImage, blob_path, new_image, read_oci_layout, run
from .tools import digest_of, sha256_file

MTIME = 1_700_000_000
XATTR = "SCHILY.xattr."

# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Entry:
    """One hand-made tar member. `mtime` may be a PAX decimal string (nanoseconds)."""

    name: str
    kind: Kind
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int | str = MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw) -> Entry:
    return Entry(name, Kind.FILE, data, mode, **kw)


def directory(name: str, mode: int = 0o755, **kw) -> Entry:
    return Entry(name, Kind.DIR, mode=mode, **kw)


def symlink(name: str, target: str, **kw) -> Entry:
    return Entry(name, Kind.SYMLINK, mode=0o777, linkname=target, **kw)


def hardlink(name: str, target: str, **kw) -> Entry:
    return Entry(name, Kind.HARDLINK, linkname=target, **kw)


def device(name: str, kind: Kind, major: int, minor: int, **kw) -> Entry:
    return Entry(name, kind, mode=0o666, devmajor=major, devminor=minor, **kw)


def whiteout(path: str) -> Entry:
    """`.wh.<name>` beside `path`: removes the lower layers' `path`."""
    head, _, name = path.rpartition("/")
    return file(f"{head}/.wh.{name}" if head else f".wh.{name}", mode=0o600)


def opaque(directory_path: str) -> Entry:
    """`.wh..wh..opq` inside a directory: hides all its lower layers' children."""
    return file(f"{directory_path}/.wh..wh..opq" if directory_path else ".wh..wh..opq")


_TYPES = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.HARDLINK: tarfile.LNKTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}


def layer_tar(entries: Iterable[Entry]) -> bytes:
    """A PAX tar of `entries` in the given order (PAX: long names, xattrs, ns mtimes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _TYPES[entry.kind]
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.linkname = entry.linkname
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            if isinstance(entry.mtime, str):
                info.pax_headers["mtime"] = entry.mtime
                info.mtime = int(Decimal(entry.mtime))
            else:
                info.mtime = entry.mtime
            for key, value in entry.xattrs:
                info.pax_headers[XATTR + key] = value.decode("utf-8", "surrogateescape")
            info.size = len(entry.data) if entry.kind is Kind.FILE else 0
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind is Kind.FILE else None)
    return out.getvalue()


def build_layered_image(
    layout_dir: Path, tag: str, layers: Sequence[Sequence[Entry]], compression: str = "gzip"
) -> OciImage:
    """`layout_dir:tag` with one layer per entry list, in order, compressed as `compression`
    (one of support.layers.COMPRESSIONS); orphaned blobs are collected."""
    layout_dir = Path(layout_dir)
    image = new_image(layout_dir, tag)
    with tempfile.TemporaryDirectory(prefix="regfs-layers-") as tmp:
        for number, entries in enumerate(layers):
            tar_path = Path(tmp) / f"layer{number}.tar"
            tar_path.write_bytes(layer_tar(entries))
            run(["umoci", "raw", "add-layer", "--image", image, str(tar_path)])
    if compression != "gzip":
        _recompress(layout_dir, tag, compression)
    run(["umoci", "gc", "--layout", str(layout_dir)])
    return read_oci_layout(layout_dir, tag)


def _put_blob(layout_dir: Path, data: bytes) -> str:
    digest = digest_of(data)
    blob_path(layout_dir, digest).write_bytes(data)
    return digest


def _recompress(layout_dir: Path, tag: str, compression: str) -> None:
    """Re-encode the tag's gzip layers as `compression`, then its manifest and index entry."""
    built = read_oci_layout(layout_dir, tag)
    manifest = json.loads(built.manifest)
    for layer in manifest["layers"]:
        data = compress(gzip.decompress(built.blob(layer["digest"])), compression)
        digest = _put_blob(layout_dir, data)
        layer.update(mediaType=MEDIA_TYPES[compression], digest=digest, size=len(data))
    body = json.dumps(manifest).encode()
    index_path = layout_dir / "index.json"
    index = json.loads(index_path.read_text())
    for descriptor in index["manifests"]:
        if descriptor["digest"] == built.digest:
            descriptor.update(digest=_put_blob(layout_dir, body), size=len(body))
    index_path.write_text(json.dumps(index))


def layer_tars(image: OciImage) -> list[bytes]:
    """Each layer's uncompressed tar, by its media type."""
    manifest = json.loads(image.manifest)
    tars = []
    for layer in manifest["layers"]:
        data = image.blob(layer["digest"])
        if layer["mediaType"].endswith("+gzip"):
            data = gzip.decompress(data)
        elif layer["mediaType"].endswith("+zstd"):
            reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
            data = reader.read()
        tars.append(data)
    return tars


def members_of_tar(data: bytes) -> list[Member]:
    """The member table of one uncompressed layer tar, as the layer index's pass reads it."""
    return scan(iter([data]), digest_bytes(data), Limits()).members


# --------------------------------------------------------------------------- umoci unpack


def umoci_unpack(layout_dir: Path, tag: str, bundle: Path) -> Path:
    """`umoci unpack` of `layout_dir:tag` into `bundle` as root (exact owners, device nodes);
    returns its rootfs."""
    if os.geteuid() != 0:
        raise AssertionError("the reference unpack needs root: owners and device nodes")
    run(["umoci", "unpack", "--image", f"{layout_dir}:{tag}", str(bundle)])
    return bundle / "rootfs"


# --------------------------------------------------------------------------- the comparator


@dataclass(frozen=True)
class Record:
    """One path as a user sees it. Directories carry type, mode, owner and xattrs only (their
    mtimes change as later layers touch them); a symlink's mode is always 0777 on Linux."""

    type: str
    mode: int
    uid: int
    gid: int
    xattrs: tuple[tuple[str, bytes], ...] = ()
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    nlink: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Tree:
    """Every path ("" is the root) with its record, and the groups of paths sharing an inode."""

    records: dict[str, Record]
    links: frozenset[frozenset[str]]


def _links(inodes: dict[object, list[str]]) -> frozenset[frozenset[str]]:
    return frozenset(frozenset(paths) for paths in inodes.values() if len(paths) > 1)


def tree_of_dir(root: Path) -> Tree:
    """Walk a directory without following any symlink: unpacked images and mounted views."""
    records: dict[str, Record] = {}
    inodes: dict[object, list[str]] = defaultdict(list)
    stack = [""]
    while stack:
        rel = stack.pop()
        path = root / rel if rel else root
        st = os.lstat(path)
        xattrs = tuple(
            sorted(
                (name, os.getxattr(path, name, follow_symlinks=False))
                for name in os.listxattr(path, follow_symlinks=False)
            )
        )
        base = Record("", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs)
        if stat.S_ISDIR(st.st_mode):
            records[rel] = replace(base, type="dir")
            stack.extend(f"{rel}/{name}" if rel else name for name in os.listdir(path))
            continue
        inodes[(st.st_dev, st.st_ino)].append(rel)
        common = {"nlink": st.st_nlink, "mtime_ns": st.st_mtime_ns}
        if stat.S_ISREG(st.st_mode):
            records[rel] = replace(
                base, type="file", size=st.st_size, sha256=sha256_file(path), **common
            )
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            records[rel] = replace(base, type="symlink", size=st.st_size, target=target, **common)
        elif stat.S_ISFIFO(st.st_mode):
            records[rel] = replace(base, type="fifo", **common)
        else:
            kind = "char" if stat.S_ISCHR(st.st_mode) else "block"
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            records[rel] = replace(base, type=kind, rdev=rdev, **common)
    return Tree(records, _links(inodes))


def tree_of_merge(tree: MergedTree, read: Callable[[int, Member], bytes]) -> Tree:
    """The same records for a merged tree; `read(layer, member)` gives a file's bytes."""
    records: dict[str, Record] = {}
    inodes: dict[object, list[str]] = defaultdict(list)
    stack = [("", MergedTree.ROOT)]
    while stack:
        rel, ino = stack.pop()
        node = tree.node(ino)
        m = node.member
        base = Record(m.kind.value, m.mode, m.uid, m.gid, tuple(sorted(m.xattrs)))
        if m.kind is Kind.DIR:
            records[rel] = base
            stack.extend(
                (f"{rel}/{name}" if rel else name, child) for name, child, *_ in tree.entries(ino)
            )
            continue
        inodes[ino].append(rel)
        common = {"nlink": node.nlink, "mtime_ns": m.mtime_ns}
        if m.kind is Kind.FILE:
            data = read(node.layer, m)
            digest = digest_of(data)
            records[rel] = replace(base, size=len(data), sha256=digest, **common)
        elif m.kind is Kind.SYMLINK:
            size = len(os.fsencode(m.linkname))
            records[rel] = replace(base, mode=0o777, size=size, target=m.linkname, **common)
        elif m.kind is Kind.FIFO:
            records[rel] = replace(base, **common)
        else:
            records[rel] = replace(base, rdev=(m.devmajor, m.devminor), **common)
    return Tree(records, _links(inodes))


def differences(expected: Tree, actual: Tree, limit: int = 40) -> list[str]:
    """Readable lines for what differs between two trees (empty when they are equal)."""
    lines = []
    for path in sorted(expected.records.keys() | actual.records.keys()):
        want, got = expected.records.get(path), actual.records.get(path)
        if want != got:
            lines.append(f"{path or '/'}: expected {want}, got {got}")
    if expected.links != actual.links:
        lines.append(f"hard links: expected {sorted(map(sorted, expected.links))}")
        lines.append(f"            got      {sorted(map(sorted, actual.links))}")
    return lines[:limit]


def merge_tars(tars: Sequence[bytes]) -> tuple[MergedTree, Tree]:
    """Merge uncompressed layer tars (read with tarfile) and record the result."""
    tree = merge([members_of_tar(tar) for tar in tars])
    return tree, tree_of_merge(tree, lambda layer, m: tars[layer][m.offset : m.offset + m.size])


def merge_entries(*layers: Sequence[Entry]) -> tuple[MergedTree, Tree]:
    """`merge_tars` of hand-made layers, each written as a real PAX tar first."""
    return merge_tars([layer_tar(entries) for entries in layers])


def shown_tree(path: Path) -> Tree:
    """tree_of_dir of an image root, without the xattrs regfs adds to that root."""
    tree = tree_of_dir(path)
    root = tree.records[""]
    kept = tuple(x for x in root.xattrs if not x[0].startswith("user.regfs."))
    return Tree({**tree.records, "": replace(root, xattrs=kept)}, tree.links)
