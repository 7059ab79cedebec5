"""Image layers built in Python: tars with every member kind, compressed every way a layer is.

`every_kind_tar()` holds each tar entry type, PAX long names and xattrs, a fractional PAX
mtime, big numeric ids, device nodes, names that try to climb out (`..`, absolute) and
whiteout names (kept as they are: the merge reads them). `compress(raw, how)` gives the
blob for one of `COMPRESSIONS`; `estargz(raw)` an eStargz blob and its TOC digest.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
import zlib
from datetime import UTC, datetime
from typing import Any

import zstandard

from support.tools import MIB

# "zstd" is one frame (as the zstd CLI, containerd and buildkit write), "zstd-frames" many.
COMPRESSIONS = ("tar", "gzip", "zstd", "zstd-frames")
MEDIA_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "zstd-frames": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def compress(raw: bytes, how: str, frame: int = 256 << 10) -> bytes:
    if how == "tar":
        return raw
    if how == "gzip":
        return gzip.compress(raw, compresslevel=1)
    compressor = zstandard.ZstdCompressor(level=1)
    if how == "zstd":
        return compressor.compress(raw)
    assert how == "zstd-frames"
    return b"".join(compressor.compress(raw[i : i + frame]) for i in range(0, len(raw), frame))


def half_random(size: int, rng: random.Random) -> bytes:
    """Data that compresses to about half: gzip seek points then fall every ~0.5 MB of blob."""
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(512) + bytes(512)
    return bytes(out[:size])


def entry(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tar_of(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def every_kind_tar(seed: int = 1, big: int = 5 * MIB) -> bytes:
    """A layer with every kind of entry (see the module docstring); `big` bytes of one file
    make its single zstd frame big enough to be re-framed."""
    rng = random.Random(seed)
    long_dir = "usr/share/" + "a-long-directory-name/" * 8
    xattrs = {"SCHILY.xattr.user.note": "hello", "SCHILY.xattr.security.capability": "\x01\x02"}
    entries: list[tuple[tarfile.TarInfo, bytes]] = [
        (entry("./", tarfile.DIRTYPE, mode=0o755), b""),
        (entry("etc", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0), b""),
        (entry("etc/os-release", mode=0o644), b"ID=test\n"),
        (entry("etc/empty"), b""),
        (entry("etc/shadow", mode=0o640, uid=0, gid=42), b"root:*:19000::::::\n"),
        (entry(long_dir, tarfile.DIRTYPE, mode=0o2775, uid=1000, gid=1000), b""),
        (entry(long_dir + "file-with-a-long-name.txt", mode=0o4755), rng.randbytes(3000)),
        (entry("bin", tarfile.DIRTYPE, mode=0o755), b""),
        (entry("bin/random", mode=0o755, uid=123456, gid=654321), rng.randbytes(700_000)),
        (entry("bin/half", mode=0o700), half_random(300_000, rng)),
        (entry("bin/big", mode=0o644), half_random(big, rng)),
        (entry("bin/sh", tarfile.SYMTYPE, linkname="/bin/busybox"), b""),
        (entry("bin/up", tarfile.SYMTYPE, linkname="../../../etc/os-release"), b""),
        (entry("bin/hard", tarfile.LNKTYPE, linkname="./bin/random"), b""),
        (entry("dev", tarfile.DIRTYPE), b""),
        (entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3), b""),
        (entry("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0), b""),
        (entry("dev/fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (entry("xattr-file", pax_headers=xattrs), b"with xattrs"),
        (entry("fraction", pax_headers={"mtime": "1700000000.123456789"}), b"ns"),
        (entry("caf\u00e9/\u00fcber", mode=0o644), b"unicode names"),
        (entry("../../escape"), b"climbs"),
        (entry("/absolute/name"), b"absolute"),
        (entry("a/./b/../c"), b"dots"),
        (entry("etc/.wh.gone"), b""),
        (entry("etc/.wh..wh..opq"), b""),
        (entry(".wh."), b""),
    ]
    return tar_of(entries)


def many_members_tar(count: int) -> bytes:
    """`count` empty files: the shape of a layer that tries to exhaust memory."""
    return tar_of([(entry(f"d{i % 100}/f{i}"), b"") for i in range(count)], tarfile.GNU_FORMAT)


def estargz(raw: bytes, chunk: int = 256 << 10) -> tuple[bytes, str]:
    """`raw` (a tar) as eStargz, laid out as stargz-snapshotter's writer does: each entry's
    header in the current gzip member, each chunk of a file's data in a member of its own,
    then the TOC (`stargz.index.json` in a tar of its own) and the 51-byte footer.
    Returns the blob and the TOC digest (the manifest's `toc.digest` annotation)."""
    out = bytearray()
    compressor: Any = None

    def write(data: bytes) -> None:
        nonlocal compressor
        if compressor is None:
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        out.extend(compressor.compress(data))

    def close() -> None:
        nonlocal compressor
        if compressor is not None:
            out.extend(compressor.flush())
            compressor = None

    entries: list[dict[str, Any]] = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for info in tar:
            write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            record = _toc_entry(info)
            extracted = tar.extractfile(info) if info.isreg() else None
            data = extracted.read() if extracted is not None else b""
            if not data:
                entries.append(record)
                continue
            for start in range(0, len(data), chunk):
                close()
                piece = data[start : start + chunk]
                if start:
                    record = {"name": info.name, "type": "chunk"}
                record |= {"offset": len(out), "chunkOffset": start}
                if len(data) > chunk:
                    record["chunkSize"] = len(piece)
                record["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
                entries.append(record)
                write(piece)
            write(bytes(-len(data) % tarfile.BLOCKSIZE))
    close()
    toc_offset = len(out)
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    write(tar_of([(entry("stargz.index.json", mode=0o644), toc)]))
    close()
    footer = (
        b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x1a\x00SG\x16\x00"
        + b"%016xSTARGZ" % toc_offset
        + b"\x01\x00\x00\xff\xff"
        + bytes(8)
    )
    return bytes(out) + footer, "sha256:" + hashlib.sha256(toc).hexdigest()


_TOC_TYPES = {
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def _toc_entry(info: tarfile.TarInfo) -> dict[str, Any]:
    seconds, _, fraction = info.pax_headers.get("mtime", str(int(info.mtime))).partition(".")
    stamp = datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    xattrs = {
        key.removeprefix("SCHILY.xattr."): base64.b64encode(
            value.encode("utf-8", "surrogateescape")
        ).decode()
        for key, value in info.pax_headers.items()
        if key.startswith("SCHILY.xattr.")
    }
    return {
        "name": info.name,
        "type": "reg" if info.isreg() else _TOC_TYPES[info.type],
        "size": info.size if info.isreg() else 0,
        "modtime": stamp + (f".{fraction}" if fraction else "") + "Z",
        "linkName": info.linkname,
        "mode": info.mode,
        "uid": info.uid,
        "gid": info.gid,
        "devMajor": info.devmajor,
        "devMinor": info.devminor,
        "xattrs": xattrs,
    }
