"""The upload protocol: start, resume, write, finish, cancel a resumable layer upload whose
whole state lives in the driver, in the registry's format.

The running sha256 follows the writes. Its state is saved under `hashstates/sha256/<offset>`
(storage/hashstates.py) when the upload starts, every CHECKPOINT bytes and on close, always
after the data it covers is synced, so neither regfs after a restart nor the registry
re-reads the data to finish.

Appends go through the append pipeline (storage/appends.py): written and hashed on worker
threads while the caller's next write arrives, with checkpoints beside them. Anything other
than an append waits for the pipeline first (_settle). A failed append fails a later call,
and the data is cut back to where it began and the hash rewound there, so what is stored
is always what was hashed.

A write below the hashed end rewinds the hash to the nearest saved state at or below it (later
states are deleted first: the registry would trust one whose offset matches the data's size)
and re-hashes forward from there (storage/hashing.py). The writer is asked first whether it
can write there (S3 appends only): a refused write or truncate changes nothing.

A saved state is never taken on faith when a digest does not match: the registry 2.8, when
a PATCH lands where it has no state, saves a state of the new bytes alone under their count,
which looks valid, and a state can be damaged. So when a digest built on a saved state
does not match, the data is hashed again from zero before the mismatch is believed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Awaitable
from datetime import UTC, datetime

import trio

from .api import BlobInfo
from .appends import AppendFailed, AppendPipeline
from .blobs import BlobStore, LinkedBlobs
from .digests import EMPTY_DIGEST, Digest, Sha256State
from .drivers import FileWriter, PathNotFound, StorageDriver
from .errors import CorruptEntry, DigestMismatch, InvalidOffset, UnknownUpload
from .hashing import hash_range
from .hashstates import HashStates
from .paths import (
    BlobData,
    RepositoryDir,
    UploadData,
    UploadDir,
    UploadLabel,
    UploadsDir,
    UploadStartedAt,
    path_for,
)

log = logging.getLogger(__name__)

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CHECKPOINT = 64 << 20
INLINE_HASH_LIMIT = 1 << 20  # appends up to this are pipelined; a larger write (never from
# FUSE, whose writes are 1 MiB at most) is written and hashed before it returns


def format_started_at(when: datetime) -> bytes:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode("ascii")


def parse_started_at(path: str, raw: bytes) -> datetime:
    try:
        when = datetime.fromisoformat(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(path, f"startedat is not an RFC 3339 time: {raw[:40]!r}") from exc
    if when.tzinfo is None:
        raise CorruptEntry(path, "startedat has no time zone")
    return when


async def read_started_at(driver: StorageDriver, name: str, uuid: str) -> datetime:
    """The upload's start time; UnknownUpload without one (the registry does not know it)."""
    path = path_for(UploadStartedAt(name, uuid))
    try:
        raw = await driver.get_content(path)
    except PathNotFound:
        raise UnknownUpload(f"unknown upload {uuid} in {name}") from None
    return parse_started_at(path, raw)


