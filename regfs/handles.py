"""Open files: one class per kind, each with read, write, flush and release.

Errors meant for close() (a digest mismatch, a refused manifest) can only reach the user from
flush: release comes after close() has returned. So whatever finishes on close happens in
flush. A flush with no write since the previous flush does nothing: shells dup a redirected
descriptor and close the original before anything is written.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

from pyfuse3 import FUSEError

from storage.api import BlobReader, Buffer, Upload, UploadInfo
from storage.digests import Digest, digest_bytes
from storage.errors import DigestMismatch, InvalidManifest, InvalidOffset, UnknownUpload
from storage.manifest_format import MAX_MANIFEST_SIZE

from .nodes import Attr, ManifestNode, TagNode, UploadNode, digest_name
from .tree import Tree

log = logging.getLogger(__name__)


class Handle:
    """An open file; the base refuses what a handle of its kind cannot do."""

    async def read(self, offset: int, size: int) -> Buffer:
        raise FUSEError(errno.EBADF)

    async def write(self, offset: int, data: bytes) -> int:
        raise FUSEError(errno.EBADF)

    async def truncate(self, size: int) -> None:
        raise FUSEError(errno.EPERM)

    async def flush(self) -> None:
        pass

    async def release(self) -> None:
        pass

    def pending_attr(self) -> Attr | None:
        """Attributes of content that is not in storage yet (a tag being written)."""
        return None


class ReadHandle(Handle):
    def __init__(self, reader: BlobReader) -> None:
        self.reader = reader

    async def read(self, offset: int, size: int) -> Buffer:
        return await self.reader.read_at(offset, size)

    async def release(self) -> None:
        await self.reader.aclose()


class UploadHandle(Handle):
    """The one writer of an upload. Data goes through the driver as it comes, never spooled.

    An upload named by its digest finishes in the flush that follows its last write.
    """

    def __init__(self, tree: Tree, node: UploadNode, upload: Upload, name: str) -> None:
        self.tree = tree
        self.node = node
        self.upload = upload
        self.name = name
        self.finished = False
        self._written = False
        self._written_ns: int | None = None  # the last write's time: what stat shows

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
        each). None once it is finished or being finished: then storage says."""
        if self.finished:
            return None
        try:
            size = self.upload.size
        except UnknownUpload:  # its writer closed by a finish under way
            return None
        written = UploadInfo(self.node.uuid, self.upload.started_at, size, self._written_ns)
        return Attr(False, size, written.mtime_ns)

    async def flush(self) -> None:
        if self.finished or not self._written:
            return
        self._written = False
        expected = digest_name(self.name)
        if expected is None:
            await self.upload.flush()  # what close(2) returns after is in storage
            return
        try:
            await self.tree.finish_upload(self.node, self.upload, expected)
        except DigestMismatch as exc:
            log.error(
                "flush: upload %s (%s) not finished: %s; it stays for a resume or rm",
                self.name,
                self.node.uuid,
                exc,
            )
            raise FUSEError(errno.EIO) from None
        self.finished = True

    async def release(self) -> None:
        if not self.finished:
            await self.upload.close()


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
    """

    def __init__(self, tree: Tree, node: TagNode | ManifestNode, initial: bytes = b"") -> None:
        self.tree = tree
        self.node = node
        self.data = bytearray(initial)
        self.opened = time.time_ns()
        self._written = False
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

    async def flush(self) -> None:
        if not self._written:
            return
        self._written = False
        try:
            if self._too_big:
                raise InvalidManifest("a write past 4 MiB was refused")
            digest = await self.store(bytes(self.data))
        except (InvalidManifest, DigestMismatch) as exc:
            log.warning("flush: %s not stored: %s (EINVAL)", self.where(), exc)
            raise FUSEError(errno.EINVAL) from None
        log.info("flush: stored %s (%s)", self.where(), digest)


class TagHandle(ManifestWriter):
    """tags/<tag>: the manifest is stored, then the tag points at it."""

    node: TagNode

    def where(self) -> str:
        return f"tag {self.node.repo}:{self.node.tag}"

    async def store(self, data: bytes) -> Digest:
        return await self.tree.put_tag(self.node, data)


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
        return await self.tree.put_manifest(self.node, data)
