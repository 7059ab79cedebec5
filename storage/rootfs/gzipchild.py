"""The gzip index subprocess (`fastgzip`): one decompression by rapidgzip, the tar scanned
on the way.

The daemon starts it ahead of its pass (`python -c`, this module's `child`), it waits for
its request on its stdin and answers on stdout; see `fastgzip` for the protocol and why a
child. This module is kept light on imports (no trio,
no indexed_gzip, none of the daemon's modules): the child's start is on the first `cat`'s
path, and importing those took ~0.15-0.2 s of its ~0.3 s. It forks the decompression into a
process of its own (`_Decoder`): rapidgzip's reads want the GIL back after each block, so in
one process it and tarfile's header parsing took turns for one core.

rapidgzip exports its seek points in indexed_gzip's format, which the reads use
(`gzipseek.GzipReader`), but a point whose window rapidgzip found unneeded carries none,
which indexed_gzip takes for the start of a gzip member: such points get a zeroed window
(never read: nothing after the point refers back past it). What rapidgzip refuses (data
after the last member, which gzip(1) ignores) or cuts short without an error (a truncated
stream) the child declines, and the in-process pass indexes that layer with its own checks
and messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import IO, Any, BinaryIO

import zstandard

from ..digests import Digest
from . import indexfile, tarscan
from .errors import BadLayer, CorruptLayer, LayerDigestMismatch
from .tarscan import Limits, TarTable

CHUNK = 1 << 20  # rapidgzip's compressed bytes per chunk = per seek point: ~0.4 MB per read
POINTS_LEVEL = 1  # zstd level of the `.gzi`: 18 MB of points in 16 ms (level 3: 38 ms, 6% smaller)
_OUT = 1 << 20  # decompressed bytes per read in the child
# Slots of `_OUT` bytes between the decoder and the tar scan (`_Decoder`). Both go in bursts
# (rapidgzip decodes a chunk at a time; the scan's cost per MiB follows its headers): with 4
# the decoder waited for a slot ~0.15 s of its ~1.2 s on two idle cores, with 16 ~0.09 s
# (~24 MB more RSS, which counts them in both processes).
_SLOTS = 16
_RECORD = struct.Struct("<qqq")  # a slot (-1: the outcome), its bytes, the blob position
_DATA_ENDED = -2  # the slot of the record after the last data: the outcome comes later
_SLOT = struct.Struct("<q")  # a slot given back
_PR_SET_PDEATHSIG = 1
_HASH_READ = 4 << 20
_REQUEST_MAX = 1 << 16  # bytes of the request's message
_PROGRESS_EVERY = 4 << 20  # blob bytes between two progress lines of the child
_HEADER = struct.Struct("<5sBBQQIII")  # indexed_gzip's GZIDX header (version 1)
_POINT = struct.Struct("<QQBB")  # compressed offset, uncompressed offset, bits, has a window


class Declined(Exception):
    """A gzip form the child leaves to the in-process pass."""


@dataclass(frozen=True)
class Request:
    """What the child is asked: one message on its stdin, JSON with the two descriptors."""

    fd: int  # the blob (the number is the daemon's: the child's comes with the message)
    points_fd: int  # where the seek points go (`compress_points`)
    digest: str
    size: int
    verify: bool  # hash the blob in the child (the daemon did not read it)
    limits: dict[str, int]


@dataclass(frozen=True)
class _Index:
    table: TarTable
    lines: indexfile.Table  # the table as the index file's lines
    points: int  # bytes of seek points written
    points_sha256: str  # of the `.gzi` file


def compress_points(points: bytes, file: BinaryIO) -> str:
    """Write exported seek points into `file` as one zstd frame with its checksum (as
    `gzipseek.write_points` does from an indexed_gzip object); the sha256 of what was
    written (the `.idx` keeps it: a load checks the `.gzi` by it)."""
    compressed = zstandard.ZstdCompressor(level=POINTS_LEVEL, write_checksum=True).compress(points)
    file.write(compressed)
    return hashlib.sha256(compressed).hexdigest()


def child() -> None:
    """The child's whole run (see the module docstring); what it answers is its output."""
    with contextlib.suppress(ImportError):  # loaded while it waits; `_Decoder` says if not
        import rapidgzip  # noqa: F401
    message, fds, _, _ = socket.recv_fds(socket.socket(fileno=0), _REQUEST_MAX, 2)
    if not message:
        return  # the daemon ended, or gave this child up
    if len(fds) != 2:
        raise RuntimeError(f"a request with {len(fds)} descriptors")
    request = replace(Request(**json.loads(message)), fd=fds[0], points_fd=fds[1])
    out = sys.stdout.buffer
    digest = Digest.parse(request.digest)
    mismatch: list[BadLayer] = []
    index: _Index | None = None
    try:
        with _Decoder(request) as decoder:  # forked before this process has a thread
            hasher = threading.Thread(target=_hash, args=(request, digest, mismatch))
            if request.verify:
                hasher.start()
            try:
                index = _index(request, digest, decoder, out)
            finally:
                if request.verify:
                    hasher.join()
        status: dict[str, Any] = {"ok": True}
    except Declined as exc:
        status = {"declined": str(exc)}
    except BadLayer as exc:
        status = {"bad": type(exc).__name__, "why": exc.why}
    if mismatch:  # what the blob is comes before what it holds
        index = None
        status = {"bad": type(mismatch[0]).__name__, "why": mismatch[0].why}
    out.write(json.dumps(status).encode() + b"\n")
    if index is not None:
        meta = indexfile.Meta(
            request.digest,
            "gzip",
            request.size,
            index.table.size,
            index.points,
            index.points_sha256,
        )
        indexfile.write(out, meta, index.lines)
    out.flush()