class LayerUpload:
    """One upload. Not safe for two writers; the lock only orders one writer's own calls."""

    def __init__(
        self,
        driver: StorageDriver,
        blobs: BlobStore,
        layers: LinkedBlobs,
        name: str,
        uuid: str,
        started_at: datetime,
        writer: FileWriter,
        hashed: Sha256State,
    ) -> None:
        self.driver = driver
        self.name = name
        self.uuid = uuid
        self.started_at = started_at
        self._blobs = blobs
        self._layers = layers
        self._writer: FileWriter | None = writer
        self._hash = hashed
        self._base = hashed.size  # the saved state the hash chain started from (0: none)
        self._states = HashStates(driver, name, uuid, saved_at=hashed.size)
        self._pipeline = AppendPipeline(self._states)
        self._position = writer.size
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<LayerUpload {self.name} {self.uuid} size={self.size}>"

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        driver: StorageDriver,
        blobs: BlobStore,
        layers: LinkedBlobs,
        name: str,
        uuid: str,
        label: str | None = None,
    ) -> LayerUpload:
        started_at = datetime.now(UTC).replace(microsecond=0)
        await driver.put_content(
            path_for(UploadStartedAt(name, uuid)), format_started_at(started_at)
        )
        try:
            if label is not None:  # right after startedat: a crash rarely loses the name
                await driver.put_content(path_for(UploadLabel(name, uuid)), label.encode())
            writer = await driver.writer(path_for(UploadData(name, uuid)))
        except Exception:
            # A failed start leaves no upload (an S3 refusing CreateMultipartUpload would
            # leave startedat, listed as an upload of 0 bytes the user never made).
            await _undo_start(driver.delete(path_for(UploadDir(name, uuid))), name, uuid)
            raise
        upload = cls(driver, blobs, layers, name, uuid, started_at, writer, Sha256State())
        try:
            await upload._save_state()
        except Exception:
            await _undo_start(upload.cancel(), name, uuid)
            raise
        return upload

    @classmethod
    async def resume(
        cls, driver: StorageDriver, blobs: BlobStore, layers: LinkedBlobs, name: str, uuid: str
    ) -> LayerUpload:
        if UUID_RE.fullmatch(uuid) is None:
            raise UnknownUpload(f"unknown upload {uuid!r} in {name}: not an upload id")
        started_at = await read_started_at(driver, name, uuid)
        writer = await driver.writer(path_for(UploadData(name, uuid)))
        hashed = await HashStates(driver, name, uuid).nearest(writer.size)
        return cls(driver, blobs, layers, name, uuid, started_at, writer, hashed)

    # -- writing -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The data's size, counting appends the disk worker has not written yet."""
        size = self._open_writer().size
        end = self._pipeline.end
        return size if end is None else max(size, end)

    @property
    def hashed_size(self) -> int:
        """How far the running hash has got (it catches up with `size` before finishing)."""
        return self._hashed_end()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise InvalidOffset(f"seek to negative offset {base + offset}")
        self._position = base + offset
        return self._position

    async def write(self, data: bytes) -> int:
        await self.write_at(self._position, data)
        self._position += len(data)
        return len(data)

    async def write_at(self, offset: int, data: bytes) -> None:
        """Write at offset ≤ size: at the end it appends, below it overwrites."""
        async with self._lock:
            writer = self._open_writer()
            if offset > self.size or offset < 0:
                raise InvalidOffset(
                    f"upload {self.uuid}: write at {offset} would leave a gap after {self.size}"
                )
            if offset == self._hashed_end() == self.size and len(data) <= INLINE_HASH_LIMIT:
                # The common case, an append: hand it to the workers, return without waiting.
                await self._cut_back_on_failure(
                    self._pipeline.append(writer, offset, data, self._hash)
                )
                await self._pipeline.advance_checkpoint(writer, self._hash, CHECKPOINT)
                return
            await self._settle()
            writer.check_write(offset)  # before the rewind: a refusal changes nothing
            if offset < self._hash.size:
                await self._rewind(offset)
            await self._hash_to(offset)
            await writer.write_at(offset, data)
            if len(data) > INLINE_HASH_LIMIT:
                await trio.to_thread.run_sync(self._hash.update, data)
            else:
                self._hash.update(data)
            if self._hash.size - self._states.saved_at >= CHECKPOINT:
                await self._save_state()

    async def settle(self) -> None:
        """Wait until every write so far is in the data file (not synced): a read of it
        through any descriptor then finds what write(2) said was written, as POSIX has it.
        Raises a failed write's error."""
        async with self._lock:
            await self._settle()

    async def flush(self) -> None:
        """Wait until every write so far is in the data file, so that whoever opens it after
        close(2) reads what was written (close-to-open, as NFS); raises a failed write's
        error. The data is synced too: a driver may hold the last bytes back until then (S3
        sends its tail as a part), and a local file's sync is the one close would make."""
        async with self._lock:
            await self._settle()
            if self._writer is not None:
                await self._writer.sync()

    async def truncate(self, size: int = 0) -> None:
        """Cut the data to size (0 restarts the upload); only shrinking is allowed."""
        async with self._lock:
            await self._settle()
            writer = self._open_writer()
            if not 0 <= size <= writer.size:
                raise InvalidOffset(f"upload {self.uuid}: cannot truncate to {size}")
            writer.check_truncate(size)  # before the rewind: a refusal changes nothing
            if size < self._hash.size:
                await self._rewind(size)
            await writer.truncate(size)
            self._position = min(self._position, size)

    async def digest(self, expected: Digest | None = None) -> Digest:
        """The digest of the data so far (hashing whatever is not hashed yet).

        With `expected`, a mismatch on a chain that began at a saved state is checked by
        hashing the data again from zero.
        """
        async with self._lock:
            await self._settle()
            return await self._digest(expected)

    # -- ending --------------------------------------------------------------------------

    async def close(self) -> None:
        """Save the hash state at the end of the data, so a resume need not re-read it."""
        async with self._lock:
            try:
                await self._settle()
            except Exception as exc:  # a failed append, cut back and logged: close the rest
                log.warning("close: upload %s: closing after a failed write (%s)", self.uuid, exc)
            self._pipeline.stop()
            if self._writer is None:
                return
            try:
                await self._hash_to(self._writer.size)
                if self._states.saved_at != self._hash.size:
                    await self._save_state()
            finally:
                writer, self._writer = self._writer, None
                await writer.aclose()

    async def finish(self, expected: Digest, size: int | None = None) -> BlobInfo:
        """Verify, move the data into the blob store, link it, then remove the upload.

        The order is the registry's: a crash at any step leaves either the upload or the
        linked blob, never a blob under a wrong digest.
        """
        async with self._lock:
            await self._settle()
            self._pipeline.stop()
            writer = self._open_writer()
            if await self._finished_before(expected):
                log.warning(
                    "finish: upload %s was interrupted after its data became blob %s; "
                    "completing it",
                    self.uuid,
                    expected,
                )
                self._writer = None
                await writer.aclose()
                await self._layers.link(expected)
                await self._delete()
                return await self._blobs.stat(expected)
            if size is not None and size != writer.size:
                raise DigestMismatch(expected, f"<{writer.size} bytes, expected {size}>")
            actual = await self._digest(expected)
            if actual != expected:
                raise DigestMismatch(expected, actual)
            present = await self._blobs.exists(expected)
            if not present:
                await writer.sync()  # durable before a link can vouch for it
            self._writer = None
            await writer.aclose()
            if not present:
                if writer.size == 0 and expected == EMPTY_DIGEST:
                    await self.driver.put_content(path_for(BlobData(expected)), b"")
                else:
                    await self.driver.move(
                        path_for(UploadData(self.name, self.uuid)), path_for(BlobData(expected))
                    )
            await self._layers.link(expected)
            await self._delete()
            log.info("finish: upload %s in %s is now layer %s", self.uuid, self.name, expected)
            return await self._blobs.stat(expected)

    async def cancel(self) -> None:
        async with self._lock:
            with contextlib.suppress(Exception):  # a failed append: its data goes anyway
                await self._settle()
            self._pipeline.stop()
            if self._writer is not None:
                writer, self._writer = self._writer, None
                await writer.aclose()
            await self._delete()
            try:
                await self._remove_emptied_repository()
            except Exception as exc:  # the upload is gone: tidying after it is best effort
                log.warning(
                    "cancel: upload %s in %s deleted; its emptied repository stays (%s: %s)",
                    self.uuid,
                    self.name,
                    type(exc).__name__,
                    exc,
                )

    # -- internals -----------------------------------------------------------------------

    def _open_writer(self) -> FileWriter:
        if self._writer is None:
            raise UnknownUpload(f"upload {self.uuid} in {self.name} is closed")
        return self._writer

    async def _delete(self) -> None:
        try:
            await self.driver.delete(path_for(UploadDir(self.name, self.uuid)))
        except PathNotFound:
            raise UnknownUpload(f"unknown upload {self.uuid} in {self.name}") from None

    async def _remove_emptied_repository(self) -> None:
        """A repository that held nothing but this upload (a first push, cancelled) goes with
        it, as on S3, where its last key did and as the registry's catalog (which counts
        `_layers` only) never listed it: its emptied `_uploads/` and its own directory are
        removed, each only if empty (rmdir), so an upload started there meanwhile keeps
        them. A namespace above it stays, as after `rm -r` of a repository."""
        repository, uploads = path_for(RepositoryDir(self.name)), path_for(UploadsDir(self.name))
        with contextlib.suppress(PathNotFound):
            only_uploads = await self.driver.list(repository) == [uploads.rpartition("/")[2]]
            if only_uploads and await self.driver.remove_empty(uploads):
                await self.driver.remove_empty(repository)

    def _hashed_end(self) -> int:
        end = self._pipeline.end
        return self._hash.size if end is None else end

    async def _settle(self) -> None:
        """Wait until the pipeline has written and hashed every append, and saved the
        checkpoint in progress; raises a failed append's error (after the cut)."""
        await self._cut_back_on_failure(self._pipeline.settle())

    async def _cut_back_on_failure(self, step: Awaitable[None]) -> None:
        """Await a step of the pipeline. Should an append have failed, the data past where
        it began and the hash past it are not what was written: cut the data there, rewind
        the hash there, and raise the append's error."""
        try:
            await step
        except AppendFailed as failed:
            offset, exc = failed.offset, failed.error
        else:
            return
        # Trust no running hash until the cut is done: should it fail, a later step hashes
        # the data from zero, so no state can vouch for bytes that were never written.
        self._hash, self._base = Sha256State(), 0
        log.error(
            "write: upload %s in %s: a write at %d failed (%s); the data is cut back to there",
            self.uuid,
            self.name,
            offset,
            exc,
        )
        await self._open_writer().truncate(offset)
        await self._rewind(offset)
        raise exc

    async def _digest(self, expected: Digest | None) -> Digest:
        await self._hash_to(self.size)
        actual = self._hash.digest()
        if actual != expected and expected is not None and self._base:
            log.warning(
                "digest: upload %s: %s, built on the saved state at %d, does not match %s; "
                "hashing the data again",
                self.uuid,
                actual,
                self._base,
                expected,
            )
            self._hash, self._base = Sha256State(), 0
            await self._hash_to(self.size)
            actual = self._hash.digest()
        return actual

    async def _finished_before(self, expected: Digest) -> bool:
        """Whether an interrupted finish already moved this upload's data to blob `expected`:
        no data, the blob is there, and a saved hash state of some bytes proves the digest.
        Data cut to nothing keeps no state above 0 (`_rewind`), so only a move leaves one;
        no stat of the data before the writer made it, which on S3 is a multipart lookup
        more in every finish."""
        if self.size or not await self._blobs.exists(expected):
            return False
        return await self._states.prove(expected)

    async def _save_state(self) -> None:
        """Save the running hash. The data it covers is synced first: a state at the data's
        size is trusted without reading the data, so it must never outlive that data."""
        if self._writer is not None:
            await self._writer.sync()
        await self._states.save(self._hash.size, self._hash.marshal())

    async def _rewind(self, offset: int) -> None:
        """Forget hash states above offset and restart the hash from the best one below."""
        self._hash = await self._states.rewind(offset)
        self._base = self._hash.size
        log.debug(
            "rewind: upload %s hash restarts at %d for a write at %d",
            self.uuid,
            self._hash.size,
            offset,
        )

    async def _hash_to(self, offset: int) -> None:
        """Hash the stored data from where the hash is up to offset (reads back, in a thread)."""
        if self._hash.size >= offset:
            return
        path = path_for(UploadData(self.name, self.uuid))
        reader = await self.driver.reader(path)
        try:
            await hash_range(reader, self._hash, offset)
        finally:
            await reader.aclose()
        if self._hash.size < offset:
            raise CorruptEntry(path, "upload data shorter than its size")


async def _undo_start(undo: Awaitable[None], name: str, uuid: str) -> None:
    """Remove what a failed start wrote; the start's own error is what the caller raises,
    so a failure here is only logged: what it left shows in uploads/ (0 bytes), for an
    `rm` or `purge-uploads`."""
    try:
        await undo
    except Exception as exc:
        log.warning(
            "start: upload %s in %s failed, and removing what it wrote failed too "
            "(left for rm or purge-uploads): %s: %s",
            uuid,
            name,
            type(exc).__name__,
            exc,
        )
