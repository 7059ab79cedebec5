"""Open files: one class per kind, each with read, write, flush and release.

Errors meant for close() (a digest mismatch, a refused manifest) can only reach the user from
flush: release comes after close() has returned. So whatever finishes on close happens in the
flush of the last close (`Close.LAST`, regfs/closers.py): the close of one of several
descriptors ends nothing (a shell dups a redirected descriptor and closes the original before
anything is written; the children of `{ cat a; cat b; } > tags/v1` close theirs as they
exit). When the closer cannot be told (`Close.UNKNOWN`), a flush with writes since the last
end ends the file, as before closes were told apart. What no flush ended, release ends, its
errors only logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable

import trio
from pyfuse3 import FUSEError

from storage.api import BlobReader, Buffer, Upload, UploadInfo
from storage.digests import Digest, digest_bytes
from storage.errors import (
    DigestMismatch,
    InvalidManifest,
    InvalidOffset,
    MissingReference,
    UnknownUpload,
)
from storage.manifest_format import MAX_MANIFEST_SIZE

from .closers import Close, Opener
from .nodes import (
    Attr,
    FinishedNode,
    LayerNode,
    ManifestNode,
    TagNode,
    UploadNode,
    digest_name,
)
from .tree import Tree

log = logging.getLogger(__name__)


class Handle:
    """An open file; the base refuses what a handle of its kind cannot do.

    opener: who opened a tag or an upload, or a file being written (None: unknown or
    another file): only a writer's last close ends it."""

    opener: Opener | None = None

    @property
    def process(self) -> int:
        """The opener's process (tgid), 0 if not told."""
        return self.opener.process if self.opener is not None else 0

    async def read(self, offset: int, size: int) -> Buffer:
        raise FUSEError(errno.EBADF)

    async def write(self, offset: int, data: bytes) -> int:
        raise FUSEError(errno.EBADF)

    async def truncate(self, size: int) -> None:
        raise FUSEError(errno.EPERM)

    def ends_on_close(self) -> bool:
        """Whether a close could end something (and so whose close it is matters)."""
        return False

    async def flush(self, close: Close) -> None:
        pass

    async def release(self) -> None:
        pass

    def pending_attr(self) -> Attr | None:
        """Attributes of content that is not in storage yet (a tag being written)."""
        return None


# Said after a manifest refused for what its repository lacks: a copy of a repository
# (`cp -a`, `tar -x`, `rsync`) stores what it meets in the order it meets it (README).
ORDER_HINTS = {
    False: "; its blobs go into layers/ first (copying a repository: layers/, then "
    "manifests/, then tags/)",
    True: "; an index's manifests go into manifests/ before it is stored or tagged (copying "
    "a repository: layers/, the images' manifests, the indexes, then tags/)",
}


class ReadHandle(Handle):
    def __init__(self, reader: BlobReader) -> None:
        self.reader = reader

    async def read(self, offset: int, size: int) -> Buffer:
        return await self.reader.read_at(offset, size)

    async def release(self) -> None:
        await self.reader.aclose()


class FinishedWriter(Handle):
    """A finished upload's name (`FinishedNode`) opened for writing without O_TRUNC within
    FINISHED_GRACE: `dd conv=notrunc` or a resume script run again after the upload
    finished at its close. The file is the layer, and a layer never changes: a write of the
    bytes it holds at that offset is taken and changes nothing (as it would change nothing
    in a local file), and so is a truncate to its own size; one that would change it (other
    bytes, past its end, another size) is EPERM, with a log line. Nothing ends at close."""

    def __init__(self, node: FinishedNode, reader: BlobReader, size: int) -> None:
        self.node = node
        self.reader = reader
        self.size = size

    async def read(self, offset: int, size: int) -> Buffer:
        return await self.reader.read_at(offset, size)

    async def release(self) -> None:
        await self.reader.aclose()

    async def write(self, offset: int, data: bytes) -> int:
        if offset + len(data) <= self.size and await self.reader.read_at(offset, len(data)) == data:
            return len(data)
        what = f"a write of {len(data)} bytes at {offset} that are not its own"
        raise finished_refusal(self.node, self.size, what)

    async def truncate(self, size: int) -> None:
        if size != self.size:
            raise finished_refusal(self.node, self.size, f"a truncate to {size} bytes")


def finished_refusal(node: FinishedNode, size: int, what: str) -> FUSEError:
    """EPERM, logged, for what would change the layer a finished upload's name became."""
    log.info(
        "write: uploads/%s of %s is the layer it finished as (%d bytes), which never "
        "changes: %s is refused (EPERM); write a new upload (O_TRUNC, or after rm)",
        node.digest,
        node.repo,
        size,
        what,
    )
    return FUSEError(errno.EPERM)


