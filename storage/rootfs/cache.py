"""Layer indexes kept on disk, keyed by layer digest, shared by every mount of the user.

`<dir>/<hex>.idx` is one zstd frame (with its checksum) holding a format line, a JSON meta
line, JSON lines of members, one of zstd frames and one of eStargz chunks (`indexfile`);
`<hex>.gzi` a gzip layer's seek points (indexed_gzip's export in one zstd frame,
`gzipseek.write_points`), whose sha256 the `.idx` keeps and a load checks, read only when a
file of the layer is (so no `LayerIndex` holds them in memory); `<hex>.zst`
a zstd layer's re-framed copy, when it has one; `<key>.tree` an image's merged tree
(`treefile`, keyed by its layers), an entry of its own. Files are written to a
temporary name and renamed (0600, in a 0700 directory), so a reader (another mount too)
sees a whole file or none. The least recently used (mtime, touched on each use) go first
to make room for what is stored (never that entry, nor the files an index in memory holds:
`Held`), so the files stay within `max_bytes`; an entry that alone passes it is not kept
(its copy serves this mount from a nameless file), and a gzip spool counts as the blob's
size while it lives. An evicted index that is in memory keeps serving. Its zstd copy or
`.gzi` is held open by that index from its load or pass on, so no eviction (another
mount's either) can make its reads fail or start from the blob's start; one unlinked
meanwhile still counts in the bound until it is let go.

Nothing read back is trusted: a file that does not decompress, ends early, has another
version or digest, or holds a value out of place is deleted and rebuilt, and its member
paths are normalised again. The directory must be the user's own, reached without a
symbolic link and writable by nobody else (docs/security.md): anyone who could write it
could steer what the daemon (often root) shows.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gc
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from operator import add
from pathlib import Path
from typing import Any, BinaryIO

import platformdirs
import zstandard

from ..digests import SHA256, Digest
from ..gcpause import gc_paused
from ..privatedir import open_private
from . import estargz, indexfile, treefile
from .errors import UnsafeCacheDir
from .estargz import Chunk
from .index import Format, LayerIndex, LayerRef
from .members import Kind, Member, Table, make_members
from .merge import MAX_NODES, MergedTree
from .tarscan import Limits, normal_name
from .zstdframes import Frame

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 << 30
_NAME = re.compile(r"([0-9a-f]{64})\.(idx|zst|gzi|tree)")
_USED = ("idx", "tree")  # the file of an entry whose mtime says when it was last used
_TEMP = re.compile(r"\.[0-9a-f]{64}\.[0-9a-f]+\.tmp")
_STALE_TEMP = 24 * 3600  # a temporary file this old belongs to a build that died
_POINTS_READ = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_LINE = 1 << 30  # a line of members: their names are bounded by tarscan.Limits.names
_OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KIND_CODES = indexfile.KINDS
_LENGTH_LINE = 24  # a block's length line: digits and a newline
_LENGTH = re.compile(rb"[0-9]{1,20}\n")
_ESCAPES = "surrogateescape"
_ESCAPED_NAME = re.compile(f"{indexfile.ESCAPE}(.?)", re.DOTALL)
_UNESCAPE = {indexfile.ESCAPE: indexfile.ESCAPE, indexfile.ONE: "\0"}
# `/`, NUL and `.` as `/`, every other byte as `a` (`_normal_paths`)
_SEPARATORS = bytes(0x2F if byte in b"/\0." else 0x61 for byte in range(256))
_I64 = struct.Struct("<q")
_HARDLINK_CODE = _KIND_CODES.index(Kind.HARDLINK)
_PERMISSIONS = tuple(range(0o10000))  # shared ints: see `_permissions`
_PRIVATE = ("its index", "not kept, it serves this mount alone (its copy from a nameless file)")


def default_directory() -> Path:
    return platformdirs.user_cache_path("regfs") / "index"


class CorruptIndex(Exception):
    """An index file that cannot be trusted; it is removed and the layer indexed again."""


class Held:
    """A cache file an index in memory reads from (a zstd layer's re-framed copy, a gzip
    layer's seek points), held open for as long as that index lives: the open descriptor
    keeps the file's bytes whatever eviction, this mount's or another's, does to its name
    meanwhile (docs/rootfs.md, "The cache directory"). `fd` is for `os.pread` (a reader that
    wants an offset of its own opens `/proc/self/fd/<fd>`); it is closed when the index is
    freed, or by `close`. It counts in the bound as `size` bytes (its size now if None)
    until it is let go, or made `private`: a file of this mount's alone, without a name,
    never the cache's (an entry too big for the bound)."""

    def __init__(self, fd: int, files: _HeldFiles, size: int | None = None) -> None:
        self.fd = fd
        self.private = False
        st = os.fstat(fd)
        self._key = (st.st_dev, st.st_ino)
        self._files = files
        self.size = st.st_size if size is None else size
        files.add(self._key, self.size)
        self._finalizer = weakref.finalize(self, files.let_go, self._key, fd)

    def make_private(self) -> None:
        """Count no more in the cache's bound (its name, if any, is the caller's to remove)."""
        if not self.private:
            self.private = True
            self._files.forget(self._key)

    def close(self) -> None:
        self._finalizer()


class _HeldFiles:
    """The files of a cache held open (`Held`), by inode, with their sizes: eviction leaves
    them in place (removing one would free nothing) and counts those whose name is gone.
    Locked: holds are taken in worker threads and let go wherever an index is freed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[int, int], tuple[int, int]] = {}  # inode → (holds, size)

    def add(self, key: tuple[int, int], size: int) -> None:
        with self._lock:
            holds, _ = self._files.get(key, (0, size))
            self._files[key] = (holds + 1, size)

    def let_go(self, key: tuple[int, int], fd: int) -> None:
        os.close(fd)
        self.forget(key)

    def forget(self, key: tuple[int, int]) -> None:
        """One hold of `key` less (none left of a file made private: nothing to do)."""
        with self._lock:
            holds, size = self._files.pop(key, (0, 0))
            if holds > 1:
                self._files[key] = (holds - 1, size)

    def __contains__(self, key: tuple[int, int]) -> bool:
        with self._lock:
            return key in self._files

    def unnamed(self, named: set[tuple[int, int]]) -> int:
        """Bytes held in files that are not among `named` (unlinked by another mount)."""
        with self._lock:
            return sum(size for key, (_, size) in self._files.items() if key not in named)


@dataclass
class _Entry:
    """One layer's files in the cache directory, as eviction sees them."""

    used: float = 0.0  # the `.idx` mtime
    size: int = 0
    held: bool = False  # a file of it held open by an index in memory


class PendingFile:
    """A file of a layer's entry being written by its pass (a re-framed zstd copy, `.zst`,
    or seek points, `.gzi`): committed under its name, or discarded."""

    def __init__(self, cache: IndexCache, digest: Digest, suffix: str) -> None:
        self._cache = cache
        self._hex = digest.hex
        self._name = f"{digest.hex}{suffix}"
        self._temp, fd = cache._create_temp(digest.hex)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self, hold: bool = False) -> Held | None:
        """Give the file its name, once the least recently used entries made room for it;
        with `hold`, the file held open from now on (before its name exists, so no eviction
        can come between). A file that alone passes the bound gets no name: held, it is
        this mount's private file (`Held.private`), and its index is not kept either."""
        self.file.flush()
        size = os.fstat(self.file.fileno()).st_size
        kept = size <= self._cache.max_bytes
        if kept:
            self._cache._evict(keep=self._hex, incoming=size)
        else:
            self._cache._not_kept(self._hex, size, *_PRIVATE)
        fd = os.dup(self.file.fileno()) if hold else -1
        held = Held(fd, self._cache._held) if hold else None
        self.file.close()
        if kept:
            self._cache._rename(self._temp, self._name)
            return held
        self._cache._unlink(self._temp)
        if held is not None:
            held.make_private()
        return held

    def discard(self) -> None:
        self.file.close()
        self._cache._unlink(self._temp)


