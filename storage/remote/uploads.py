"""Uploads to a remote registry: sequential PATCHes as data streams, PUT ?digest= to finish.

The protocol cannot list or read back uploads, so what a resume needs (the upload's
location, how far it got, the running sha256 state, the name it was given) is kept in a
small JSON record per upload under the user's state directory, written atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid as uuids
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import trio

from .. import jsontext
from ..api import BlobInfo
from ..digests import Digest, Sha256State
from ..drivers.filesystem import flock_polled
from ..errors import (
    DigestMismatch,
    InvalidOffset,
    RemoteError,
    RemoteUnavailable,
    UnknownUpload,
)
from ..names import NAME_RE
from ..privatedir import open_private
from .client import RemoteClient, RemoteNotFound, TLSError
from .retry import backoff
from .untrusted import shown

log = logging.getLogger(__name__)

CHUNK = 8 << 20  # bytes gathered in memory before they go out as one PATCH

UPLOAD_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
"""The upload ids a record file may be named by: distribution's are UUIDs, other registries
use similar tokens. No `/`, no leading `.`: a registry's id never leads out of the directory."""


RECORD_MAX = 64 << 10  # a record is a few hundred bytes: a bigger file is no record of ours
LOCK_SUFFIX = ".lock"  # beside `<uuid>.json`: its writer's lock (UploadRecords.lock)
MADE = "made-by-mkdir"  # beside the records: the repositories mkdir made, a JSON list
MADE_MAX = 4 << 20


class UnsafeUploadId(RemoteError):
    """A registry named an upload with an id that cannot name a local record file."""


def check_upload_id(upload_id: str) -> str:
    """`upload_id` if a record file may be named by it; UnsafeUploadId (logged) otherwise.

    The id comes from the registry (`Docker-Upload-UUID`): `../../etc/x` would otherwise
    write, and later delete, a file outside the records directory."""
    if UPLOAD_ID.fullmatch(upload_id):
        return upload_id
    log.error("upload: refusing the upload id %s: not a safe file name", shown(upload_id))
    raise UnsafeUploadId(
        f"upload id {shown(upload_id)} is not a safe file name (want a UUID-like token)",
        status=202,
    )


@dataclass
class UploadRecord:
    repository: str
    uuid: str  # the registry's id at the start; kept when truncate(0) begins anew
    location: str  # of the registry's upload now (a restart's id is in it, not in uuid)
    started_at: str
    offset: int = 0
    label: str | None = None
    hash_state: str | None = None  # hex of the Go sha256 state at `offset`, when known


