"""gzip layers indexed in one decompression, by rapidgzip in a subprocess: the daemon's side.

rapidgzip (ISA-L inflate) decompresses a gzip layer while it records seek points, so the
tar member table and the seek points come from one decompression instead of two (zlib and
indexed_gzip, `gzipseek.GzipPass`). It runs in a child process (`gzipchild`, which forks
the decompression into one more), never in the daemon: a build peaks at ~125 MB (1 MiB
chunks), it calls `std::terminate` if one of its files is open at interpreter exit, and its
reads through a Python file object would need the GIL. The child gets the blob as a file
descriptor: the source's own (`api.local_fileno`: a storage root's blob file; the child
then hashes it too, in a thread beside the decompression) or an anonymous copy in the cache
directory (`IndexCache.spool`), made while the blob is read and hashed in order as the
in-process pass reads it. A child is started ahead of its pass (`Children`: one spare, at
mount and after each pass) and waits, its modules loaded, for its request on its stdin (a
Unix socket: the request and the two descriptors in one message); it ends when that socket
does (the daemon ended or gave it up). It writes the seek points into a new
file of the cache entry (`.gzi`, a descriptor it is given: they never pass through the
daemon's memory) and answers on stdout: progress lines, one status line, then the encoded
index (`indexfile.write`), which the daemon decodes and checks like a stored one before it
commits the points. What the child declines (`gzipchild`) the in-process pass indexes. A
child that dies is a failure of this pass (`IndexProcessFailed`), not a bad layer: the view
shows EIO and tries again at the next lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import trio

from ..api import BlobReader, local_fileno
from ..digests import Digest
from ..errors import StorageError
from ..gcpause import gc_paused
from . import errors
from .blobfile import BlobFile
from .errors import BadLayer
from .gzipchild import Request
from .tarscan import Limits

if TYPE_CHECKING:
    from .cache import IndexCache
    from .index import LayerIndex, LayerRef, Progress

log = logging.getLogger(__name__)

_LINE_MAX = 1 << 16  # bytes of a progress or status line
_STDERR_KEPT = 4096  # the end of the child's stderr, logged when it fails
# Where the child imports from: what holds the `storage` package, then the venv's packages
# (the child runs without `site`: -S saves its ~13 ms, most of it the editable install's hook).
_PATHS = [
    str(Path(__file__).resolve().parents[2]),
    *dict.fromkeys(sysconfig.get_path(name) for name in ("purelib", "platlib")),
]
_CHILD = (
    "import sys; sys.path[:0] = sys.argv[1:]; "
    "from storage.rootfs import gzipchild; gzipchild.child()"
)


class IndexProcessFailed(StorageError):
    """The indexing subprocess died or answered nonsense: this pass failed, not the layer."""


# -- the daemon's side ---------------------------------------------------------------


async def index_gzip(
    reader: BlobReader,
    layer: LayerRef,
    cache: IndexCache,
    limits: Limits,
    progress: Progress,
    head: bytes,
    children: Children,
) -> tuple[LayerIndex, bytes] | None:
    """The layer's index from the child and its file as the child wrote it (to be kept as
    it is), or None when the child declines the layer (see `gzipchild`); BadLayer for a bad
    one, IndexProcessFailed when the child fails. `head` is the blob's first window, read."""
    own = local_fileno(reader)  # a local root's blob file: read in place, no copy
    verify = own is not None
    spool = None
    if own is None:  # a copy, in the cache's bound while it lives
        spool = await trio.to_thread.run_sync(cache.spool, layer)
        if spool is None:
            return None  # it alone would pass the bound: indexed in process (logged)
        own = spool.fd
    try:  # the spool is closed on every way out: it counts in the bound while open
        points = await trio.to_thread.run_sync(cache.pending, layer.digest, ".gzi")
        try:
            fd = os.dup(own)
            try:
                request = Request(
                    fd,
                    points.file.fileno(),
                    str(layer.digest),
                    layer.size,
                    verify,
                    dataclasses.asdict(limits),
                )
                copy = (
                    None if verify else functools.partial(_spool, reader, layer, fd, progress, head)
                )
                encoded = await _run_child(
                    children, request, layer.digest, copy, progress if verify else None
                )
            finally:
                os.close(fd)
            index = None if encoded is None else await _decode(encoded, layer.digest)
        except BaseException:
            points.discard()
            raise
    finally:
        if spool is not None:
            spool.close()
    if index is None or encoded is None:
        points.discard()
        return None
    held = await trio.to_thread.run_sync(functools.partial(points.commit, hold=True))
    return replace(index, copy=held), encoded