def _hash(request: Request, digest: Digest, mismatch: list[BadLayer]) -> None:
    """The blob's digest (hashlib lets go of the GIL), as `BlobFile.verify` checks it."""
    sha = hashlib.sha256()
    offset = 0
    while offset < request.size:
        data = os.pread(request.fd, min(_HASH_READ, request.size - offset), offset)
        if not data:
            why = f"{offset} bytes, {request.size} expected: shorter than its size"
            mismatch.append(CorruptLayer(digest, why))
            return
        sha.update(data)
        offset += len(data)
    if sha.hexdigest() != digest.hex:
        mismatch.append(LayerDigestMismatch(digest, f"its bytes hash to sha256:{sha.hexdigest()}"))


def _index(request: Request, digest: Digest, decoder: _Decoder, out: IO[bytes]) -> _Index:
    table = tarscan.scan(decoder.chunks(out), digest, Limits(**request.limits))
    lines = indexfile.table(table.members)  # while the decoder writes the seek points
    return _Index(table, lines, *decoder.outcome())


class _Decoder:
    """rapidgzip in a process of its own, forked from the child, which meanwhile parses the
    tar: the decompression (ISA-L, without the GIL) and tarfile's header parsing (with it)
    each had a core, where in one process they took turns (rapidgzip's reads want the GIL
    back after each block: a busy Python thread beside one made it several times slower).
    The decompressed stream goes through `_SLOTS` slots of a shared mapping, which the
    decoder fills with `readinto` (no copy of its own); records on a pipe say which slot
    holds what, and the child gives each slot back once it has copied it. After the stream
    the decoder writes the seek points (`points_fd`) and sends its outcome: their length,
    or why it declines the layer. It dies with the child (PR_SET_PDEATHSIG, and its pipes
    break), and the child kills it when it stops reading early (a bad layer)."""

    def __init__(self, request: Request) -> None:
        try:
            import rapidgzip  # only ever loaded in the child
        except ImportError as exc:
            raise Declined(f"rapidgzip cannot be loaded ({exc})") from None
        self._ring = mmap.mmap(-1, _SLOTS * _OUT)  # MAP_SHARED: the decoder's writes show here
        filled, self._filled_w = os.pipe()
        self._free_r, free = os.pipe()
        parent = os.getpid()
        self._pid = os.fork()
        if self._pid == 0:  # the decoder
            _die_with(parent)
            os.close(filled)
            os.close(free)
            _run_decoder(rapidgzip, request, self._ring, self._filled_w, self._free_r)
        os.close(self._filled_w)
        os.close(self._free_r)
        self._filled, self._free = filled, free
        self._status: dict[str, Any] | None = None

    def chunks(self, out: IO[bytes]) -> Iterator[bytes]:
        """The decompressed stream, with a progress line every `_PROGRESS_EVERY` blob bytes;
        Declined where rapidgzip fails."""
        view = memoryview(self._ring)
        told = 0
        while True:
            slot, length, where = _RECORD.unpack(_read_exactly(self._filled, _RECORD.size))
            if slot == _DATA_ENDED:  # the outcome follows once the seek points are written
                return
            if slot < 0:
                self._status = json.loads(_read_exactly(self._filled, length))
                if "declined" in self._status:
                    raise Declined(str(self._status["declined"]))
                return
            if not 0 <= slot < _SLOTS or not 0 < length <= _OUT:
                raise RuntimeError(f"the decoder sent slot {slot} of {length} bytes")
            data = bytes(view[slot * _OUT : slot * _OUT + length])
            with contextlib.suppress(BrokenPipeError):  # it has ended: the end record says how
                os.write(self._free, _SLOT.pack(slot))
            if where - told >= _PROGRESS_EVERY:
                out.write(b"p %d\n" % where)
                out.flush()
                told = where
            yield data

    def outcome(self) -> tuple[int, str]:
        """The length of the seek points the decoder wrote and the sha256 of their file,
        once the stream has ended (the tar scan drains it); Declined if it declines."""
        while self._status is None:  # after the data's end, or the scan stopped before it
            for _ in self.chunks(io.BytesIO()):
                pass
        points, sha256 = self._status.get("points"), self._status.get("sha256")
        if type(points) is not int or type(sha256) is not str:
            raise RuntimeError(f"the decoder answered {self._status!r:.200}")
        return points, sha256

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._filled)
        os.close(self._free)
        if self._status is None:  # stopped early: whatever the decoder does is not wanted
            os.kill(self._pid, signal.SIGKILL)
        _, code = os.waitpid(self._pid, 0)
        if self._status is not None and code != 0:
            raise RuntimeError(f"the decoder ended with status {code}")


