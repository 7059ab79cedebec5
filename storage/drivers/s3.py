"""The S3 driver: the tree docker-registry 2.8's `s3` driver keeps in a bucket, byte for byte
(facts in docs/s3.md, checked against moto and the registry).

- Object key = the registry's `rootdirectory` without its leading `/`, then the storage path.
  No directory markers: a directory is there when some key lies below it.
- A file a writer made (an upload's `data`) is an S3 multipart upload in progress, as the
  registry's writer leaves it: its size is the sum of its parts, and an object at the same
  key beside it is stale. Its parts are sealed once uploaded, so S3 appends only: a write
  below the end is InvalidOffset (SPEC §10, whatever the size), truncate cuts only the
  unsealed tail, and truncate to 0 aborts the multipart upload and starts another. Reading
  it (rare: `cat` of an upload, a hash chain that must be rebuilt) completes it into an
  object and starts a new one from that object, as the registry's writer does when its
  last part is under 5 MiB: under the writer lock, so Busy while another daemon writes it.
- move = copy (one CopyObject up to 1 GiB, UploadPartCopy ranges above) + delete: not
  atomic, as in 2.8.
- delete removes every object under the path and aborts its multipart uploads (2.8 leaves
  those; a bucket lifecycle rule would be the only other way they go).

boto3 blocks, so every call runs on a worker thread (trio.to_thread), which docs/s3.md says was
the fastest client here; botocore's own retries are off and storage/remote/retry.py's backoff
is used instead, for throttling (503 SlowDown, sent again even where a call must not be
sent twice: S3 refused it unprocessed; and a DeleteObjects key refused so), 5xx and lost
connections. What still fails is
RemoteUnavailable (EIO through the mount), never PathNotFound. A call in a thread cannot be
cancelled: a mount's interrupted read waits for its request. ListObjectsV2, the call
behind every lookup and readdir, is sent by s3_list.py with the client's signer and pool
but not its per-call work (docs/s3.md, "Listings").

One writer per file: in this process (Busy), and across daemons by a lock object beside
the file (`_Lock`; docs/scale-out.md says why it is safe). Reads stream ahead on a thread
per stream (`_Stream`), so a sequential read costs one GET.
"""

from __future__ import annotations

import builtins
import contextlib
import email.utils
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import trio
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from .. import jsontext
from ..errors import AccessDenied, Busy, InvalidOffset, RemoteUnavailable
from ..nurseries import open_nursery
from ..remote.retry import backoff, pause
from ..remote.untrusted import LISTING_NAMES_MAX
from .base import FileInfo, FileReader, FileWriter, PathNotFound, StorageDriver, join
from .s3_list import ListedObject, Lister, mtime_ns

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        ObjectIdentifierTypeDef,
    )

log = logging.getLogger(__name__)

T = TypeVar("T")
V = TypeVar("V")

MIB = 1 << 20
MIN_PART = 5 * MIB  # S3's least size of a part that is not the last one
CHUNKSIZE = 16 * MIB  # a part; 64 MiB checkpoints (storage/uploads.py) end on part bounds
# Up to COPY_THRESHOLD a move is one CopyObject; above, UploadPartCopy in COPY_CHUNK ranges.
# 2.8 copies in 32 MiB ranges above 32 MiB: 32 requests for a 1 GiB layer, where one does
# (and on moto each range reads the whole object: docs/scale-out.md has the figures).
COPY_THRESHOLD = 1 << 30
COPY_CHUNK = 256 * MIB
COPY_CONCURRENCY = 8
# The names of the registry's files: a stat of one starts with a HEAD (one request). Any
# other path (a repository, a tag, a digest's directory) starts with a one-key listing, which
# answers for a file, a directory and nothing alike: one request, where HEAD + LIST were two.
FILE_NAMES = frozenset({"data", "link", "startedat"})
SKIP_LIMIT = 4 * MIB  # a reader reads over a gap this small rather than opening a new GET
READ_CHUNK = 4 * MIB  # what a reader's stream reads at a time
AHEAD = 8 * MIB  # how far a reader's stream reads ahead of the reads
BEHIND = MIB  # what it keeps below the last read, for reads that come a little late
STREAMS = 2  # streams per open file
IDLE = 60.0  # seconds a stream waits for a read before it lets go of its connection
# The writer lock across daemons (docs/scale-out.md): an object beside the file, made with
# If-None-Match: *, renewed with If-Match. Expired LOCK_TTL after its last write by the
# server's clock; its holder writes nothing LOCK_SAFE after it sent its last renewal, and
# retries a failed renewal after the backoff until then.
LOCK_SUFFIX = ".regfs-lock"
LOCK_TTL = 60.0
LOCK_RENEW = 15.0
LOCK_SAFE = 30.0
LOCK_WAIT = 2.0  # how long a writer waits for a lock held elsewhere before Busy
RETRIES = 4  # tries after the first: 0.1 + 0.2 + 0.4 + 0.8 s of backoff
POOL = 64  # connections; trio runs up to 40 worker threads, copies add their own
KNOWN = 4096  # keys whose multipart upload the driver remembers (`_known`); the least used go
# A directory a stat found answers the stats of it for this long (`_dirs`): a mount's lookup
# of a name and the attributes it replies with, then a section's (tags/: its repository's),
# are three stats of one directory within milliseconds. The kernel keeps a directory's
# entry for --tag-ttl anyway; every change made through this driver drops them all.
DIR_SEEN = 1.0
# `present`: the names one listing decides in turn (a namespace's repositories: a page of
# 1000 entries delimited by `s/` rolls up two or three sections each), and how many such
# listings run at once.
PRESENT_RUN = 300
CHECKS_AT_ONCE = 32
# A listing without a delimiter names every key under its prefix: the whole bucket's for
# `regfs check` and `purge-uploads` (files("/")), far past the LISTING_NAMES_MAX names a
# directory may hold, and far past any registry too: still a bound on fresh pages for ever.
LISTING_KEYS_MAX = 100_000_000

_READS = ("LIST", "HEAD", "GET")  # what `call` names requests that change nothing
_NOT_SENT = (EndpointConnectionError, ConnectTimeoutError)
_LOST = (ConnectionClosedError, ReadTimeoutError, ResponseStreamingError, Urllib3Error)
_BUSY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}


class _PreconditionFailed(RemoteUnavailable):
    """412: a conditional write (If-None-Match, If-Match) found the object not as it said."""


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _transient(exc: Exception, resend: bool) -> bool:
    """Whether to try again: nothing was sent, or S3 refused the request unprocessed (its
    own SlowDown: even a call not to be sent twice may go again; any other 503, a gateway's,
    may come after S3 did it), or (for a call that may be sent twice) the server was busy
    or the connection broke."""
    if isinstance(exc, _NOT_SENT):
        return True
    if isinstance(exc, ClientError) and _code(exc) == "SlowDown":
        return True
    if not resend:
        return False
    if isinstance(exc, ClientError):
        return _code(exc) in _BUSY_CODES or _status(exc) in (500, 502, 503, 504)
    return isinstance(exc, _LOST)


def _missing(exc: Exception) -> bool:
    return isinstance(exc, ClientError) and _code(exc) in _MISSING_CODES


@dataclass(frozen=True)
class MultipartPaths:
    """Where multipart uploads in progress (files a writer made) are looked for: each look
    is a ListMultipartUploads, so a registry's driver looks only where the registry (and
    regfs) write with a writer: `_uploads/<id>/data`, never in `hashstates/`."""

    everywhere: bool

    def at(self, path: str) -> bool:
        """Whether the file at path may be a multipart upload."""
        return self.everywhere or _UPLOAD_DATA.search(path) is not None

    def below(self, path: str) -> bool:
        """Whether a multipart upload may lie at or below path."""
        return self.everywhere or _UPLOAD_DIR.search(path) is not None


_UPLOAD_DATA = re.compile(r"/_uploads/[^/]+/data$")
_UPLOAD_DIR = re.compile(r"/_uploads(?:/[^/]+)?(?:/data)?$")


ANYWHERE = MultipartPaths(everywhere=True)
REGISTRY_UPLOADS = MultipartPaths(everywhere=False)