class IndexCache:
    """The index directory (see the module docstring). Blocking: call from worker threads."""

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()
        # Below the user's cache home, each part checked (storage/privatedir.py); a
        # directory given is checked from its parent down.
        base = self.directory.parent.parent if directory is None else self.directory.parent
        parts = self.directory.relative_to(base).parts
        self.max_bytes = max_bytes
        self._fd = open_private(base, parts, UnsafeCacheDir)
        self._held = _HeldFiles()
        self._told: set[tuple[str, str]] = set()  # what was logged too big to keep: once

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- reading ---------------------------------------------------------------------

    def load(self, digest: Digest) -> LayerIndex | None:
        """The cached index of `digest`, or None (missing, or corrupt and now removed). Its
        members are out of the cyclic GC's reach (gc.freeze, see `index._freeze`) before
        the GC is on again: its first collection would walk every one (1.3 ms of CPU of
        the bench's 15,000)."""
        try:
            fd = self._open_own(f"{digest.hex}.idx")
            with os.fdopen(fd, "rb") as file, gc_paused():
                index = decode(file, digest)
                gc.freeze()  # as `index._freeze` does next, before the GC is back
            if index.reframed:
                index = replace(index, copy=Held(self._open_own(f"{digest.hex}.zst"), self._held))
            if index.format is Format.GZIP:
                index = replace(index, copy=self._held_points(digest, index.points_sha256))
        except Exception as exc:  # whatever a damaged file makes the decoder raise
            if isinstance(exc, FileNotFoundError):
                return None
            log.warning(
                "index of layer %s in %s: %s; indexing it again", digest, self.directory, exc
            )
            self._remove(digest.hex)
            return None
        self._touch(f"{digest.hex}.idx")
        return index

    def load_tree(
        self, layers: Sequence[Digest], tables: Sequence[Sequence[Member]]
    ) -> MergedTree | None:
        """The merged tree kept for an image of `layers` whose member tables are `tables`,
        or None (missing, or stale or damaged and now removed: merge again)."""
        name = f"{treefile.key(layers)}.tree"
        try:
            fd = self._open_own(name)
            with os.fdopen(fd, "rb") as file, gc_paused():
                tree = treefile.decode(file, tables, MAX_NODES)
        except Exception as exc:  # whatever a damaged file makes the decoder raise
            if isinstance(exc, FileNotFoundError):
                return None
            log.warning("merged tree %s in %s: %s; merging again", name, self.directory, exc)
            self._unlink(name)
            return None
        self._touch(name)
        return tree

    def store_tree(
        self, layers: Sequence[Digest], tables: Sequence[Sequence[Member]], tree: MergedTree
    ) -> None:
        """Keep `tree` (merged from `tables`, the indexes of `layers`) for the next mount,
        atomically, once eviction made room for it (the bound holds at every moment); a
        failure is logged, not raised. Never at the expense of those indexes (a pass costs
        seconds, a merge milliseconds): a tree that does not fit beside them is not kept."""
        hexdigest = treefile.key(layers)
        temp, fd = self._create_temp(hexdigest)
        try:
            with os.fdopen(fd, "wb") as file:
                treefile.encode(tree, tables, file)
                size = file.tell()
            self._unlink(f"{hexdigest}.tree")  # one it replaces (found damaged) is no room
            keep = frozenset({hexdigest, *(d.hex for d in layers)})
            if self.evict(keep=keep, incoming=size) + size <= self.max_bytes:
                self._rename(temp, f"{hexdigest}.tree")
            else:
                self._unlink(temp)
                log.info("merged tree %s not kept: no room beside its layers", hexdigest)
        except Exception as exc:  # a disk full, or a bug: the mount goes on merging
            log.error("merged tree %s not kept in %s: %r", hexdigest, self.directory, exc)
            self._unlink(temp)

    def _held_points(self, digest: Digest, sha256: str) -> Held:
        """The `.gzi`, held by its index from now on (an eviction cannot take it from the
        layer's reads), once it is the file its `.idx` was made with: hashed (~3 ms for the
        1 MB of 15,000 members' points), where decompressing it took ~11 ms (and the first
        read decompresses it again, to import it)."""
        fd = self._open_own(f"{digest.hex}.gzi")
        try:
            found, offset = hashlib.sha256(), 0
            while data := os.pread(fd, _POINTS_READ, offset):
                found.update(data)
                offset += len(data)
            if found.hexdigest() != sha256:
                raise CorruptIndex("its seek points are not those it was made with")
            return Held(fd, self._held)
        except BaseException:
            os.close(fd)
            raise

    def _open_own(self, name: str) -> int:
        """Open an entry for reading: a regular file of ours, never through a link."""
        try:
            fd = os.open(name, _OPEN_READ, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptIndex(f"{name} is a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise CorruptIndex(f"{name} is not a regular file of ours")
        return fd

    # -- writing ---------------------------------------------------------------------

    def store(self, index: LayerIndex, encoded: bytes | None = None) -> None:
        """Keep `index` (atomically), then evict down to the bound; `encoded` is its file
        when at hand (the gzip child's, which `decode` made `index` from): kept as it is,
        not encoded again. A failure to write is logged, not raised: the index in memory
        serves this mount anyway. The least recently used entries go first to make room
        for it; an entry (with its copy or seek points) that alone passes the bound is not
        kept, its copy this mount's private file from then on."""
        hexdigest = index.digest.hex
        copy = index.copy
        temp = ""
        try:
            if copy is None or not copy.private:  # else its copy alone passed (logged)
                temp, fd = self._create_temp(hexdigest)
                with os.fdopen(fd, "wb") as file:
                    if encoded is None:
                        encode(index, file)
                    else:
                        file.write(encoded)
                    written = file.tell()
                size = written + (0 if copy is None else copy.size)
                if size <= self.max_bytes:
                    self._evict(keep=hexdigest, incoming=written)
                    self._rename(temp, f"{hexdigest}.idx")
                    return
                self._unlink(temp)
                self._remove(hexdigest)  # the copy's name: it is read through `copy` alone
                if copy is not None:
                    copy.make_private()
                self._not_kept(hexdigest, size, *_PRIVATE)
            self._evict()  # what is not kept leaves the bound to hold for the rest
        except OSError as exc:
            log.error("index of layer %s not kept in %s: %s", index.digest, self.directory, exc)
            self._unlink(temp)

    def pending(self, digest: Digest, suffix: str) -> PendingFile:
        """A new `.zst` or `.gzi` file of the layer's entry, written before its `.idx` is
        stored (a loaded `.idx` can count on them)."""
        return PendingFile(self, digest, suffix)

    def spool(self, layer: LayerRef) -> Held | None:
        """A new file for a copy of `layer`'s blob (`layer.size` bytes) without a name in
        the directory (O_TMPFILE, or one unlinked at once where the file system has none):
        whatever happens to the daemon, nothing is left behind once it is closed
        (`Held.close`). It counts in the bound as `layer.size` until then, the least
        recently used entries evicted first to make room; None, logged, when that alone
        passes the bound (then index without a copy)."""
        size = layer.size
        if size > self.max_bytes:
            self._not_kept(layer.digest.hex, size, "a copy of its blob", "indexed in process")
            return None
        self._evict(incoming=size)
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self._fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            temp = f".spool.{secrets.token_hex(8)}.tmp"
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temp, flags, 0o600, dir_fd=self._fd)
            self._unlink(temp)
        return Held(fd, self._held, size)

    def _evict(self, keep: str = "", incoming: int = 0) -> None:
        """`evict` where a failure is only logged: the index in memory serves anyway."""
        try:
            self.evict(keep, incoming)
        except OSError as exc:
            log.error("index cache %s: eviction failed: %s", self.directory, exc)

    def _not_kept(self, hexdigest: str, size: int, what: str, instead: str) -> None:
        """Log, once per layer and `what`, that it passes the bound alone."""
        if (hexdigest, what) in self._told:
            return
        self._told.add((hexdigest, what))
        log.warning(
            "layer %s:%s: %s (%d bytes) alone passes the index cache's bound of %d "
            "(--index-cache-size) in %s: %s",
            SHA256,
            hexdigest,
            what,
            size,
            self.max_bytes,
            self.directory,
            instead,
        )

    def _create_temp(self, hexdigest: str) -> tuple[str, int]:
        temp = f".{hexdigest}.{secrets.token_hex(8)}.tmp"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return temp, os.open(temp, flags, 0o600, dir_fd=self._fd)  # RDWR: to be `Held`

    def _rename(self, temp: str, name: str) -> None:
        os.rename(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._fd)

    def _remove(self, hexdigest: str) -> None:
        for suffix in (".idx", ".zst", ".gzi", ".tree"):
            self._unlink(hexdigest + suffix)

    def _touch(self, name: str) -> None:
        """Mark as recently used (mtime: atime is often not kept)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(name, dir_fd=self._fd, follow_symlinks=False)

    # -- the bound -------------------------------------------------------------------

    def _scan(self) -> tuple[dict[str, _Entry], int]:
        """hex digest → its entry, and the bytes held open here whose names are gone (in
        the bound too: the disk keeps them); old temporary files are removed."""
        found: dict[str, _Entry] = {}
        named: set[tuple[int, int]] = set()
        with os.scandir(self._fd) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                match = _NAME.fullmatch(entry.name)
                if match is None:
                    if _TEMP.fullmatch(entry.name) and time.time() - st.st_mtime > _STALE_TEMP:
                        self._unlink(entry.name)
                    continue
                key = (st.st_dev, st.st_ino)
                named.add(key)
                layer = found.setdefault(match[1], _Entry())
                layer.size += st.st_size
                layer.held |= key in self._held
                if match[2] in _USED:
                    layer.used = st.st_mtime
        return found, self._held.unnamed(named)

    def evict(self, keep: str | frozenset[str] = "", incoming: int = 0) -> int:
        """Remove the least recently used indexes (with their copies) past `max_bytes` less
        `incoming` (the bytes about to be stored), never those whose hex digest is (in)
        `keep` nor one with a file held open (`Held`: removing it would free nothing, and
        the next mount could not reuse it). Returns the bytes left, held files included."""
        kept = frozenset({keep}) if isinstance(keep, str) else keep
        entries, total = self._scan()
        total += sum(entry.size for entry in entries.values())
        room = self.max_bytes - incoming
        for hexdigest, entry in sorted(entries.items(), key=lambda item: item[1].used):
            if total <= room:
                break
            if hexdigest in kept or entry.held:
                continue
            self._remove(hexdigest)
            total -= entry.size
            log.info("index of layer %s:%s evicted from %s", SHA256, hexdigest, self.directory)
        if total > room:
            log.info(
                "index cache %s: %d bytes, past its bound of %d: the rest is in use",
                self.directory,
                total + incoming,
                self.max_bytes,
            )
        return total


# -- the file format -----------------------------------------------------------------


def encode(index: LayerIndex, file: BinaryIO) -> None:
    meta = indexfile.Meta(
        str(index.digest),
        index.format.value,
        index.blob_size,
        index.size,
        index.seek_points,
        index.points_sha256,
    )
    frames = [[f.uoffset, f.usize, f.coffset, f.csize, f.in_copy] for f in index.frames]
    chunks = [[key, *astuple(c)] for key, cs in index.chunks.items() for c in cs]
    indexfile.write(file, meta, indexfile.table(index.members), frames, chunks)


def decode(file: BinaryIO, digest: Digest) -> LayerIndex:
    reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(file))

    def line() -> Any:
        raw = reader.readline(_MAX_LINE)
        if not raw.endswith(b"\n"):
            raise CorruptIndex("ends early")
        return json.loads(raw)

    if reader.readline(len(indexfile.FORMAT_LINE)) != indexfile.FORMAT_LINE:
        raise CorruptIndex("another format or version")
    meta = line()
    if not isinstance(meta, dict) or meta.get("digest") != str(digest):
        raise CorruptIndex("the index of another layer")
    fmt = Format(meta["format"])
    size = _count(meta["size"])
    read: list[Member] = []
    count = _count(meta["members"])
    if count > Limits().members:  # a few KB of one-value columns would make millions
        raise CorruptIndex(f"{count} members, more than a pass ever keeps")
    bound = None if fmt is Format.ESTARGZ else size  # an eStargz file is its chunks
    found = treefile.Fingerprint()
    while len(read) < count:
        length = reader.readline(_LENGTH_LINE)
        if not _LENGTH.fullmatch(length) or int(length) > _MAX_LINE:
            raise CorruptIndex(f"a block of members of length {length!r:.40}")
        payload = reader.read(int(length))
        if len(payload) != int(length):
            raise CorruptIndex("ends early")
        read += _members(payload, bound, found)
    members = Table(read, found.hexdigest(), bytes(found.codes))
    frames = [_frame(row) for row in line()]
    chunks = _chunks(line(), members, fmt)
    if len(members) != count or len(frames) != meta["frames"]:
        raise CorruptIndex("another number of members or frames than it says")
    seek_points = _count(meta["seek_points"])
    if reader.read(1):
        raise CorruptIndex("more after its last line")
    _check_frames(frames, size)
    if (fmt is Format.GZIP) != bool(seek_points) or (fmt is Format.ZSTD) != bool(frames):
        raise CorruptIndex(f"seek points that do not fit a {fmt.value} layer")
    blob_size = _count(meta["blob_size"])
    points_sha256 = meta["points_sha256"]
    if type(points_sha256) is not str or (
        _SHA256.fullmatch(points_sha256) is None if seek_points else points_sha256 != ""
    ):
        raise CorruptIndex(f"a seek points digest {points_sha256!r:.80}")
    return LayerIndex(
        digest,
        fmt,
        blob_size,
        size,
        members,
        seek_points,
        frames,
        chunks,
        points_sha256=points_sha256,
    )


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise CorruptIndex(f"{value!r} where a count was expected")
    return value


def _chunks(rows: Any, members: list[Member], fmt: Format) -> dict[int, list[Chunk]]:
    """An eStargz layer's chunks: one list per FILE member (by its key), tiling the file."""
    chunks: dict[int, list[Chunk]] = {}
    for key, start, size, coffset, cend, inner, digest in rows:
        for value in (key, start, size, coffset, cend, inner):
            _count(value)
        chunks.setdefault(key, []).append(Chunk(start, size, coffset, cend, inner, str(digest)))
    if fmt is not Format.ESTARGZ:
        if chunks:
            raise CorruptIndex(f"eStargz chunks in a {fmt.value} layer")
        return chunks
    files = {m.offset: m for m in members if m.kind is Kind.FILE}
    if not set(chunks) <= set(files):
        raise CorruptIndex("eStargz chunks that are not its files'")
    for key, member in files.items():
        try:
            estargz.check_chunks(member, chunks.setdefault(key, []))
        except ValueError as exc:
            raise CorruptIndex(str(exc)) from None
    return chunks


def _members(payload: bytes, size: int | None, found: treefile.Fingerprint) -> list[Member]:
    """A block of members (`indexfile`), checked and made a column at a time: each column
    an array or a list of strings made in C, no Python call per member (57 → ~25 ms for
    the bench's 15,000 members, JSON rows before). What the merge reads of them goes into
    `found` as the file holds it."""
    block = _Block(memoryview(payload))
    (count,) = indexfile.COUNT.unpack(block.take(indexfile.COUNT.size))
    if not count:
        raise CorruptIndex("an empty block of members")
    codes = bytes(block.take(count))  # bytes: `in` and `picked` scan it in C
    try:
        kinds = indexfile.picked(_KIND_CODES, codes)
    except IndexError:
        raise CorruptIndex("a member of an unknown kind") from None
    widths = block.take(len(indexfile.INTS))
    columns = [
        block.numbers(width, count, signed=name == "mtime_ns")
        for name, width in zip(indexfile.INTS, widths, strict=True)
    ]
    mode, uid, gid, mtime_ns, lengths, offsets, major, minor = columns
    length, offset = _ints(lengths), _ints(offsets)  # ints made once: checked, then kept
    (paths, path_bytes), (links, link_bytes) = block.names(count), block.names(count)
    found.update(codes, path_bytes, link_bytes)
    xattrs: list[tuple[tuple[str, bytes], ...]] = [()] * count
    for at, pairs in json.loads(block.rest()):
        if type(at) is not int or not 0 <= at < count or not pairs:
            raise CorruptIndex(f"xattrs of member {at!r:.40}")
        xattrs[at] = _xattrs(pairs)
    if size is not None and max(map(add, offset, length)) > size:  # in C; which one, if any:
        for path, kind, start, end in zip(paths, kinds, offset, length, strict=True):
            if kind is Kind.FILE and start + end > size:
                raise CorruptIndex(f"member {path!r} beyond the end of the layer")
    return make_members(
        (
            _normal_paths(paths, path_bytes),
            kinds,
            _permissions(mode),
            uid,
            gid,
            mtime_ns,
            length,
            offset,
            _link_targets(codes, kinds, links),
            major,
            minor,
            xattrs,
        )
    )


def _normal_paths(paths: list[str], column: bytes) -> list[str]:
    """`normal_name` of each path (`column` is them as the file held them, `indexfile.names`):
    a stored index's were normalised when it was made, so all are usually returned as they
    are after one scan in C. With `/`, NUL and `.` made one byte, the paths are plain (no
    empty, `.` or `..` component, no leading or final `/`) if no two such bytes are
    neighbours and the first path starts with none of `/` and `.` (an empty one, the image
    root, may come first). Else each path is normalised (`normal_name`): a root further on,
    a `..` inside a name, a dot file (5 substring scans of them all joined took 3.7 ms of
    the bench's 15,000, this one 1.8)."""
    if column.startswith((b"/", b".")) or b"//" in column.translate(_SEPARATORS):
        return list(map(normal_name, paths))
    return paths


def _link_targets(codes: bytes, kinds: list[Kind], links: list[str]) -> list[str]:
    """Hard links' targets normalised again (paths in the image); symlinks' as stored. No
    Python step per member in a table without hard links (`codes`: the kinds' bytes)."""
    if _HARDLINK_CODE not in codes:
        return links
    hardlink = Kind.HARDLINK
    return [normal_name(t) if k is hardlink else t for k, t in zip(kinds, links, strict=True)]


def _permissions(mode: Sequence[int]) -> list[int]:
    """The permission bits, one int object per value: 0o644 is above 256, the ints Python
    shares, and would be 32 bytes a member."""
    try:
        return indexfile.picked(_PERMISSIONS, mode)
    except IndexError:  # bits above them (no index is negative: checked before)
        return [_PERMISSIONS[bits & 0o7777] for bits in mode]


def _ints(column: list[int] | array[int]) -> list[int]:
    return column if isinstance(column, list) else column.tolist()


class _Block:
    """Reads a block's parts in order; too short a block is CorruptIndex, not short data."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.at = 0

    def take(self, length: int) -> memoryview:
        part = self.view[self.at : self.at + length]
        if len(part) != length:
            raise CorruptIndex("a block of members that ends early")
        self.at += length
        return part

    def numbers(self, width: int, count: int, signed: bool) -> list[int] | array[int]:
        """A column of `count` numbers (`indexfile.numbers`); a negative one only if
        `signed`. One value for all is a list of that one int (an int above 256 is 32
        bytes a member, and making the members reads a list faster than an array)."""
        if width == indexfile.ONE_FOR_ALL:
            (value,) = _I64.unpack(self.take(8))
            if value < 0 and not signed:
                raise CorruptIndex("a member with a negative number")
            return [value] * count
        if width == 4:
            return indexfile.le_array("I", self.take(4 * count))
        if width != 8:
            raise CorruptIndex(f"a column of numbers {width} bytes wide")
        data = self.take(8 * count)
        # An i64 is negative if its last byte (little-endian) is 0x80 or more: a scan in C
        # of every eighth byte, where min() made an int object of every value.
        if not signed and not bytes(data[7::8]).isascii():
            raise CorruptIndex("a member with a negative number")
        return indexfile.le_array("q", data)

    def names(self, count: int) -> tuple[list[str], bytes]:
        """A column of `count` names (`indexfile.names`), and its bytes: split at once."""
        (size,) = indexfile.SIZE.unpack(self.take(indexfile.SIZE.size))
        data = bytes(self.take(size))
        text = data.decode("ascii") if data.isascii() else data.decode("utf-8", _ESCAPES)
        names = text.split("\0")
        if len(names) != count + 1 or names.pop():
            raise CorruptIndex("a column of names that does not fit its members")
        if indexfile.ESCAPE in text:  # a name holds a NUL (or the escape)
            names = list(map(_unescaped, names))
        return names, data

    def rest(self) -> bytes:
        return bytes(self.take(len(self.view) - self.at))


def _unescaped(name: str) -> str:
    if indexfile.ESCAPE not in name:
        return name
    try:
        return _ESCAPED_NAME.sub(lambda found: _UNESCAPE[found[1]], name)
    except KeyError:
        raise CorruptIndex(f"a name escaped as no writer does: {name!r:.80}") from None


def _xattrs(pairs: Any) -> tuple[tuple[str, bytes], ...]:
    return tuple((str(name), base64.b64decode(value, validate=True)) for name, value in pairs)


def _frame(row: Any) -> Frame:
    uoffset, usize, coffset, csize, in_copy = row
    for value in (uoffset, usize, coffset, csize):
        _count(value)
    return Frame(uoffset, usize, coffset, csize, in_copy is True)


def _check_frames(frames: list[Frame], size: int) -> None:
    """The frames must tile the uncompressed stream exactly, in order."""
    end = 0
    for frame in frames:
        if frame.uoffset != end:
            raise CorruptIndex(f"a zstd frame at {frame.uoffset}, {end} expected")
        end += frame.usize
    if frames and end != size:
        raise CorruptIndex("zstd frames that do not cover the layer")