class UploadHandle(Handle):
    """The one writer of an upload. Data goes through the driver as it comes, never spooled.

    An upload named by its digest finishes at its last close after a write (or its release).
    One removed while open (`removed`: rm) takes writes on, finishes nothing, and is
    cancelled in storage by its last close (or its release).

    `layer`: created as layers/<digest> (a tool that replaces a layer unlinks it, then
    creates it): it finishes at its last close even if nothing was written (the empty
    layer), not as uploads/<digest> (no `FinishedNode`), and one whose bytes hash to
    another digest is cancelled: nothing is linked, nothing is left.
    """

    def __init__(
        self, tree: Tree, node: UploadNode, upload: Upload, name: str, layer: bool = False
    ) -> None:
        self.tree = tree
        self.node = node
        self.upload = upload
        self.name = name
        self.layer = layer
        self.finished = False
        self.removed = False
        self._written = layer
        self._written_ns: int | None = None  # the last write's time: what stat shows
        self._finishing: Attr | None = None  # what it was when its finish began

    async def read(self, offset: int, size: int) -> Buffer:
        await self.upload.settle()  # its own appends, answered before they were written
        reader = await self.tree.open(self.node)
        try:
            return await reader.read_at(offset, size)
        finally:
            await reader.aclose()

    async def write(self, offset: int, data: bytes) -> int:
        if self.finished:
            raise FUSEError(errno.EBADF)
        try:
            await self.upload.write_at(offset, data)
        except InvalidOffset as exc:
            # The storage says why: a gap, or (remote) a write below the end.
            log.info("write: %s: %s (EINVAL)", self.name, exc)
            raise
        self._written = True
        self._written_ns = time.time_ns()
        return len(data)

    async def truncate(self, size: int) -> None:
        await self.upload.truncate(size)
        self._written = True

    def pending_attr(self) -> Attr | None:
        """The upload as this writer has it: the only writer, on any node, so storage need
        not be asked (a `cp` stats its file after every write: on S3 a GET and a listing
        each). While its finish runs, what it was when that began: storage's upload loses
        its data before its name goes. None once it is finished: then storage says."""
        if self.finished:
            return None
        if self._finishing is not None:
            return self._finishing
        try:
            size = self.upload.size
        except UnknownUpload:  # its writer closed by a finish under way
            return None
        written = UploadInfo(self.node.uuid, self.upload.started_at, size, self._written_ns)
        return Attr(False, size, written.mtime_ns)

    def ends_on_close(self) -> bool:
        if self.finished:
            return False
        return self.removed or (self._written and digest_name(self.name) is not None)

    async def flush(self, close: Close) -> None:
        if self.removed:  # cancelled by the last close, so nothing of it is left after
            if close is Close.LAST and not self.finished:
                await self._cancel("flush")
            return
        if self.finished or not self._written:
            return
        if close is Close.NOT_LAST or not self.ends_on_close():
            await self.upload.flush()  # what close(2) returns after is in storage
            self._written = self.ends_on_close()  # still to be finished by the last close
            return
        await self._finish("flush")

    async def release(self) -> None:
        """Finish (or cancel) what no flush did (a last close by another process than the
        opener, or not told apart), then let the upload go; a refusal is only logged now."""
        if self.removed:
            if not self.finished:
                await self._cancel("release")
            return
        try:
            if self.ends_on_close():
                with contextlib.suppress(FUSEError):  # logged
                    await self._finish("release")
        finally:
            if not self.finished:  # whatever the finish raised: never leave it locked
                with trio.CancelScope(shield=True):
                    await self.upload.close()

    async def _cancel(self, operation: str, why: str = "removed while written") -> None:
        """The end of an upload removed while written (or a layer's that is not its own):
        cancelled in storage, as rm does."""
        self.finished = True  # no more writes, and storage says what stat shows
        await self.upload.cancel()
        log.info("%s: upload %s (%s) %s: cancelled", operation, self.name, self.node.uuid, why)

    async def _finish(self, operation: str) -> None:
        self._written = False
        expected = digest_name(self.name)
        assert expected is not None  # ends_on_close said so
        self._finishing = self.pending_attr()
        try:
            await self.tree.finish_upload(self.node, self.upload, expected, named=not self.layer)
        except DigestMismatch as exc:
            if self.layer:
                log.error("%s: layers/%s not linked: %s (EIO)", operation, self.name, exc)
                await self._cancel(operation, "written as a layer it is not")
                await self.tree.layer_refused(LayerNode(self.node.repo, expected), self.process)
                raise FUSEError(errno.EIO) from None
            log.error(
                "%s: upload %s (%s) not finished: %s; it stays for a resume or rm",
                operation,
                self.name,
                self.node.uuid,
                exc,
            )
            raise FUSEError(errno.EIO) from None
        finally:
            self._finishing = None
        self.finished = True
        if self.removed:  # rm came while it finished: the layer stays, its name goes
            await self.tree.remove(FinishedNode(self.node.repo, expected))