async def _decode(encoded: bytes, digest: Digest) -> LayerIndex:
    from .cache import decode  # cache imports index, which imports this module

    def run() -> LayerIndex:
        with gc_paused():  # as a stored index's load (`members.gc_paused`)
            return decode(io.BytesIO(encoded), digest)

    try:
        index: LayerIndex = await trio.to_thread.run_sync(run)
    except Exception as exc:  # whatever a damaged encoding makes the decoder raise
        raise IndexProcessFailed(f"layer {digest}: the index subprocess sent {exc}") from exc
    return index


async def _spool(
    reader: BlobReader, layer: LayerRef, fd: int, progress: Progress, head: bytes
) -> None:
    """Copy the blob into the nameless file `fd`, hashed while it is read in order
    (LayerDigestMismatch); `head` is its first window, read already."""
    stop = threading.Event()
    blob = BlobFile(
        reader,
        layer.digest,
        layer.size,
        trio.lowlevel.current_trio_token(),
        windows=1,
        on_read=progress.update,
        stop=stop,
        head=head,
    )
    try:
        # The thread writes through its own descriptor and closes it however it ends: when
        # abandoned (cancelled), it stops at its next read and never writes to a reused one.
        await trio.to_thread.run_sync(_copy, blob, os.dup(fd), abandon_on_cancel=True)
    except BaseException:
        stop.set()
        raise


def _copy(blob: BlobFile, fd: int) -> None:
    try:
        offset = 0
        while data := blob.window_at(offset):
            os.pwrite(fd, data, offset)
            offset += len(data)
        blob.verify()  # read whole and in order: LayerDigestMismatch if it differs
    finally:
        os.close(fd)


@dataclasses.dataclass
class Child:
    """An index subprocess, started before its request: its modules load meanwhile."""

    process: subprocess.Popen[bytes]
    control: socket.socket  # the daemon's end of the child's stdin: the request goes there
    stdout: int  # the read end of the child's stdout
    stderr: IO[bytes]  # a nameless file: its end is logged when the child fails

    @classmethod
    def start(cls) -> Child:
        """Blocking (fork and exec: a few ms); OSError when no process can be started."""
        with contextlib.ExitStack() as undo:  # what is undone if it fails
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            undo.callback(ours.close)
            stdout, write_end = os.pipe()
            undo.callback(os.close, stdout)
            stderr = undo.enter_context(tempfile.TemporaryFile())
            command = [sys.executable, "-I", "-S", "-c", _CHILD, *_PATHS]
            with theirs:
                try:
                    process = subprocess.Popen(
                        command, stdin=theirs.fileno(), stdout=write_end, stderr=stderr
                    )
                finally:
                    os.close(write_end)
            undo.pop_all()
        return cls(process, ours, stdout, stderr)

    def send(self, request: Request) -> None:
        """The request, with its two descriptors; OSError if the child is gone."""
        message = json.dumps(dataclasses.asdict(request)).encode()
        socket.send_fds(self.control, [message], [request.fd, request.points_fd])

    async def wait(self) -> int:
        if self.process.returncode is None:
            pidfd = os.pidfd_open(self.process.pid)
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
        return self.process.wait()

    def close(self) -> None:
        """End it (if it runs) and reap it: SIGKILL, which it cannot delay."""
        if self.process.returncode is None:
            self.process.kill()
            self.process.wait()
        self.control.close()
        self.stderr.close()
        if self.stdout >= 0:  # not taken by the answer's stream
            os.close(self.stdout)

    def tail(self) -> str:
        """The end of what the child wrote on its stderr."""
        self.stderr.seek(max(0, self.stderr.seek(0, os.SEEK_END) - _STDERR_KEPT))
        return self.stderr.read().decode(errors="replace").strip()