@dataclass
class _Part:
    number: int
    etag: str
    size: int


@dataclass
class _Pending:
    """A multipart upload in progress at a key: a file whose size is the sum of its parts."""

    upload_id: str
    parts: list[_Part]
    mtime_ns: int

    @property
    def size(self) -> int:
        return sum(part.size for part in self.parts)


def s3_client(endpoint_url: str | None = None) -> S3Client:
    """A client from the standard AWS chain (environment, ~/.aws files, profiles,
    AWS_ENDPOINT_URL), at endpoint_url when given. Path-style addressing with an endpoint, as
    2.8 does with `regionendpoint`; checksums only where S3 requires them, as older
    S3-compatible servers want."""
    config = Config(
        max_pool_connections=POOL,
        retries={"total_max_attempts": 1},
        s3={"addressing_style": "path"} if endpoint_url else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=60,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, config=config)


class S3Driver(StorageDriver):
    name = "s3"

    def __init__(
        self,
        bucket: str,
        rootdirectory: str = "",
        *,
        client: S3Client | None = None,
        multipart: MultipartPaths = REGISTRY_UPLOADS,
        chunksize: int = CHUNKSIZE,
    ) -> None:
        if chunksize < MIN_PART:
            raise ValueError(f"chunksize {chunksize} is under S3's least part, {MIN_PART}")
        self.bucket = bucket
        self.rootdirectory = rootdirectory.strip("/")
        self.client: S3Client = client if client is not None else s3_client()
        self._lister = Lister(self.client, bucket)
        self.chunksize = chunksize
        self._multipart = multipart
        self._writers: dict[str, _Writer] = {}  # key → this process's open writer
        self._writers_lock = threading.Lock()
        # key → the id of the multipart upload a lookup last found there (the one a writer
        # resumes: the first listed at the key, which it stays while it is in progress), so
        # that a stat, a resume and a move of one upload look it up once (`_pending`). Only
        # a lookup's: an upload made here may follow another one at its key.
        self._known: OrderedDict[str, str] = OrderedDict()
        self._known_lock = threading.Lock()
        # path → (its stat, time.monotonic() when made) of directories stats found, and
        # (its names, when) of listings made: DIR_SEEN. `_changes` counts the changes sent:
        # an answer read before one is not kept after it.
        self._dirs: OrderedDict[str, tuple[FileInfo, float]] = OrderedDict()
        self._listed: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()
        self._dirs_lock = threading.Lock()
        # Whether a listing delimited by `s/` answers (`_present`); False once the store
        # refused one that a listing key by key then answered (some take only `/`).
        self._delimited = True
        self._changes = 0

    def __repr__(self) -> str:
        return f"S3Driver(s3://{self.bucket}/{self.rootdirectory})"

    def key(self, path: str) -> str:
        """2.8's s3Path: the root directory, then the path, without a leading `/`."""
        return f"{self.rootdirectory}{path}".lstrip("/") if path != "/" else self._top()

    def _top(self) -> str:
        return f"{self.rootdirectory}/" if self.rootdirectory else ""

    def check_bucket(self) -> None:
        """A HEAD of the bucket before a mount or a check starts: ValueError in one line
        saying what is wrong (no credentials, wrong ones, no such bucket, no server), rather
        than an EIO on every call later. Throttling, 5xx and lost connections are retried
        as every call's are (`call`); those four refuse at once."""
        where = self.client.meta.endpoint_url

        def head() -> None:
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except NoCredentialsError:
                raise ValueError(
                    f"s3://{self.bucket}: no AWS credentials found (environment, "
                    "~/.aws/credentials, AWS_PROFILE)"
                ) from None
            except ClientError as exc:
                if _status(exc) == 404:
                    raise ValueError(f"s3://{self.bucket}: no such bucket at {where}") from None
                if _status(exc) in (401, 403):
                    raise ValueError(
                        f"s3://{self.bucket}: access denied at {where}: wrong credentials, "
                        "or no right to this bucket"
                    ) from None
                raise

        try:
            self.call(f"HEAD bucket {self.bucket}", head)
        except (RemoteUnavailable, AccessDenied) as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError):
                raise ValueError(f"s3://{self.bucket}: {where} answered {cause}") from None
            raise ValueError(f"s3://{self.bucket}: cannot reach {where}: {cause}") from None

    # -- calling S3 ----------------------------------------------------------------------

    def call(
        self,
        what: str,
        request: Callable[[], T],
        *,
        resend: bool = True,
        path: str | None = None,
    ) -> T:
        """request() with retries after transient failures (resend=False: only when it was
        not sent: a CreateMultipartUpload sent twice would leave a second upload at the key,
        and the registry resumes the first it lists). With path, a missing key (or upload)
        is PathNotFound(path). Blocks: for worker threads."""
        if not what.startswith(_READS):
            with self._dirs_lock:  # a key made, changed or gone may change what they say
                self._changes += 1
                self._dirs.clear()
                self._listed.clear()
        failures = 0
        while True:
            try:
                return request()
            except (ClientError, BotoCoreError, Urllib3Error) as exc:
                if path is not None and _missing(exc):
                    raise PathNotFound(path) from None
                if failures >= RETRIES or not _transient(exc, resend):
                    raise self._error(what, exc) from exc
                failures += 1
                log.warning("S3 %s failed (%s), try %d in a moment", what, exc, failures + 1)
                time.sleep(backoff(failures))

    def _error(self, what: str, exc: Exception) -> Exception:
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code == "PreconditionFailed" or _status(exc) == 412:
                return _PreconditionFailed(f"S3 {what}: precondition failed")
            if code in _DENIED_CODES:
                return AccessDenied(f"S3 {what}: access denied ({code})")
            if code == "NoSuchBucket":
                return RemoteUnavailable(f"S3 {what}: bucket {self.bucket} does not exist")
        log.error("S3 %s failed: %s", what, exc)
        return RemoteUnavailable(f"S3 {what}: {exc}")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn)

    def _head(self, key: str) -> tuple[int, int, str] | None:
        """(size, mtime_ns, etag) of the object at key, None when there is none."""
        try:
            head = self.call(
                f"HEAD {key}",
                lambda: self.client.head_object(Bucket=self.bucket, Key=key),
                path=key,
            )
        except PathNotFound:
            return None
        return head["ContentLength"], mtime_ns(head["LastModified"]), head["ETag"]

    def _first(self, prefix: str) -> ListedObject | None:
        """The first object whose key starts with prefix (a ListObjectsV2 of one key): the
        object at prefix itself if there is one (it sorts first), else one below `prefix/`,
        or a sibling whose name merely starts with the same letters (`app-x` for `app`)."""
        page = self.call(f"LIST {prefix}", lambda: self._lister.page(prefix, max_keys=1))
        return next(iter(page.objects), None)

    def _objects(
        self, prefix: str, delimiter: str = ""
    ) -> Iterator[tuple[str, ListedObject | None]]:
        """ListObjectsV2 pages (s3_list.py) as (key, the object) and (common prefix, None).
        A page named again is refused (`_unseen`)."""
        token: str | None = None
        seen: set[str] = set()
        listed = 0
        while True:
            page = self.call(
                f"LIST {prefix}",
                functools.partial(self._lister.page, prefix, delimiter, token=token),
            )
            for obj in page.objects:
                yield obj.key, obj
            for common in page.prefixes:
                yield common, None
            if page.token is None:
                return
            listed += len(page.objects) + len(page.prefixes)
            cap = LISTING_NAMES_MAX if delimiter else LISTING_KEYS_MAX
            _unseen(seen, page.token, f"LIST {prefix}", listed, cap)
            token = page.token

    def _uploads(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, upload id) of the multipart uploads in progress under prefix, in S3's order
        (by key, then oldest first)."""
        key_marker = upload_marker = ""
        seen: set[tuple[str, str]] = set()
        listed = 0
        while True:
            listing = functools.partial(
                self.client.list_multipart_uploads,
                Bucket=self.bucket,
                Prefix=prefix,
                KeyMarker=key_marker,
                UploadIdMarker=upload_marker,
            )
            page = self.call(f"LIST UPLOADS {prefix}", listing)
            uploads = page.get("Uploads", [])
            for upload in uploads:
                yield upload["Key"], upload["UploadId"]
            if not page.get("IsTruncated"):
                return
            listed += len(uploads)
            key_marker = page["NextKeyMarker"]
            upload_marker = page["NextUploadIdMarker"]
            marker = (key_marker, upload_marker)
            _unseen(seen, marker, f"LIST UPLOADS {prefix}", listed, LISTING_KEYS_MAX)

    def _pending(self, key: str) -> _Pending | None:
        """The multipart upload at exactly key that 2.8's writer would resume: the first
        listed (src s3.go:570-605), with its parts. Where a lookup found one at key before,
        its parts are asked for by its id (one ListParts, no ListMultipartUploads):
        while it is in progress it is still the first listed (an upload started before it
        cannot appear later); once finished or cancelled (by any node) S3 answers
        NoSuchUpload, and the key is looked up again."""
        with self._known_lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
        if known is not None:
            try:
                return self._parts(key, known, key)
            except PathNotFound:
                self._forget(key, known)
        upload_id = next((u for k, u in self._uploads(key) if k == key), None)
        if upload_id is None:
            return None
        self._remember(key, upload_id)
        return self._parts(key, upload_id)

    def _remember(self, key: str, upload_id: str) -> None:
        """upload_id is the multipart upload at key a writer resumes (`_pending`)."""
        with self._known_lock:
            self._known[key] = upload_id
            self._known.move_to_end(key)
            while len(self._known) > KNOWN:
                self._known.popitem(last=False)

    def _forget(self, key: str, upload_id: str) -> None:
        """upload_id at key is finished or cancelled."""
        with self._known_lock:
            if self._known.get(key) == upload_id:
                del self._known[key]

    def _parts(self, key: str, upload_id: str, path: str | None = None) -> _Pending:
        """The multipart upload upload_id at key, with its parts (ListParts, a page per 1000);
        with path, PathNotFound(path) where it is no longer in progress."""
        parts: list[_Part] = []
        newest = 0
        marker = 0
        while True:
            listing = functools.partial(
                self.client.list_parts,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumberMarker=marker,
            )
            page = self.call(f"LIST PARTS {key}", listing, path=path)
            for part in page.get("Parts", []):
                parts.append(_Part(part["PartNumber"], part["ETag"], part["Size"]))
                newest = max(newest, mtime_ns(part["LastModified"]))
            if not page.get("IsTruncated"):
                break
            marker = page["NextPartNumberMarker"]
        return _Pending(upload_id, parts, newest)

    def _create(self, key: str) -> str:
        """A new multipart upload at key, as 2.8 makes one (src s3.go:552)."""
        return self.call(
            f"CREATE UPLOAD {key}",
            lambda: self.client.create_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                ContentType="application/octet-stream",
                ACL="private",
                StorageClass="STANDARD",
            ),
            resend=False,
        )["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> _Part:
        etag = self.call(
            f"PUT PART {number} {key}",
            lambda: self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            ),
        )["ETag"]
        return _Part(number, etag, len(data))

    def _complete(self, key: str, upload_id: str, parts: list[_Part]) -> None:
        """CompleteMultipartUpload. A retry that finds the upload gone (NoSuchUpload) after
        a try whose answer was lost checks whether that try completed it: the object at key
        with the parts' size (and their multipart ETag, where S3's form of it shows) is
        success, not an error."""
        ordered = sorted(parts, key=lambda p: p.number)
        done: list[CompletedPartTypeDef] = [
            {"PartNumber": p.number, "ETag": p.etag} for p in ordered
        ]
        tries = 0

        def complete() -> None:
            nonlocal tries
            tries += 1
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},
                )
            except ClientError as exc:
                if tries == 1 or _code(exc) != "NoSuchUpload" or not self._completed(key, ordered):
                    raise
                log.info("COMPLETE %s: the lost answer's try had completed it", key)

        self.call(f"COMPLETE {key}", complete)
        self._forget(key, upload_id)

    def _completed(self, key: str, parts: list[_Part]) -> bool:
        """Whether the object at key is what completing parts made."""
        head = self._head(key)
        if head is None or head[0] != sum(p.size for p in parts):
            return False
        # S3's ETag of a multipart object: MD5 of the parts' MD5s, then -<number of parts>.
        etag, md5s = head[2].strip('"'), [p.etag.strip('"') for p in parts]
        digest, _, count = etag.partition("-")
        if count != str(len(parts)):
            return False  # one PUT made it (no -N), or other parts did
        if not all(re.fullmatch(r"[0-9a-f]{32}", md5) for md5 in (digest, *md5s)):
            return True  # ETags that are no MD5s (SSE-KMS, other servers): size and count
        return (
            digest == hashlib.md5(bytes.fromhex("".join(md5s)), usedforsecurity=False).hexdigest()
        )

    def abort(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(PathNotFound):  # aborted already
            self.call(
                f"ABORT {key}",
                lambda: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                ),
                path=key,
            )
        self._forget(key, upload_id)

    def _copy_parts(self, source: str, key: str, upload_id: str, size: int) -> list[_Part]:
        """UploadPartCopy of the object at source into parts of upload_id, in COPY_CHUNK
        ranges, COPY_CONCURRENCY at once (as 2.8's multipart copy, src s3.go:708-806). A
        remainder under MIN_PART joins the range before it: parts may follow these (restart),
        and S3 refuses a part under MIN_PART anywhere but last."""
        count = max(1, size // COPY_CHUNK + (size % COPY_CHUNK >= MIN_PART))

        def copy(number: int) -> _Part:
            start = (number - 1) * COPY_CHUNK
            end = (size if number == count else start + COPY_CHUNK) - 1
            answer = self.call(
                f"COPY PART {number} {source} → {key}",
                lambda: self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    CopySourceRange=f"bytes={start}-{end}",
                ),
            )
            return _Part(number, answer["CopyPartResult"]["ETag"], end + 1 - start)

        with ThreadPoolExecutor(min(count, COPY_CONCURRENCY)) as pool:
            return list(pool.map(copy, range(1, count + 1)))

    def _get(self, key: str, path: str, limit: int) -> bytes:
        def read() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read(limit))
            finally:
                body.close()

        return self.call(f"GET {key}", read, path=path)

    def restart(self, key: str) -> tuple[_Pending, bytes]:
        """A new multipart upload holding the object at key (2.8's writer after a last part
        under 5 MiB, src s3.go:1141-1265): under MIN_PART it is read back and uploaded as
        part 1, and returned (a tail to go on from); else copied into parts, all sealed.
        Part 1 is there before this returns: no moment holds the data in no upload."""
        head = self._head(key)
        size = head[0] if head else 0
        upload_id = self._create(key)
        if size == 0:
            return _Pending(upload_id, [], time.time_ns()), b""
        if size < MIN_PART:
            data = self._get(key, key, MIN_PART)
            part = self.upload_part(key, upload_id, 1, data)
            return _Pending(upload_id, [part], time.time_ns()), data
        return _Pending(upload_id, self._copy_parts(key, key, upload_id, size), time.time_ns()), b""

    def materialize(self, key: str, path: str) -> None:
        """Make the multipart upload at key (if any) readable: complete it into the object,
        then go on in a new one holding the same bytes, as the file is still being uploaded.
        Its writer here does it; else under the writer lock (`_locked`): Busy while another
        daemon (or a registry node's PATCH, which takes no lock: a window the lock cannot
        close) writes it, whose next part would go to an upload S3 no longer has."""
        with self._writers_lock:
            writer = self._writers.get(key)
        if writer is not None:
            writer.materialize_blocking()
            return
        with self._locked(key, path):
            self._materialize(key, go_on=True)

    @contextlib.contextmanager
    def _locked(self, key: str, path: str) -> Iterator[None]:
        """The writer lock of the file at key held, as a writer holds it (blocks: a thread):
        for what completes a multipart upload that is not this process's writer's."""
        lock = _Lock(self, key + LOCK_SUFFIX, path)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _materialize(self, key: str, go_on: bool) -> None:
        """materialize without a writer (go_on False: a move, which deletes it next, does
        not go on); the caller holds the lock. Nothing where there is no multipart upload."""
        pending = self._pending(key)
        if pending is None:
            return
        if not pending.parts:  # nothing to read, and S3 cannot complete an empty upload
            self.call(
                f"PUT {key}",
                lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=b""),
            )
            if not go_on:
                self.abort(key, pending.upload_id)
            return
        self._complete(key, pending.upload_id, pending.parts)
        if go_on:
            self.restart(key)

    # -- the driver's calls --------------------------------------------------------------

    async def _get_content(self, path: str, limit: int) -> bytes:
        key = self.key(path)

        def get() -> bytes:
            if self._multipart.at(path):
                self.materialize(key, path)
            return self._get(key, path, limit)

        return await self._run(get)

    async def _put_content(self, path: str, data: bytes) -> None:
        key = self.key(path)
        await self._run(
            lambda: self.call(
                f"PUT {key}",
                lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data),
            )
        )

    async def _reader(self, path: str) -> FileReader:
        key = self.key(path)

        def open_() -> _Reader:
            if self._multipart.at(path):
                self.materialize(key, path)
            head = self._head(key)
            if head is None:
                raise PathNotFound(path)
            return _Reader(self, key, head[0], head[2])

        return await self._run(open_)

    async def _writer(self, path: str) -> FileWriter:
        key = self.key(path)
        with self._writers_lock:
            if key in self._writers:
                raise Busy(f"{path} is being written by another writer")
            writer = self._writers[key] = _Writer(self, key)
        lock = _Lock(self, key + LOCK_SUFFIX, path)
        try:
            await self._run(lock.acquire)
            writer.lock = lock
            await self._run(writer.open_blocking)
        except BaseException:
            await self._run(lambda: self._release(key))
            raise
        return writer

    def _release(self, key: str) -> None:
        """Forget the writer at key and let go of its lock (blocks: a worker thread)."""
        with self._writers_lock:
            writer = self._writers.pop(key, None)
        if writer is not None and writer.lock is not None:
            writer.lock.release()

    def _written(self, path: str, key: str) -> FileInfo | None:
        """The file as its writer here has it (every byte written, the last one's time),
        where one is open."""
        with self._writers_lock:
            writer = self._writers.get(key)
        return None if writer is None else FileInfo(path, writer.size, writer.mtime_ns, False)

    async def _being_written(self, path: str) -> bool:
        """Whether the file's lock object is there and live: renewed within LOCK_TTL by the
        server's clock, as a writer taking it over (`_Lock._try`) judges it."""
        key = self.key(path) + LOCK_SUFFIX
        head = await self._run(lambda: _lock_head(self, key))
        return head is not None and _lock_age(head) < LOCK_TTL

    async def _stat(self, path: str) -> FileInfo:
        if path == "/":
            return FileInfo(path, 0, 0, True)
        key = self.key(path)
        if not self._multipart.at(path) and path.rpartition("/")[2] not in FILE_NAMES:
            seen = self._kept(self._dirs, path)  # kept: answered without a thread's hop
            if seen is not None:
                return seen

        def stat() -> FileInfo:
            if self._multipart.at(path):
                written = self._written(path, key)
                if written is not None:
                    return written
                pending = self._pending(key)
                if pending is not None:
                    return FileInfo(path, pending.size, pending.mtime_ns, False)
            if path.rpartition("/")[2] in FILE_NAMES:
                head = self._head(key)
                if head is not None:
                    return FileInfo(path, head[0], head[1], False)
            since = self._changes
            seen = self._kept(self._dirs, path)
            if seen is not None:
                return seen
            parent, _, name = path.rpartition("/")
            listed = self._kept(self._listed, parent or "/")
            if listed is not None and name not in listed and not self._multipart.below(path):
                raise PathNotFound(path)  # not in a listing of its directory just made
            found = self._first(key)
            if found is not None and found.key == key:
                return FileInfo(path, found.size, found.mtime_ns, False)
            if found is not None and not found.key.startswith(key + "/"):
                found = self._first(key + "/")  # a sibling sorted first
            if found is not None:
                self._saw_dirs(path, found.key[len(key) + 1 :], found.mtime_ns, since)
                return FileInfo(path, 0, found.mtime_ns, True)
            if self._multipart.below(path) and next(self._uploads(key + "/"), None):
                return FileInfo(path, 0, time.time_ns(), True)
            raise PathNotFound(path)

        return await self._run(stat)

    def forget(self) -> None:
        """Drop the directories and listings kept for DIR_SEEN (SIGHUP: every cache goes),
        and try the delimiter `s/` again (`_present`: the endpoint may be another now)."""
        with self._dirs_lock:
            self._dirs.clear()
            self._listed.clear()
        self._delimited = True

    def _saw_dirs(self, path: str, below: str, mtime_ns: int, since: int) -> None:
        """Keep for DIR_SEEN the directory path, whose first key is path/below, and those on
        the way to it: that key is the first below each of them too (a key between would be
        below path), so a stat of one would find it, and say what this one did."""
        ways = itertools.accumulate(below.split("/")[:-1], lambda a, b: f"{a}/{b}")
        for dir_path in (*(join(path, name) for name in ways), path):
            self._keep(self._dirs, dir_path, FileInfo(dir_path, 0, mtime_ns, True), since)

    def _keep(
        self, memo: OrderedDict[str, tuple[V, float]], path: str, value: V, since: int
    ) -> None:
        """Keep value (`_dirs`, `_listed`) for DIR_SEEN, unless a change was sent since.
        Newest last: what is older than DIR_SEEN goes at once (a listing can be large), and
        never more than KNOWN."""
        with self._dirs_lock:
            if since == self._changes:
                now = time.monotonic()
                memo[path] = (value, now)
                memo.move_to_end(path)
                while memo and (
                    len(memo) > KNOWN or now - next(iter(memo.values()))[1] >= DIR_SEEN
                ):
                    memo.popitem(last=False)

    def _kept(self, memo: OrderedDict[str, tuple[V, float]], path: str) -> V | None:
        with self._dirs_lock:
            kept = memo.get(path)
        return kept[0] if kept is not None and time.monotonic() - kept[1] < DIR_SEEN else None

    async def _symlinks(self, path: str) -> builtins.list[str]:
        """None: S3 has no links. One stat says whether the directory is there (PathNotFound
        as list would say it), where a listing would page through all of it
        (`blobs/sha256/<2 hex>/` holds thousands). `regfs check` asks no S3 driver this: its
        view (`keeps_symlinks`) answers from the listings it made."""
        if not (await self._stat(path)).is_dir:
            raise PathNotFound(path)
        return []

    async def _list(self, path: str) -> builtins.list[str]:
        prefix = self._top() if path == "/" else self.key(path) + "/"
        uploads = self._multipart.below(path)
        kept = None if uploads else self._kept(self._listed, path)
        if kept is not None:  # answered without a thread's hop
            return [*kept]

        def names() -> builtins.list[str]:
            since = self._changes
            found = set()
            for name, _ in self._objects(prefix, "/"):
                found.add(name[len(prefix) :].rstrip("/"))
            if uploads:
                for key, _ in self._uploads(prefix):
                    found.add(key[len(prefix) :].partition("/")[0])
            found.discard("")  # a directory marker another tool made
            if not found and path != "/":
                raise PathNotFound(path)
            if not uploads:  # its names answer its stats too: one not among them is absent
                self._keep(self._listed, path, tuple(sorted(found)), since)
            return sorted(found)

        return await self._run(names)

    async def _present(self, directory: str, names: builtins.list[str]) -> builtins.list[bool]:
        """Whether a key is at or below each `directory/name` (so `stat` finds it), from
        listings of the keys below the directory, not a request per name: the names in key
        order, cut into runs of PRESENT_RUN listed at once (CHECKS_AT_ONCE), each run's
        listing starting at its next undecided name and merged with the names in turn.
        Where no `s/` is in a name (a repository's `<name>/_layers`, unless the name ends
        in s), with the delimiter `s/`: every key of a repository's `_layers/`,
        `_manifests/` and `_uploads/` rolls up into one entry each, so a page of 1000
        decides ~300 names. Others are listed key by key, a page restarting at its next
        undecided name, so the rest of a name's keys cost no pages. A directory a stat
        found within DIR_SEEN costs nothing. False for a name no key is at or below, as a
        stat would say."""
        prefix = self._top() if directory == "/" else self.key(directory) + "/"
        keys = [prefix + name for name in names]
        found = [self._kept(self._dirs, join(directory, name)) is not None for name in names]
        order = sorted((i for i, yes in enumerate(found) if not yes), key=keys.__getitem__)

        def scan(run: builtins.list[int], delimiter: str) -> None:
            """found[i] for the indexes of run (in key order): pages from the first name not
            decided yet, each page's keys and prefixes merged with the names in turn. A page
            that decided none (keys between two names) is followed by its token, so every
            page moves on."""
            at, token, seen, listed = 0, None, set[str](), 0
            while at < len(run):
                start = keys[run[at]][:-1]  # sorts before the key (a key is never empty)
                page = self.call(
                    f"LIST {prefix}",
                    functools.partial(
                        self._lister.page, prefix, delimiter, token=token,
                        start_after="" if token else start,
                    ),
                )  # fmt: skip
                before = at
                for entry in sorted([*(obj.key for obj in page.objects), *page.prefixes]):
                    while at < len(run) and entry >= keys[run[at]] + "0":  # past its keys
                        at += 1  # '/' sorts just below '0': nothing is at or below it
                    if at == len(run):
                        return
                    key = keys[run[at]]
                    if entry == key or entry.startswith(key + "/"):
                        found[run[at]] = True
                        at += 1
                if page.token is None:
                    return  # nothing after: the names left are absent
                token = page.token if at == before else None
                if token is not None:
                    listed += len(page.objects) + len(page.prefixes)
                    _unseen(seen, token, f"LIST {prefix}", listed, LISTING_KEYS_MAX)

        def delimited(run: builtins.list[int]) -> None:
            """scan with the delimiter `s/`, or key by key where the store refused it: some
            take no delimiter but `/` (an error answer, or one token named for ever)."""
            if self._delimited:
                try:
                    return scan(run, "s/")
                except RemoteUnavailable as exc:
                    log.warning(
                        "S3 LIST %s with the delimiter 's/' failed (%s): key by key", prefix, exc
                    )
            scan(run, "")
            self._delimited = False  # that answered: the delimiter is what the store refuses

        limiter = trio.CapacityLimiter(CHECKS_AT_ONCE)
        async with open_nursery() as nursery:  # an error comes out as itself
            for delimiter in ("s/", ""):
                part = [i for i in order if ("s/" in names[i]) == (not delimiter)]
                for at in range(0, len(part), PRESENT_RUN):
                    names_run = part[at : at + PRESENT_RUN]
                    run = (
                        functools.partial(delimited, names_run)
                        if delimiter
                        else functools.partial(scan, names_run, "")
                    )
                    nursery.start_soon(
                        functools.partial(trio.to_thread.run_sync, run, limiter=limiter)
                    )
        return found

    async def _entries(self, path: str) -> builtins.list[FileInfo]:
        """The listing's own sizes and times, so a file costs no request of its own; a
        directory's time is 0 (S3 keeps none: `stat` takes the first key's below it). Where
        a multipart upload may stand (`self._multipart`), a file is sized as a stat would,
        from the upload the listing's ListMultipartUploads found (`_sized`)."""
        prefix = self._top() if path == "/" else self.key(path) + "/"

        def listed() -> tuple[dict[str, FileInfo], dict[str, str]]:
            found: dict[str, FileInfo] = {}
            for name, obj in self._objects(prefix, "/"):
                leaf = name[len(prefix) :].rstrip("/")
                if not leaf:
                    continue  # a directory marker another tool made
                child = join(path, leaf)
                if obj is not None:
                    found[child] = FileInfo(child, obj.size, obj.mtime_ns, False)
                else:
                    found.setdefault(child, FileInfo(child, 0, 0, True))
            uploads: dict[str, str] = {}  # the first listed at a key: the one resumed
            if self._multipart.below(path):
                for key, upload_id in self._uploads(prefix):
                    leaf, below, _ = key[len(prefix) :].partition("/")
                    child = join(path, leaf)
                    found.setdefault(child, FileInfo(child, 0, 0, bool(below)))
                    if not below:
                        uploads.setdefault(child, upload_id)
            if not found and path != "/":
                raise PathNotFound(path)
            return found, uploads

        return await self._all_sized(*await self._run(listed))

    async def _files(self, path: str, sizes: bool) -> builtins.list[FileInfo]:
        """One listing without a delimiter (1000 keys a request) and one of the multipart
        uploads below; a file where one may stand is sized as a stat would (`_sized`), from
        the upload that listing found: a ListParts per upload in progress, no lookup of it.
        Without sizes, no ListParts: an upload in progress is listed with size and time 0."""
        prefix = self._top() if path == "/" else self.key(path) + "/"

        def listed() -> tuple[dict[str, FileInfo], dict[str, str]]:
            found: dict[str, FileInfo] = {}
            for name, obj in self._objects(prefix):
                rest = name[len(prefix) :]
                if obj is not None and rest and not rest.endswith("/"):  # not a marker
                    child = join(path, rest)
                    found[child] = FileInfo(child, obj.size, obj.mtime_ns, False)
            uploads: dict[str, str] = {}  # the first listed at a key: the one resumed
            for key, upload_id in self._uploads(prefix):
                child = join(path, key[len(prefix) :])
                found.setdefault(child, FileInfo(child, 0, 0, False))
                uploads.setdefault(child, upload_id)
            return found, uploads

        found, uploads = await self._run(listed)
        if not sizes:  # an upload's size is its parts', not a stale object's beside it
            return [
                FileInfo(child, 0, 0, False)
                if child in uploads and self._multipart.at(child)
                else info
                for child, info in sorted(found.items())
            ]
        return await self._all_sized(found, uploads)

    async def _all_sized(
        self, found: dict[str, FileInfo], uploads: dict[str, str]
    ) -> builtins.list[FileInfo]:
        """What one listing found (by path), in order, each file where a multipart upload
        may stand sized by `_sized` from the upload listed there (uploads, by path); one
        finished or cancelled since, with nothing left in its place, is left out."""
        infos = []
        for child, info in sorted(found.items()):
            if not info.is_dir and self._multipart.at(child):
                try:
                    info = await self._sized(child, info, uploads.get(child))
                except PathNotFound:
                    continue
            infos.append(info)
        return infos

    async def _sized(self, path: str, listed: FileInfo, upload_id: str | None) -> FileInfo:
        """What `stat` says of a file where a multipart upload may stand, given what one
        listing of the objects and uploads found there: its writer's size where one is open
        here, else the listed upload's parts (ListParts), else the listed object. An upload
        finished or cancelled since it was listed is stat'ed after all."""
        key = self.key(path)

        def sized() -> FileInfo | None:
            written = self._written(path, key)
            if written is not None or upload_id is None:
                return written or listed
            try:
                pending = self._parts(key, upload_id, path)
            except PathNotFound:
                return None
            return FileInfo(path, pending.size, pending.mtime_ns, False)

        return await self._run(sized) or await self._stat(path)

    async def _move(self, source: str, dest: str) -> None:
        src, dst = self.key(source), self.key(dest)

        def move() -> None:
            if not self._multipart.at(source):
                return move_object()
            with self._writers_lock:
                if src in self._writers:
                    raise Busy(f"{source} is being written: close it before moving it")
            with self._locked(src, source):  # Busy while another daemon writes it
                self._materialize(src, go_on=False)
                move_object()

        def move_object() -> None:
            head = self._head(src)
            if head is None:
                raise PathNotFound(source)
            self._copy(src, dst, head[0])
            self.call(
                f"DELETE {src}",
                lambda: self.client.delete_object(Bucket=self.bucket, Key=src),
            )

        await self._run(move)

    def _copy(self, src: str, dst: str, size: int) -> None:
        if size <= COPY_THRESHOLD:
            self.call(
                f"COPY {src} → {dst}",
                lambda: self.client.copy_object(
                    Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src}
                ),
            )
            return
        upload_id = self._create(dst)
        try:
            parts = self._copy_parts(src, dst, upload_id, size)
            self._complete(dst, upload_id, parts)
        except BaseException:
            self.abort(dst, upload_id)
            raise

    async def _delete(self, path: str) -> None:
        key = self.key(path)

        def below(k: str) -> bool:
            return k == key or k.startswith(key + "/")

        def delete() -> None:
            keys = [k for k, _ in self._objects(key) if below(k)]
            uploads = []
            if self._multipart.below(path) or self._multipart.at(path):
                uploads = [(k, u) for k, u in self._uploads(key) if below(k)]
            if not keys and not uploads:
                raise PathNotFound(path)
            for start in range(0, len(keys), 1000):
                self._delete_keys(key, keys[start : start + 1000])
            for upload_key, upload_id in uploads:
                self.abort(upload_key, upload_id)

        await self._run(delete)

    def _delete_keys(self, what: str, keys: builtins.list[str]) -> None:
        """DeleteObjects of up to 1000 keys. S3 answers 200 with an error per key it did not
        delete: those it was too busy for (SlowDown, InternalError) are sent again after the
        backoff, as `call` retries a throttled request; any other is RemoteUnavailable."""
        failures = 0
        while keys:
            batch: builtins.list[ObjectIdentifierTypeDef] = [{"Key": k} for k in keys]
            deleting = functools.partial(
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            errors = self.call(f"DELETE {what}/…", deleting).get("Errors", [])
            busy = [e for e in errors if e.get("Code") in _BUSY_CODES]
            if len(busy) < len(errors) or (busy and failures >= RETRIES):
                raise RemoteUnavailable(f"S3 DELETE {what}: {errors[:3]}")
            keys = [str(e.get("Key")) for e in busy]
            if keys:
                failures += 1
                log.warning(
                    "S3 DELETE %s: %d keys refused (%s), try %d in a moment",
                    what,
                    len(keys),
                    busy[0].get("Code"),
                    failures + 1,
                )
                time.sleep(backoff(failures))


class _Stream:
    """One GET of the object from `start` on, read ahead by a thread of its own into chunks
    held here: at most AHEAD bytes past what was taken, and BEHIND bytes before it (a
    kernel's read-ahead requests may arrive a little out of order). A broken stream is
    opened again where it broke, with backoff; what still fails is kept for the reads."""

    def __init__(self, driver: S3Driver, key: str, etag: str, start: int, size: int) -> None:
        self._driver = driver
        self._key = key
        self._etag = etag
        self._size = size
        self._chunks: deque[tuple[int, bytes]] = deque()  # (offset, bytes), in order
        self._origin = start
        self.start = start  # offset of the first byte held
        self.end = start  # offset after the last byte received
        self._taken = start  # the furthest end any read reached
        self._error: Exception | None = None
        self._closed = False
        self.waiting = 0  # reads waiting for bytes: such a stream is never let go
        self._full = False  # the read-ahead waits for reads to make room
        self._changed = threading.Condition()
        threading.Thread(target=self._run, name="regfs-s3-read", daemon=True).start()

    def _ahead(self) -> int:
        return min(AHEAD, max(READ_CHUNK, self._taken - self._origin))

    def covers(self, offset: int) -> bool:
        """Whether a read at offset is served by this stream (held, or soon to arrive)."""
        return self.start <= offset <= self.end + SKIP_LIMIT

    def take(self, offset: int, length: int, wait: bool = True) -> bytes | None:
        """The bytes [offset, offset+length), once they arrived (blocks: a worker thread);
        None if the stream was closed meanwhile (the caller takes another), or without
        wait, if they are not all here yet."""
        want = offset + length
        with self._changed:
            if want > self._taken:
                self._taken = want
                if self._full:  # wake the read-ahead only when it waits for room
                    self._changed.notify_all()
            if not wait and self.end < want:
                return None
            self.waiting += 1
            try:
                while self.end < want and self._error is None and not self._closed:
                    self._changed.wait()
            finally:
                self.waiting -= 1
            if self.end < want:
                if self._error is not None:
                    raise self._error
                return None
            if offset < self.start:  # let go meanwhile, for a read further on
                return None
            pieces = [
                chunk[max(offset, at) - at : min(want, at + len(chunk)) - at]
                for at, chunk in self._chunks
                if at < want and offset < at + len(chunk)
            ]  # a whole chunk is not copied, a part of one once
            while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= offset - BEHIND:
                first_start, first = self._chunks.popleft()
                self.start = first_start + len(first)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _run(self) -> None:
        driver = self._driver
        failures = 0
        body: Any = None
        try:
            while self.end < self._size:
                with self._changed:
                    # Read ahead as far as reads went on in order here, up to AHEAD: a
                    # single read (a header, a random read) costs one chunk, not AHEAD.
                    while self.end - self._taken >= self._ahead() and not self._closed:
                        self._full = True
                        if not self._changed.wait(IDLE):  # a reader never closed: let go
                            self._closed = True
                    self._full = False
                    if self._closed:
                        return
                    position = self.end
                try:
                    if body is None:
                        body = self._open(position)
                    chunk: bytes = body.read(READ_CHUNK)
                    if not chunk:
                        raise ResponseStreamingError(error=f"the stream ended at {position}")
                    failures = 0
                except (BotoCoreError, Urllib3Error) as exc:
                    if body is not None:
                        body.close()
                        body = None
                    if failures >= RETRIES or not _transient(exc, resend=True):
                        raise driver._error(f"GET {self._key}", exc) from exc
                    failures += 1
                    log.warning("S3 read of %s failed (%s), try %d", self._key, exc, failures + 1)
                    time.sleep(backoff(failures))
                    continue
                with self._changed:
                    self._chunks.append((position, chunk))
                    self.end = position + len(chunk)
                    if self.waiting:
                        self._changed.notify_all()
        except Exception as exc:
            with self._changed:
                self._error = exc
                self._changed.notify_all()
        finally:
            if body is not None:
                body.close()

    def _open(self, offset: int) -> Any:
        driver = self._driver
        get = functools.partial(
            driver.client.get_object, Bucket=driver.bucket, Key=self._key, IfMatch=self._etag
        )
        if offset:  # from the start, no Range: moto (not S3) reads a whole object per Range
            get = functools.partial(get, Range=f"bytes={offset}-")
        return driver.call(f"GET {self._key}", get)["Body"]


class _Reader(FileReader):
    """Reads served by _Streams while each goes on in order (a short gap ahead is read over):
    up to STREAMS of them, for readers of two places of one file at once. A read elsewhere
    starts another in place of an idle one used longest ago; with none idle (reads at random
    places at once), it is one GET of its own range, so every read makes progress. If-Match
    the ETag seen at open: an object replaced meanwhile is an error, never a mix of two."""

    def __init__(self, driver: S3Driver, key: str, size: int, etag: str) -> None:
        self._driver = driver
        self._key = key
        self._etag = etag
        self.size = size
        self._streams: list[_Stream] = []  # the one used last, last

    async def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0:
            raise InvalidOffset(f"negative offset {offset}")
        length = min(length, self.size - offset)
        if length <= 0:
            return b""
        stream = self._stream_at(offset)
        if stream is not None:
            # Bytes read ahead are taken at once: a thread hop costs more than the copy.
            data = stream.take(offset, length, wait=False)
            if data is None:
                data = await trio.to_thread.run_sync(stream.take, offset, length)
            if data is not None:
                return data
        return await trio.to_thread.run_sync(self._get_range, offset, length)

    def _stream_at(self, offset: int) -> _Stream | None:
        for stream in self._streams:
            if stream.covers(offset):
                self._streams.remove(stream)
                self._streams.append(stream)
                return stream
        if len(self._streams) >= STREAMS:
            idle = next((s for s in self._streams if not s.waiting), None)
            if idle is None:
                return None
            self._streams.remove(idle)
            idle.close()
        log.debug(
            "%s: a GET from %d (streams at %s)",
            self._key,
            offset,
            [(s.start, s.end) for s in self._streams],
        )
        stream = _Stream(self._driver, self._key, self._etag, offset, self.size)
        self._streams.append(stream)
        return stream

    def _get_range(self, offset: int, length: int) -> bytes:
        driver = self._driver

        def get() -> bytes:
            answer = driver.client.get_object(
                Bucket=driver.bucket,
                Key=self._key,
                Range=f"bytes={offset}-{offset + length - 1}",
                IfMatch=self._etag,
            )
            data: bytes = answer["Body"].read()
            if len(data) != length:
                raise ResponseStreamingError(error=f"{len(data)} of {length} bytes")
            return data

        return driver.call(f"GET {self._key} [{offset}, +{length})", get)

    async def aclose(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []


class _Writer(FileWriter):
    """The file at key as an S3 multipart upload: sealed parts, then a tail held here (under
    chunksize) that goes up as part len(parts)+1 on sync and close, and again, whole, once
    it has grown: S3 replaces a part sent twice. A tail of MIN_PART or more is sealed by a
    sync. Writes append, whatever the size (SPEC §10: one rule, where the tail alone could
    be rewritten); truncate cuts the tail, or to 0 aborts the upload and starts a new one.
    A write whose part S3 refused is undone: the file ends where it began."""

    def __init__(self, driver: S3Driver, key: str) -> None:
        self._driver = driver
        self._key = key
        self.lock: _Lock | None = None
        self._upload_id = ""
        self._parts: list[_Part] = []
        self._base = 0
        self._tail = bytearray()
        self._tail_part: _Part | None = None  # the part last sent for the tail
        self._dirty = False  # the tail differs from that part
        self._lock = threading.Lock()  # the disk worker, the sync thread and the loop
        self._closed = False
        self._short = False  # the last part is under MIN_PART: see _writable
        self.size = 0
        self.mtime_ns = time.time_ns()  # of the last change, or the upload's last part

    def open_blocking(self) -> None:
        """Resume the upload at the key as 2.8 does; a last part under MIN_PART cannot be
        followed by more, so the upload is completed and restarted from its object before
        the first change (`_writable`). With no upload, start one (holding the object at the
        key, if one is there)."""
        driver, key = self._driver, self._key
        pending = driver._pending(key)
        if pending is None:
            self._go_on(driver.restart(key))
            return
        self._go_on((pending, b""))
        self.mtime_ns = pending.mtime_ns or self.mtime_ns
        # Not completed here: a finish changes nothing, and its move completes the upload
        # anyway; another node's writes would need the lock, which this writer holds.
        self._short = bool(pending.parts) and pending.parts[-1].size < MIN_PART

    def _writable(self) -> None:
        """Before a change: an upload whose last part is under MIN_PART is completed and
        restarted from its object, as no part may follow that one."""
        if self._short:
            self._check_lock()
            self._driver._complete(self._key, self._upload_id, self._parts)
            self._go_on(self._driver.restart(self._key))

    def _go_on(self, upload: tuple[_Pending, bytes]) -> None:
        """Write on in this upload; a tail returned by restart (sent as part 1) is kept
        here, to grow."""
        pending, tail = upload
        self._short = False
        self._upload_id = pending.upload_id
        self._parts = [] if tail else pending.parts
        self._tail_part = pending.parts[0] if tail else None
        self._base = sum(p.size for p in self._parts)
        self._tail, self._dirty = bytearray(tail), False
        self.size = self._base + len(tail)

    async def write_at(self, offset: int, data: bytes) -> None:
        await trio.to_thread.run_sync(self.write_at_blocking, offset, data)

    def check_write(self, offset: int) -> None:
        if offset > self.size:
            raise InvalidOffset(f"write at {offset} would leave a gap after {self.size}")
        if offset < self.size:
            raise InvalidOffset(
                f"write at {offset}, below the end ({self.size}): an S3 upload's writes go in order"
            )

    def check_truncate(self, size: int) -> None:
        # A short last part is completed and restarted first (`_writable`): read back into
        # the tail under MIN_PART, else copied into sealed parts.
        base = 0 if self._short and self.size < MIN_PART else self._base
        if size != 0 and not base <= size <= self.size:
            raise InvalidOffset(
                f"cannot truncate to {size}: S3 can cut only the unsealed tail "
                f"(from {base}) or restart the upload (0)"
            )

    def write_at_blocking(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.check_write(offset)
            self._writable()
            self._tail += data
            self._dirty = True
            self.size = offset + len(data)
            self.mtime_ns = time.time_ns()
            try:
                while len(self._tail) >= self._driver.chunksize:
                    self._seal(self._driver.chunksize)
            except BaseException:
                # Not written: the file ends where this write began (what was sealed stays),
                # so no later write seals these bytes once S3 answers again.
                end = max(offset, self._base)
                del self._tail[end - self._base :]
                self.size = end
                raise

    def _seal(self, count: int) -> None:
        """Send the first count bytes of the tail as the next part, for good."""
        self._check_lock()
        part = self._driver.upload_part(
            self._key, self._upload_id, len(self._parts) + 1, bytes(self._tail[:count])
        )
        self._parts.append(part)
        del self._tail[:count]
        self._base += count
        self._tail_part = None
        self._dirty = bool(self._tail)

    def sync_blocking(self) -> None:
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        if not self._dirty:
            return
        if len(self._tail) >= MIN_PART:
            self._seal(len(self._tail))
            return
        # The tail (maybe empty, after a truncate) replaces the part last sent for it.
        self._check_lock()
        self._tail_part = self._driver.upload_part(
            self._key, self._upload_id, len(self._parts) + 1, bytes(self._tail)
        )
        self._dirty = False

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    async def truncate(self, size: int) -> None:
        await trio.to_thread.run_sync(self._truncate_blocking, size)

    def _truncate_blocking(self, size: int) -> None:
        with self._lock:
            if size == self.size:
                return
            self.check_truncate(size)
            if size == 0:
                driver = self._driver
                driver.abort(self._key, self._upload_id)
                self._go_on((_Pending(driver._create(self._key), [], time.time_ns()), b""))
            else:
                self._writable()
                del self._tail[size - self._base :]
                self._dirty = True
            self.size = size
            self.mtime_ns = time.time_ns()

    def materialize_blocking(self) -> None:
        """Complete the upload into its object, so it can be read; go on in a new one."""
        with self._lock:
            self._sync()
            driver = self._driver
            if self.size == 0:
                driver.call(
                    f"PUT {self._key}",
                    lambda: driver.client.put_object(Bucket=driver.bucket, Key=self._key, Body=b""),
                )
                return
            sent = self._parts + ([self._tail_part] if self._tail_part else [])
            driver._complete(self._key, self._upload_id, sent)
            self._go_on(driver.restart(self._key))

    async def aclose(self) -> None:
        """Send the tail (2.8's Close: the upload stays in progress, for whoever resumes)."""
        if self._closed:
            return
        self._closed = True
        try:
            await trio.to_thread.run_sync(self.sync_blocking)
        finally:
            await trio.to_thread.run_sync(self._driver._release, self._key)


def _server_now(answer: Any) -> float:
    """The server's time of an answer (its Date header, in seconds since the epoch); none
    readable counts as the epoch, so that no lock looks expired by it."""
    try:
        when = email.utils.parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return when.replace(tzinfo=when.tzinfo or UTC).timestamp()


def _lock_head(driver: S3Driver, key: str) -> Any:
    """The HEAD answer of the lock object at key (its Date is the server's now); None when
    there is none."""
    try:
        return driver.call(
            f"HEAD {key}",
            lambda: driver.client.head_object(Bucket=driver.bucket, Key=key),
            path=key,
        )
    except PathNotFound:
        return None


def _lock_age(head: Any) -> float:
    """Seconds since the lock object of this HEAD answer was last written, by the server's
    clock. Both times count whole seconds: one is taken off, against whoever takes it over."""
    modified = head.get("LastModified")
    if modified is None:  # unreadable (botocore leaves it out): live, as an unreadable Date
        return 0.0
    return float(_server_now(head) - modified.timestamp() - 1)


def _dead_here(holder: dict[str, Any]) -> bool:
    """Whether a lock's holder is a process of this host that is gone (a daemon killed here):
    its lock need not wait for its expiry, as a flock would not."""
    host, _, pid = str(holder.get("owner", "")).rpartition(":")
    if host != socket.gethostname() or not (pid.isascii() and pid.isdigit() and len(pid) < 10):
        return False  # no pid of this host (whoever writes the bucket wrote it): live
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


class _Lock:
    """One writer per file across daemons: the object `<key>.regfs-lock`, created only if
    absent (If-None-Match: *), renewed by a thread every LOCK_RENEW seconds only if still
    ours (If-Match its ETag; a failed renewal is tried again after the backoff, not a whole
    period later), deleted only if ours. A lock not renewed for LOCK_TTL by the
    server's clock (its Last-Modified against the Date of the answer that shows it) is
    expired, and taken over with If-Match, so a killed daemon holds nothing for long. Its
    holder writes nothing once LOCK_SAFE has passed since it sent its last renewal: before
    anyone else may take it over. docs/scale-out.md says why this is safe, and its limits."""

    def __init__(self, driver: S3Driver, key: str, path: str) -> None:
        self._driver = driver
        self._key = key
        self._path = path
        self._etag = ""
        self._sent = 0.0  # time.monotonic() when the last successful write of it was sent
        self._lost = False
        self._renewing = threading.Lock()  # one renewal at a time: the thread's, check's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # the renewals, joined by release
        # The token tells this lock's own write from another's after a lost answer: a
        # create or renewal that S3 applied but whose 200 never came back retries into a 412.
        self._token = secrets.token_hex(8)
        self._body = json.dumps(
            {
                "owner": f"{socket.gethostname()}:{os.getpid()}",
                "token": self._token,
                "ttl": LOCK_TTL,
            }
        ).encode()

    def acquire(self) -> None:
        """Take the lock (waiting up to LOCK_WAIT for a holder to let go), or Busy."""
        deadline = time.monotonic() + LOCK_WAIT
        delay = 0.05
        while not self._try():
            if time.monotonic() >= deadline:
                raise Busy(f"{self._path} is being written by another writer (lock held)")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self._thread = threading.Thread(
            target=self._renew, name=f"regfs-s3-lock:{self._key}", daemon=True
        )
        self._thread.start()

    def _put(self, if_match: str | None) -> bool:
        """Write the lock object if it is absent (if_match None) or has ETag if_match;
        False on 412, and where if_match finds no object (NoSuchKey: let go or removed
        meanwhile; a renewal's lock is then lost, a takeover tries a create again)."""
        driver = self._driver
        sent = time.monotonic()
        put = functools.partial(
            driver.client.put_object, Bucket=driver.bucket, Key=self._key, Body=self._body
        )
        put = (
            functools.partial(put, IfNoneMatch="*")
            if if_match is None
            else functools.partial(put, IfMatch=if_match)
        )
        try:
            self._etag = driver.call(f"LOCK {self._key}", put, path=self._key)["ETag"]
        except (_PreconditionFailed, PathNotFound):
            return False
        self._sent = sent
        return True

    def _try(self) -> bool:
        if self._put(None):
            return True
        head = _lock_head(self._driver, self._key)
        if head is None:
            return False  # let go meanwhile: try again
        etag = head.get("ETag")
        if etag is None:
            return False  # no version to take it over by (If-Match): live
        age = _lock_age(head)
        holder = self._holder(etag)
        if age >= LOCK_TTL:
            log.warning("%s: taking over a writer lock not renewed for %.0f s", self._path, age)
        elif holder.get("token") == self._token:
            pass  # made by us, its answer lost: written again below, from now
        elif _dead_here(holder):
            log.warning("%s: taking over the writer lock of a dead process here", self._path)
        else:
            return False
        return self._put(etag)

    def _holder(self, etag: str | None = None) -> dict[str, Any]:
        """The lock's body (as of etag, when given), with "etag" added; {} when it is gone,
        changed, or not what a lock holds."""
        driver = self._driver
        get = functools.partial(driver.client.get_object, Bucket=driver.bucket, Key=self._key)
        if etag is not None:
            get = functools.partial(get, IfMatch=etag)
        try:
            answer = driver.call(f"GET {self._key}", get, path=self._key)
            body = jsontext.loads(answer["Body"].read(4096))
        except (PathNotFound, _PreconditionFailed, ValueError):
            return {}
        return {**body, "etag": answer["ETag"]} if isinstance(body, dict) else {}

    def _renew(self) -> None:
        """Rewrite the lock LOCK_RENEW after its last write. A failed renewal (S3 throttling
        or unreachable, after the driver's own retries) is tried again after the backoff,
        for as long as the writer is open: past the safe window writes fail (`check`), and
        a renewal that goes through after it (If-Match: nobody took the lock over meanwhile)
        lets them go on. Only a write S3 accepted moves the window (_put sets _sent)."""
        failures = 0
        while True:
            now = time.monotonic()
            if failures:
                wait = min(pause(failures, None), LOCK_RENEW)
            else:
                wait = self._sent + LOCK_RENEW - now
            if self._stop.wait(max(0.0, wait)):
                return
            try:
                if not self._renew_once():
                    return
            except (RemoteUnavailable, AccessDenied) as exc:
                failures += 1
                log.warning(
                    "%s: writer lock not renewed (%s), try %d", self._path, exc, failures + 1
                )
                continue
            failures = 0

    def _renew_once(self) -> bool:
        """Rewrite the lock if it is still ours; False (and lost for good) where another
        writer took it over, or it is gone (taken over and let go, or removed by an rm).
        RemoteUnavailable or AccessDenied where S3 failed."""
        with self._renewing:
            if self._lost:
                return False
            if self._put(self._etag) or self._still_ours():
                return True
            log.error("%s: writer lock taken over elsewhere: no more writes", self._path)
            self._lost = True
            return False

    def _still_ours(self) -> bool:
        """After a renewal's 412: whether the lock holds our token (our last renewal was
        applied, its answer lost), and if so, rewrite it from now."""
        holder = self._holder()
        return holder.get("token") == self._token and self._put(holder["etag"])

    def check(self) -> None:
        """Refuse a write that could clash with a writer taking the lock over. Past the safe
        window since the last renewal, renew first (If-Match: only if nobody took it over):
        Busy where another writer did, RemoteUnavailable (EIO, SPEC §10) where S3 still
        fails (throttling, unreachable); writes go on once a renewal goes through."""
        unrenewed = time.monotonic() - self._sent
        if not self._lost and unrenewed > LOCK_SAFE:
            try:
                self._renew_once()
            except (RemoteUnavailable, AccessDenied) as exc:
                log.error("%s: writer lock not renewed in time: write refused", self._path)
                raise RemoteUnavailable(
                    f"{self._path}: writer lock not renewed for {unrenewed:.0f} s (S3 "
                    f"unreachable or throttling: {exc}); writes go on once it is"
                ) from exc
        if self._lost:
            raise Busy(f"{self._path}: writer lock taken over by another writer; reopen the file")

    def release(self) -> None:
        """Stop the renewals, waiting for one in flight (a renewal after the delete would
        leave the lock behind for LOCK_TTL), then delete the lock if still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost:
            return
        driver = self._driver
        with contextlib.suppress(_PreconditionFailed, PathNotFound):
            driver.call(
                f"UNLOCK {self._key}",
                lambda: driver.client.delete_object(
                    Bucket=driver.bucket, Key=self._key, IfMatch=self._etag
                ),
                path=self._key,
            )


def _unseen(seen: set[Any], marker: Any, what: str, listed: int, cap: int) -> None:
    """Keep the marker of a listing's next page; RemoteUnavailable (logged) if it is one
    read before, or if the `listed` entries so far reach cap (LISTING_NAMES_MAX for a
    directory, LISTING_KEYS_MAX for keys under a prefix): an endpoint that names one page
    again would be asked it for ever, and one that names fresh pages for ever would grow
    what the caller collects (the remote registry's listings stop so too:
    storage/remote/untrusted.py)."""
    if marker in seen:
        log.error("S3 %s: the next page loops back to one read before", what)
        raise RemoteUnavailable(f"S3 {what}: the next page loops back")
    if listed >= cap:
        log.error("S3 %s: the listing goes on past %d entries; not read further", what, listed)
        raise RemoteUnavailable(f"S3 {what}: the listing goes on past {listed} entries")
    seen.add(marker)