def _remove_stale_locks(directory: int) -> None:
    """Remove the lock files (`UploadRecords.lock`) no process holds an flock on: a writer
    killed (kill -9, a crash) left its own, and nothing else removes one whose record is
    gone (killed between the lock and the record's save, or its delete and the unlock).
    Taken as a writer takes it, then unlinked while held, as `unlock` does: a writer that
    opened the file meanwhile finds it gone and locks a new one; a file whose name is
    another's by then is not ours to remove (only a holder unlinks a lock file)."""
    removed = 0
    for name in os.listdir(directory):
        if not name.endswith(LOCK_SUFFIX) or not UPLOAD_ID.fullmatch(name[: -len(LOCK_SUFFIX)]):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
        except OSError:
            continue  # gone meanwhile (its holder's unlock), or no file of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live writer's
            held, now = os.fstat(fd), os.stat(name, dir_fd=directory, follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(name, dir_fd=directory)
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("records: removed %d lock files no writer held (left by a killed one)", removed)


class UploadRecords:
    """The local records of one registry's uploads, one JSON file each, in a directory only
    this user can write, reached without a planted link (storage/privatedir.py): the records
    hold signed upload locations and hash states. `base` is the user's directory it lies in
    ($XDG_STATE_HOME; by default the directory's parent); every part below it is checked."""

    def __init__(self, directory: Path, base: Path | None = None) -> None:
        self.directory = directory
        self._base = directory.parent if base is None else base
        self._parts = directory.relative_to(self._base).parts
        self._fd: int | None = None
        # `repositories`, `made`, and the directory's (mtime, inode) they were read at: the
        # catalog asks at every lookup, and a listing and a JSON load per record is not free.
        self._repositories: frozenset[str] = frozenset()
        self._made: frozenset[str] = frozenset()
        self._read_at: tuple[int, int] | None = None

    def _dir(self) -> int:
        return self._opened()[0]

    def _opened(self) -> tuple[int, os.stat_result]:
        """The directory's descriptor and its stat, opened (and made) at first use, kept
        until `close`; opened again if the directory was removed meanwhile (records
        written into it would be lost with it)."""
        if self._fd is not None:
            st = os.fstat(self._fd)
            if st.st_nlink:
                return self._fd, st
            self.close()
        self._fd = open_private(self._base, self._parts)
        _remove_stale_locks(self._fd)
        return self._fd, os.fstat(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _name(self, uuid: str, suffix: str = ".json") -> str:
        if not UPLOAD_ID.fullmatch(uuid):
            raise UnknownUpload(f"no upload record can be named {shown(uuid)}")
        return uuid + suffix

    async def lock(self, uuid: str) -> int:
        """The exclusive flock of `<uuid>.lock` beside the upload's record, for its one
        writer: two mounts of one registry by one user share these records, and two writers
        of one upload would send clashing PATCHes. Busy after the filesystem driver's wait,
        as a local upload's second writer. The record itself cannot carry the lock (`save`
        replaces its file). The lock file lives while it is held (`unlock` removes it), so
        a lock taken on a file removed meanwhile is no lock: taken again on the new one."""
        name, directory = self._name(uuid, LOCK_SUFFIX), self._dir()
        while True:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o600,
                dir_fd=directory,
            )
            try:
                await flock_polled(fd, f"upload {uuid}")
                held = os.fstat(fd)
                with contextlib.suppress(FileNotFoundError):
                    now = os.stat(name, dir_fd=directory, follow_symlinks=False)
                    if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                        return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def unlock(self, uuid: str, lock: int) -> None:
        """Let go of `lock` (from `lock`), removing its file first: a writer waiting on
        that file then finds it gone and locks a new one."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name(uuid, LOCK_SUFFIX), dir_fd=self._dir())
        finally:
            os.close(lock)

    def load(self, uuid: str) -> UploadRecord:
        name = self._name(uuid)
        try:
            return UploadRecord(**jsontext.loads(self._bounded(name, RECORD_MAX)))
        except FileNotFoundError:
            raise UnknownUpload(f"unknown upload {uuid}") from None
        except (OSError, ValueError, TypeError) as exc:
            raise UnknownUpload(
                f"upload record {self.directory / name} is unreadable: {exc}"
            ) from None

    def save(self, record: UploadRecord) -> None:
        self._write(self._name(record.uuid), asdict(record))

    def _write(self, name: str, value: object) -> None:
        """Replace file `name` with `value` as JSON, atomically (a temporary file renamed)."""
        fd = self._dir()
        temp = f".tmp-{uuids.uuid4().hex}"
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "w") as f:
                json.dump(value, f)
            os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=fd)
            raise
        self._read_at = None

    def delete(self, uuid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name(uuid), dir_fd=self._dir())
        self._read_at = None

    def all(self) -> list[UploadRecord]:
        records = []
        for name in sorted(os.listdir(self._dir())):
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                records.append(self.load(name[: -len(".json")]))
            except UnknownUpload as exc:
                log.warning("records: skipping %s", exc)
        return records

    def of(self, repository: str) -> list[UploadRecord]:
        return [record for record in self.all() if record.repository == repository]

    def repositories(self) -> frozenset[str]:
        """Where uploads were started: a repository that holds only uploads is in no
        catalog, yet its uploads must be reachable for a resume (after a remount too)."""
        return self._read()[0]

    def made(self) -> frozenset[str]:
        """The repositories mkdir made (`change_made`): the registry knows a repository only
        once something is pushed to it, and an empty one must last until rmdir, across
        remounts, as on a storage root."""
        return self._read()[1]

    async def change_made(self, add: str | None = None, drop: str | None = None) -> None:
        """Add a repository to `made`, or drop one: read afresh and written under an flock
        of the records' directory (polled, never blocking the loop), so two mounts' mkdir
        or rmdir at one moment each keep the other's (a read, then a write, lost one)."""
        fd = self._dir()
        await flock_polled(fd, f"{self.directory}/{MADE}")
        try:
            names = set(self._load_made()) - {drop} | ({add} if add is not None else set())
            self._write(MADE, sorted(names))
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _read(self) -> tuple[frozenset[str], frozenset[str]]:
        """`repositories` and `made`, read again only when the directory changed: a file
        written or deleted here, or by another mount of the registry (its mtime moves;
        Linux's multigrain timestamps tell apart two changes in one tick once the first
        was seen)."""
        _, st = self._opened()  # one fstat per catalog lookup, as the stat it replaced
        read_at = (st.st_mtime_ns, st.st_ino)
        if read_at != self._read_at:
            self._repositories = frozenset(record.repository for record in self.all())
            self._made = self._load_made()
            self._read_at = read_at
        return self._repositories, self._made

    def _bounded(self, name: str, limit: int) -> bytes:
        """A file of the records' directory, through no link and no FIFO's wait: ValueError
        past `limit` bytes (anyone who could write there could plant a huge one)."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self._dir())
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"over {limit} bytes")
        return data

    def _load_made(self) -> frozenset[str]:
        try:
            names = jsontext.loads(self._bounded(MADE, MADE_MAX))
            if not isinstance(names, list):
                raise ValueError("not a list")
            return frozenset(n for n in names if isinstance(n, str) and NAME_RE.fullmatch(n))
        except FileNotFoundError:
            return frozenset()
        except (OSError, ValueError) as exc:
            log.warning("records: %s is unreadable (%s): no repository made by mkdir", MADE, exc)
            return frozenset()


class RemoteUpload:
    """One upload, written in order only: the protocol appends and cannot overwrite. It
    holds its record's lock (`lock`, a descriptor) until closed, finished or cancelled."""

    def __init__(
        self,
        client: RemoteClient,
        records: UploadRecords,
        record: UploadRecord,
        hashed: Sha256State | None,
        lock: int,
    ) -> None:
        self.client = client
        self.records = records
        self.record = record
        self._lock: int | None = lock
        self.name = record.repository
        self.uuid = record.uuid
        self.started_at = datetime.fromisoformat(record.started_at)
        self._hash = hashed
        self._pending = bytearray()
        self._closed = False
        # Where a finished blob is recorded: the API lists only blobs that manifests name.
        self.finished: dict[Digest, BlobInfo] = {}

    @property
    def size(self) -> int:
        return self.record.offset + len(self._pending)

    @classmethod
    async def start(
        cls, client: RemoteClient, records: UploadRecords, name: str, label: str | None
    ) -> RemoteUpload:
        location, given = await _begin(client, name)
        try:
            # Without an id from the registry the record is named here.
            uuid = check_upload_id(given) if given is not None else str(uuids.uuid4())
        except UnsafeUploadId:
            await _abandon(client, location)
            raise
        started = datetime.now(UTC).replace(microsecond=0).isoformat()
        record = UploadRecord(name, uuid, location, started, label=label)
        try:
            lock = await records.lock(uuid)
            try:
                records.save(record)
            except BaseException:
                records.unlock(uuid, lock)
                raise
        except Exception:  # no record: nothing else could ever name it
            await _abandon(client, location)
            raise
        return cls(client, records, record, Sha256State(), lock)

    @classmethod
    async def resume(cls, client: RemoteClient, records: UploadRecords, uuid: str) -> RemoteUpload:
        lock = await records.lock(uuid)
        try:
            return await cls._resumed(client, records, uuid, lock)
        except BaseException:
            records.unlock(uuid, lock)
            raise

    @classmethod
    async def _resumed(
        cls, client: RemoteClient, records: UploadRecords, uuid: str, lock: int
    ) -> RemoteUpload:
        record = records.load(uuid)
        try:
            response = await client.request("GET", record.location, expect=(204,))
        except RemoteNotFound:
            records.delete(uuid)
            raise UnknownUpload(f"the registry no longer knows upload {uuid}") from None
        received = _range_end(response.headers.get("Range"), record.offset)
        hashed = None
        if record.hash_state and received == record.offset:
            hashed = Sha256State.unmarshal(bytes.fromhex(record.hash_state))
        elif received != record.offset:
            log.warning(
                "resume: upload %s: the registry has %d bytes, the record said %d",
                uuid,
                received,
                record.offset,
            )
        record.offset = received
        if "Location" in response.headers:
            record.location = response.headers["Location"]
        return cls(client, records, record, hashed, lock)

    def _save(self) -> None:
        """Save the record with the name the upload has now: a rename (`set_label`, by
        this mount or another) may have changed it since this writer loaded it."""
        with contextlib.suppress(UnknownUpload):
            self.record.label = self.records.load(self.uuid).label
        self.records.save(self.record)

    async def write_at(self, offset: int, data: bytes) -> None:
        if offset != self.size:
            raise InvalidOffset(
                f"upload {self.uuid}: a remote upload is written in order; a write at {offset} "
                f"is not at its end ({self.size})"
            )
        self._pending += data
        if self._hash is not None:
            self._hash.update(data)
        if len(self._pending) >= CHUNK:
            await self._send()

    async def truncate(self, size: int) -> None:
        """Only to 0 (the protocol cannot cut an upload): a new upload is begun at the
        registry under the same record, so the uuid, name, label and start time stay and
        whoever holds the uuid (the mount's node) still finds it. The old upload is
        cancelled once the new one is recorded: a failure before leaves it as it was."""
        if size == self.size:
            return
        if size != 0:
            raise InvalidOffset(f"upload {self.uuid}: a remote upload can only restart from 0")
        old = self.record.location
        self.record.location, _ = await _begin(self.client, self.name)
        self.record.offset, self.record.hash_state = 0, None
        self._pending, self._hash = bytearray(), Sha256State()
        self._save()
        await _abandon(self.client, old)
        log.info("truncate: upload %s in %s restarts from 0", self.uuid, self.name)

    async def digest(self, expected: Digest | None = None) -> Digest | None:
        return self._hash.digest() if self._hash is not None else None

    async def settle(self) -> None:
        """Nothing to wait for: the protocol cannot read an upload back (`read_upload`)."""

    async def flush(self) -> None:
        """Send what is pending, so close(2) reports a failed PATCH."""
        await self._send()

    async def close(self) -> None:
        if not self._closed:
            try:
                await self._send()
            finally:
                self._ended()

    def _ended(self) -> None:
        """Closed: the lock goes (the record stays, unless the caller deleted it)."""
        self._closed = True
        if self._lock is not None:
            self.records.unlock(self.uuid, self._lock)
            self._lock = None

    async def finish(self, expected: Digest, size: int | None = None) -> BlobInfo:
        if size is not None and size != self.size:
            # As the local source does: the registry would commit whatever it got.
            log.error(
                "finish: upload %s holds %d bytes, not %d: not committed, it stays",
                self.uuid,
                self.size,
                size,
            )
            raise DigestMismatch(expected, f"<{self.size} bytes, expected {size}>")
        if self._hash is not None and (actual := self._hash.digest()) != expected:
            # Checked here, not left to the registry: registry 2.8 keeps an upload whose
            # commit failed but with a stale `_state`, so after a refused PUT it could never
            # be resumed. Refused before sending, the upload stays for a resume or an rm.
            log.error(
                "finish: upload %s holds %s, not %s: not committed, it stays",
                self.uuid,
                actual,
                expected,
            )
            raise DigestMismatch(expected, actual)
        body, self._pending = bytes(self._pending), bytearray()
        url = self.record.location
        params = {"digest": str(expected)}
        total = self.record.offset + len(body)
        try:
            response = await self.client.request(
                "PUT",
                url,
                params=params,
                content=body,
                expect=(201, 400),
                headers={"Content-Type": "application/octet-stream"},
            )
        except RemoteNotFound:
            # A PUT is retried when its answer is lost; if the first one landed, the upload
            # became the blob and the retry finds no upload. The blob says which it was.
            if not await self._committed_as(expected, total):
                raise
            log.warning(
                "finish: the answer to upload %s's commit was lost; the registry has %s",
                self.uuid,
                expected,
            )
            return self._finished(expected, total)
        if response.status_code == 400:
            # Only when the content's hash is unknown here (see resume). Registry 2.8 means to
            # cancel the upload, but its cancel fails after a commit, so the upload survives;
            # it stays resumable only if this PUT appended nothing (the `_state` still fits).
            if body or not await self._still_there():
                self.records.delete(self.uuid)
                self._ended()
                log.error(
                    "finish: the registry refused upload %s as %s and it cannot be resumed",
                    self.uuid,
                    expected,
                )
            else:
                log.error(
                    "finish: the registry refused upload %s as %s; it stays", self.uuid, expected
                )
            raise DigestMismatch(expected, "<content not hashed here>")
        log.info("finish: upload %s in %s is now layer %s", self.uuid, self.name, expected)
        return self._finished(expected, total)

    def _finished(self, digest: Digest, size: int) -> BlobInfo:
        self.records.delete(self.uuid)
        self._ended()
        info = self.finished[digest] = BlobInfo(digest, size, time.time_ns())
        return info

    async def _committed_as(self, digest: Digest, size: int) -> bool:
        """Whether the repository holds blob `digest` of `size` bytes."""
        try:
            response = await self.client.request("HEAD", f"/v2/{self.name}/blobs/{digest}")
        except RemoteNotFound:
            return False
        length: str | None = response.headers.get("Content-Length")
        return length == str(size)

    async def cancel(self) -> None:
        try:
            await self.client.request("DELETE", self.record.location, expect=(204, 404))
        finally:
            self.records.delete(self.uuid)
            self._ended()

    async def _send(self) -> None:
        """PATCH what is pending, then record how far the upload got.

        A PATCH that failed (5xx, timeout, dropped connection) may have landed in full, in
        part or not at all, so it is never simply sent again: the registry is asked how far
        the upload got (GET on its location) and only the rest goes out, up to the client's
        `retries` times. On registry 2.8 that GET answers only while the `_state` still fits,
        i.e. when nothing landed; otherwise the upload cannot go on (RemoteUnavailable).
        """
        if not self._pending:
            return
        data, start = bytes(self._pending), self.record.offset
        done = 0  # bytes of `data` the registry holds
        failures = 0
        response: httpx.Response | None = None
        while done < len(data):
            try:
                response = await self._patch(data[done:], start + done)
                done = len(data)
            except RemoteUnavailable as exc:
                if isinstance(exc, TLSError) or failures >= self.client.retries:
                    raise
                failures += 1
                delay = backoff(failures)
                log.warning(
                    "upload %s: PATCH at %d failed (%s); asking how far it got in %.1f s",
                    self.uuid,
                    start + done,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                received = await self._received(start, exc)
                if not start <= received <= start + len(data):
                    raise RemoteError(
                        f"upload {self.uuid}: the registry has {received} bytes, "
                        f"expected {start} to {start + len(data)}",
                        status=204,
                    ) from exc
                done = received - start
                response = None
        self._pending = bytearray()
        self.record.offset = start + len(data)
        if response is not None:
            self.record.location = response.headers.get("Location", self.record.location)
        self.record.hash_state = self._hash.marshal().hex() if self._hash is not None else None
        self._save()

    async def _patch(self, data: bytes, start: int) -> httpx.Response:
        return await self.client.request(
            "PATCH",
            self.record.location,
            content=data,
            expect=(202,),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(data) - 1}",
            },
        )

    async def _status(self) -> httpx.Response:
        """GET on the upload's location (204, `Range`); its fresh `Location` is kept."""
        response = await self.client.request("GET", self.record.location, expect=(204,))
        self.record.location = response.headers.get("Location", self.record.location)
        return response

    async def _received(self, start: int, cause: Exception) -> int:
        """How many bytes the registry holds, after a PATCH from `start` failed."""
        try:
            response = await self._status()
        except RemoteNotFound as exc:
            raise RemoteUnavailable(
                f"upload {self.uuid}: a PATCH from {start} failed ({cause}) and the registry "
                f"no longer answers for the upload's state ({exc}): part of it may have "
                "landed; the upload cannot go on, start it again"
            ) from exc
        return _range_end(response.headers.get("Range"), start)

    async def _still_there(self) -> bool:
        try:
            await self._status()
        except (RemoteNotFound, RemoteUnavailable):
            return False
        return True


