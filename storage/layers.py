"""A repository's layers: exists, fetch (a seekable reader), upload and resume."""

from __future__ import annotations

import builtins
import os
import uuid as uuidlib
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime

from .api import BlobInfo, BlobReader, EmptyReader, UploadInfo
from .blobs import BlobStore, LinkedBlobs
from .digests import Digest
from .drivers import FileReader, PathNotFound, StorageDriver
from .errors import CorruptEntry, InvalidOffset, UnknownLayer, UnknownUpload
from .paths import (
    LayerLink,
    LayersDir,
    UploadData,
    UploadLabel,
    UploadsDir,
    UploadStartedAt,
    path_for,
)
from .uploads import UUID_RE, LayerUpload, read_started_at


class LayerReader:
    """A seekable reader of one blob; every read is one positioned read of the driver."""

    def __init__(self, info: BlobInfo, file: FileReader) -> None:
        self.digest = info.digest
        self.length = info.size
        self.created_ns = info.mtime_ns
        self._file = file
        self._position = 0

    async def __aenter__(self) -> LayerReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.length}[whence]
        if base + offset < 0:
            raise InvalidOffset(f"seek to negative offset {base + offset}")
        self._position = base + offset
        return self._position

    async def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = max(0, self.length - self._position)
        data = await self.read_at(self._position, size)
        self._position += len(data)
        return data

    async def read_at(self, offset: int, size: int) -> bytes:
        return await self._file.read_at(offset, size)

    def fileno(self) -> int | None:
        """The blob's descriptor on a local root (filesystem driver); None on S3 or memory."""
        return self._file.fileno()

    async def aclose(self) -> None:
        await self._file.aclose()


class LayerService:
    def __init__(self, driver: StorageDriver, blobs: BlobStore, name: str) -> None:
        self.driver = driver
        self.name = name
        self._blobs = blobs
        self.linked = LinkedBlobs(
            blobs, lambda d: LayerLink(name, d), LayersDir(name), UnknownLayer
        )

    async def exists(self, digest: Digest) -> bool:
        return await self.linked.exists(digest)

    async def stat(self, digest: Digest) -> BlobInfo:
        return await self.linked.stat(digest)

    async def stats(self, digests: Sequence[Digest]) -> builtins.list[BlobInfo | None]:
        return await self.linked.stats(digests)

    async def list(self) -> list[Digest]:
        return await self.linked.list()

    async def fetch(self, digest: Digest, size: int | None = None) -> LayerReader:
        """UnknownLayer when the blob is gone, also between stat and open (garbage collection
        running beside us): what the registry answers 404 for is absent, not damage. Data that
        was there at the stat but cannot be opened (not a regular file) is CorruptEntry."""
        info = await self.linked.stat(digest)
        try:
            file = await self._blobs.open(info.digest)
        except UnknownLayer:
            if await self._blobs.collected(info.digest):
                raise
            link = path_for(LayerLink(self.name, digest))
            raise CorruptEntry(link, "its blob data cannot be opened") from None
        return LayerReader(info, file)

    async def link(self, digest: Digest) -> None:
        """Link a blob that is already in the store (a cross-repository mount)."""
        await self._blobs.stat(digest)
        await self.linked.link(digest)

    async def unlink(self, digest: Digest) -> None:
        await self.linked.unlink(digest)

    async def relink(self, digest: Digest) -> bool:
        """The blob stays in the store after an unlink until a garbage collection."""
        try:
            await self.link(digest)
        except UnknownLayer:
            return False
        return True

    async def upload(self, label: str | None = None) -> LayerUpload:
        """Start an upload; `label` is a client's name for it, kept beside it (see paths)."""
        uuid = str(uuidlib.uuid4())
        return await LayerUpload.start(
            self.driver, self._blobs, self.linked, self.name, uuid, label
        )

    async def label(self, uuid: str) -> str | None:
        try:
            raw = await self.driver.get_content(path_for(UploadLabel(self.name, uuid)))
        except PathNotFound:
            return None
        return raw.decode("utf-8", "replace")

    async def set_label(self, uuid: str, label: str) -> None:
        """UnknownUpload, nothing written, for an upload that is gone (finished or cancelled
        by another mount): a label alone makes a directory uploads/ hides and rmdir counts."""
        await self._started_at(uuid)
        await self.driver.put_content(path_for(UploadLabel(self.name, uuid)), label.encode())

    async def resume(self, uuid: str) -> LayerUpload:
        return await LayerUpload.resume(self.driver, self._blobs, self.linked, self.name, uuid)

    async def upload_info(self, uuid: str) -> UploadInfo:
        started_at = await self._started_at(uuid)
        try:
            data = await self.driver.stat(path_for(UploadData(self.name, uuid)))
        except PathNotFound:  # the registry treats a missing data file as an empty upload
            return UploadInfo(uuid, started_at, 0)
        return UploadInfo(uuid, started_at, data.size, data.mtime_ns)

    async def read_upload(self, uuid: str) -> BlobReader:
        """The bytes received so far (none when the data file is missing, as the registry
        reads it; a finish cut after moving the data into blobs/ leaves such an upload)."""
        await self._started_at(uuid)  # UnknownUpload without; the data's size is the reader's
        try:
            return await self.driver.reader(path_for(UploadData(self.name, uuid)))
        except PathNotFound:
            return EmptyReader()

    async def _started_at(self, uuid: str) -> datetime:
        if UUID_RE.fullmatch(uuid) is None:
            raise UnknownUpload(f"unknown upload {uuid!r} in {self.name}: not an upload id")
        return await read_started_at(self.driver, self.name, uuid)

    async def uploads(self) -> builtins.list[str]:
        """Uuids of the uploads in progress (`started_uploads`)."""
        return [uuid async for uuid in started_uploads(self.driver, self.name)]


async def started_uploads(driver: StorageDriver, name: str) -> AsyncGenerator[str]:
    """The uuids of name's uploads in progress as the registry knows them: directories of
    `_uploads/` named by a uuid that hold `startedat` (registry 2.8's DELETE of an upload
    leaves its `hashstates/sha256/0` behind, its purge an empty `_uploads/`). One rule for
    uploads/ and for whether a directory of uploads alone is a repository (the catalog)."""
    try:
        names = await driver.list(path_for(UploadsDir(name)))
    except PathNotFound:
        return
    for uuid in names:
        if UUID_RE.fullmatch(uuid) is None:
            continue
        try:
            await driver.stat(path_for(UploadStartedAt(name, uuid)))
        except PathNotFound:
            continue
        yield uuid