class UploadReader(ReadHandle):
    """A reader of an upload: each read first waits for the writes its writer was answered
    (appends return before they are written): once write(2) returned, a read through any
    descriptor returns those bytes, as on a local filesystem."""

    def __init__(self, reader: BlobReader, writer: Callable[[], Handle | None]) -> None:
        super().__init__(reader)
        self._writer = writer

    async def read(self, offset: int, size: int) -> Buffer:
        writer = self._writer()
        if isinstance(writer, UploadHandle):
            await writer.upload.settle()
        return await self.reader.read_at(offset, size)


class ManifestWriter(Handle):
    """A manifest being written: held in memory (4 MiB at most), checked and stored on flush.

    A refused manifest fails close() with EINVAL and the log says where it was going and
    why: a shell's `echo "$M" > tags/x` ignores close(2)'s error, so the log is all it leaves.
    A tag opened with O_TRUNC or created (`emptied`) ends at its last close even with
    nothing written, and an empty manifest is refused: an old tag stays, a new one is not
    made, and close() says so (`touch` or `cp /dev/null` of a tag must not look stored). A
    close that cannot be told the last leaves that to the release (only logged then), so a
    shell redirect's first close, with nothing written yet, refuses nothing.
    """

    def __init__(
        self, tree: Tree, node: TagNode | ManifestNode, initial: bytes = b"", emptied: bool = False
    ) -> None:
        self.tree = tree
        self.node = node
        self.data = bytearray(initial)
        self.opened = time.time_ns()
        self._written = False  # since the last end
        self._emptied = emptied  # truncated by open(2) or created, not ended since
        self._too_big = False  # a write was refused: what got in is not what was written

    def pending_attr(self) -> Attr | None:
        return Attr(False, len(self.data), self.opened)

    async def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    async def write(self, offset: int, data: bytes) -> int:
        if offset > len(self.data):
            raise InvalidOffset(f"write at {offset} past the end ({len(self.data)})")
        if offset + len(data) > MAX_MANIFEST_SIZE:
            log.info("write: %s: a manifest is limited to 4 MiB (EFBIG)", self.where())
            self._too_big = self._written = True
            raise FUSEError(errno.EFBIG)
        self.data[offset : offset + len(data)] = data
        self._written = True
        return len(data)

    async def truncate(self, size: int) -> None:
        del self.data[size:]
        self._written = True

    def where(self) -> str:
        """The destination as the log names it: repository and tag, or repository and digest."""
        raise NotImplementedError

    async def store(self, data: bytes) -> Digest:
        """Check and store; InvalidManifest or DigestMismatch when refused (nothing stored)."""
        raise NotImplementedError

    def ends_on_close(self) -> bool:
        return self._written or self._emptied

    async def flush(self, close: Close) -> None:
        # A close not told apart ends only what was written: a shell redirect's first.
        last = self.ends_on_close() if close is Close.LAST else self._written
        if close is not Close.NOT_LAST and last:
            await self._end("flush")

    async def release(self) -> None:
        """Store what no flush stored (the last close was another process's)."""
        if self.ends_on_close():
            with contextlib.suppress(FUSEError):  # logged
                await self._end("release")

    async def _end(self, operation: str) -> None:
        self._written = self._emptied = False
        try:
            if self._too_big:
                raise InvalidManifest("a write past 4 MiB was refused")
            digest = await self.store(bytes(self.data))
        except (InvalidManifest, DigestMismatch) as exc:
            hint = ORDER_HINTS[exc.child] if isinstance(exc, MissingReference) else ""
            log.warning("%s: %s not stored: %s (EINVAL)%s", operation, self.where(), exc, hint)
            await self.refused()
            raise FUSEError(errno.EINVAL) from None
        log.info("%s: stored %s (%s)", operation, self.where(), digest)

    async def refused(self) -> None:
        """What a refused manifest leaves: nothing stored, nothing else to undo."""


class TagHandle(ManifestWriter):
    """tags/<tag>: the manifest is stored, then the tag points at it."""

    node: TagNode

    def where(self) -> str:
        return f"tag {self.node.repo}:{self.node.tag}"

    async def store(self, data: bytes) -> Digest:
        return await self.tree.put_tag(self.node, data)

    async def refused(self) -> None:
        """The tag as it was: put back if a tool's unlink deleted it before this create."""
        await self.tree.tag_refused(self.node, self.process)


class ManifestHandle(ManifestWriter):
    """manifests/<digest>: stored by digest without a tag (an index's children go first),
    only if the bytes hash to the name."""

    node: ManifestNode

    def where(self) -> str:
        return f"manifest {self.node.repo}@{self.node.digest}"

    async def store(self, data: bytes) -> Digest:
        actual = digest_bytes(data)
        if actual != self.node.digest:
            raise DigestMismatch(self.node.digest, actual)
        return await self.tree.put_manifest(self.node, data, self.process)