async def _begin(client: RemoteClient, name: str) -> tuple[str, str | None]:
    """POST a new upload in repository `name`: its location, and the id the registry gave."""
    response = await client.request("POST", f"/v2/{name}/blobs/uploads/", expect=(202,))
    location = response.headers.get("Location")
    if not location:
        raise RemoteError(f"upload in {name}: the registry gave no Location", status=202)
    return location, response.headers.get("Docker-Upload-UUID")


async def _abandon(client: RemoteClient, location: str) -> None:
    """Cancel an upload that cannot be recorded, if the registry lets us: its start's own
    error is what the caller raises, so a failure here is logged, the upload left to the
    registry's purge (no record names it: uploads/ cannot show it)."""
    try:
        await client.request("DELETE", location, expect=(202, 204, 404))
    except (RemoteError, RemoteUnavailable) as exc:
        log.warning(
            "start: an upload at %s that could not be recorded is left to its purge: %s",
            client.name,
            exc,
        )


def _range_end(header: str | None, recorded: int) -> int:
    """Bytes received, from the registry's `Range: 0-<last>`. It says 0-0 for an empty
    upload and for a one-byte one alike; the record tells those apart."""
    if not header or "-" not in header:
        return 0
    last = header.rpartition("-")[2].strip()
    if not (last.isascii() and last.isdigit()):  # "²".isdigit() holds; int() refuses it
        raise RemoteError(
            f"upload: the registry's Range {shown(header, 60)} is garbage", status=204
        )
    return int(last) + 1 if int(last) > 0 else min(recorded, 1)