def _die_with(parent: int) -> None:
    """End this process when `parent` (the child, which forked it) ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the call
        os._exit(1)


def _run_decoder(rapidgzip: Any, request: Request, ring: mmap.mmap, filled: int, free: int) -> None:
    """The decoder's whole run (`_Decoder`); it never returns."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):  # the child's pipes to the daemon: its answer ends with the child
            os.dup2(null, fd)
        status = _decompress(rapidgzip, request, memoryview(ring), filled, free)
        encoded = json.dumps(status).encode()
        _write(filled, _RECORD.pack(-1, len(encoded), 0) + encoded)
        code = 0
    except BrokenPipeError:
        pass  # the child stopped reading: nothing more is wanted
    except BaseException:  # to the child's stderr, which the daemon logs the end of
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)  # no interpreter exit: rapidgzip's file would std::terminate it


def _decompress(
    rapidgzip: Any, request: Request, view: memoryview, filled: int, free: int
) -> dict[str, Any]:
    """Fill the slots (one record each), then write the seek points; the end's status."""
    vacant = list(range(_SLOTS))
    try:
        # By path, so that rapidgzip reads the descriptor itself.
        with rapidgzip.RapidgzipFile(
            f"/proc/self/fd/{request.fd}", parallelization=1, chunk_size=CHUNK
        ) as gz:
            while True:
                if not vacant:
                    (slot,) = _SLOT.unpack(_read_exactly(free, _SLOT.size))
                    vacant.append(slot)
                slot = vacant.pop()
                length = gz.readinto(view[slot * _OUT : (slot + 1) * _OUT])
                if not length:
                    break
                _write(filled, _RECORD.pack(slot, length, gz.tell_compressed() // 8))
            end = max(gz.block_offsets(), default=0)
            if end != request.size * 8:  # it stops quietly where a stream is cut short
                return {"declined": f"rapidgzip stopped at byte {end // 8} of {request.size}"}
            _write(filled, _RECORD.pack(_DATA_ENDED, 0, 0))  # the scan can end meanwhile
            exported = io.BytesIO()
            gz.export_index(exported)
    except (ValueError, RuntimeError) as exc:  # a bad CRC or deflate data, or worse
        return {"declined": f"rapidgzip: {exc}"}
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        return {"declined": f"rapidgzip: {exc}"}
    try:
        points = fill_windows(exported.getvalue())
    except Declined as exc:
        return {"declined": str(exc)}
    with open(request.points_fd, "wb", closefd=False) as file:
        sha256 = compress_points(points, file)
    return {"points": len(points), "sha256": sha256}


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            raise BrokenPipeError("the other process ended")
        data += more
    return data


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def fill_windows(exported: bytes) -> bytes:
    """rapidgzip's exported seek points with a zeroed window at each point inside a stream
    that has none (see the module docstring): indexed_gzip would read a gzip header there."""
    magic, version, flags, csize, usize, spacing, window, count = _HEADER.unpack_from(exported)
    if magic != b"GZIDX" or version != 1:
        raise Declined(f"rapidgzip exported seek points of format {magic!r} {version}")
    at = _HEADER.size
    points: list[bytes] = []
    windows: list[bytes | memoryview] = []  # views: the join below is their one copy
    view, zeros = memoryview(exported), bytes(window)
    read = at + count * _POINT.size  # where the next window is
    for number in range(count):
        coffset, uoffset, bits, has = _POINT.unpack_from(exported, at + number * _POINT.size)
        if has:
            windows.append(view[read : read + window])
            read += window
        elif 0 < uoffset < usize:
            windows.append(zeros)
            has = 1
        points.append(_POINT.pack(coffset, uoffset, bits, has))
    if read != len(exported):
        raise Declined("rapidgzip exported seek points of an unexpected length")
    header = _HEADER.pack(magic, version, flags, csize, usize, spacing, window, count)
    return b"".join([header, *points, *windows])