class Children:
    """The index subprocesses of one indexer: at most one spare, started ahead (`keep_spare`:
    at mount; then after each pass) so that a pass finds the child's ~0.1-0.25 s of start
    and imports done. A spare blocks on its stdin and ends when the daemon's end closes, so
    a daemon killed with SIGKILL leaves none behind either. A spare that cannot be started
    is logged, and each pass starts its own child as it comes."""

    def __init__(self) -> None:
        self._spare: Child | None = None
        self._ahead = False

    def keep_spare(self) -> None:
        """Start a spare now, and another after each pass, until `close`."""
        self._ahead = True
        self._replace()

    def take(self) -> Child:
        """The spare if it is alive, else a child started now."""
        spare, self._spare = self._spare, None
        if spare is not None:
            if spare.process.poll() is None:
                return spare
            log.warning("the spare index subprocess ended (status %s)", spare.process.returncode)
            spare.close()
        return Child.start()

    def after_pass(self) -> None:
        if self._ahead:
            self._replace()

    def close(self) -> None:
        """End the spare (at unmount); no other is started."""
        self._ahead = False
        if self._spare is not None:
            self._spare.close()
            self._spare = None

    def _replace(self) -> None:
        if self._spare is not None:
            return
        try:
            self._spare = Child.start()
        except OSError as exc:
            log.warning("no index subprocess started ahead (%s): each pass starts one", exc)


async def _run_child(
    children: Children,
    request: Request,
    digest: Digest,
    copy: Callable[[], Awaitable[None]] | None,
    progress: Progress | None,
) -> bytes | None:
    """Take a child, make the copy (if any) meanwhile, send the request and take its answer;
    the child never outlives this call."""
    child = children.take()
    answer = None
    try:
        if copy is not None:
            await copy()
        with contextlib.suppress(OSError):  # it is gone: said below
            child.send(request)
        stdout = trio.lowlevel.FdStream(child.stdout)  # it owns the descriptor now
        child.stdout = -1
        try:
            answer = await _read_answer(stdout, progress)
            await child.wait()
        finally:
            with trio.CancelScope(shield=True):
                await stdout.aclose()
    finally:
        if child.process.returncode is None:  # cancelled (an unmount) or failed
            child.process.kill()
        with trio.CancelScope(shield=True):
            await child.wait()
        status = child.process.returncode
        tail = child.tail() if status != 0 or answer is None else ""
        child.close()
    children.after_pass()  # not when cancelled: an unmount
    if status != 0 or answer is None:
        log.error("layer %s: the index subprocess failed: %s", digest, tail or "no output")
        raise IndexProcessFailed(f"layer {digest}: the index subprocess ended with status {status}")
    return _outcome(answer, digest)


async def _read_answer(
    stream: trio.abc.ReceiveStream, progress: Progress | None
) -> tuple[dict[str, Any], bytes] | None:
    """The child's status and what follows it; None when it ends without one."""
    buffer = bytearray()
    status: dict[str, Any] | None = None
    async for data in stream:
        buffer += data
        while status is None and (end := buffer.find(b"\n", 0, _LINE_MAX)) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            try:
                if line.startswith(b"p "):
                    if progress is not None:
                        progress.update(int(line[2:]))
                    continue
                status = json.loads(line)
            except ValueError:
                return None
        if status is None and len(buffer) >= _LINE_MAX:
            return None
    return (status, bytes(buffer)) if isinstance(status, dict) else None


def _outcome(answer: tuple[dict[str, Any], bytes], digest: Digest) -> bytes | None:
    status, rest = answer
    if status.get("ok") is True:
        return rest
    if "declined" in status:
        log.info("layer %s: %s; indexed in process instead", digest, status["declined"])
        return None
    kind = getattr(errors, str(status.get("bad")), None)
    if isinstance(kind, type) and issubclass(kind, BadLayer):
        raise kind(digest, str(status.get("why")))
    raise IndexProcessFailed(f"layer {digest}: the index subprocess answered {status!r:.200}")
