"""The contract between the mount (`regfs/`) and a registry source, and the values they pass.

A source is anything that serves a registry's catalog, tags, manifests, layers and uploads:
a storage root through a driver (`storage.registry.Registry`) or a registry over HTTP
(`storage.remote.registry.RemoteRegistry`), and whatever comes next. `regfs/` reaches a
source only through these Protocols (and `regfs/sources.py`, which picks one), so a new
source needs no change there; the checks at the bottom make the type checker fail the
moment an implementation drifts from the contract, as distribution's
`var _ distribution.BlobStore = &linkedBlobStore{}` does.

A Protocol costs nothing at run time: calls go straight to the implementation.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

from .digests import Digest

# What a read answers: bytes, or a view into a buffer the reader already holds, so that FUSE
# replies from it without a copy (a remote layer's read-ahead window).
Buffer: TypeAlias = bytes | memoryview

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobInfo:
    """A blob (layer, config or manifest) as a source knows it: digest, size, when stored."""

    digest: Digest
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class UploadInfo:
    """An upload in progress: its id, when it started, the bytes received so far, and when
    they last grew (None where the source cannot tell: then its start)."""

    uuid: str
    started_at: datetime
    size: int
    written_ns: int | None = None

    @property
    def started_ns(self) -> int:
        return epoch_ns(self.started_at)

    @property
    def mtime_ns(self) -> int:
        """What stat shows: the last write, as on any filesystem, never before the start."""
        started = self.started_ns
        return started if self.written_ns is None else max(started, self.written_ns)


def epoch_ns(when: datetime) -> int:
    """when in nanoseconds since the epoch, exactly (a float timestamp is not)."""
    return (when - EPOCH) // timedelta(microseconds=1) * 1000


@dataclass(frozen=True)
class Manifest:
    """A manifest's bytes, their digest, and the media type they declare (or are sniffed as)."""

    digest: Digest
    media_type: str
    data: bytes


class EmptyReader:
    """The reader of nothing: an upload whose data a source cannot (or need not) read back."""

    async def read_at(self, offset: int, size: int) -> bytes:
        return b""

    async def aclose(self) -> None:
        pass


# -- the contract ------------------------------------------------------------------------


class BlobReader(Protocol):
    """Random access to one blob's bytes: every read names its offset, so seeking is free."""

    async def read_at(self, offset: int, size: int) -> Buffer:
        """Up to `size` bytes at `offset`; fewer only at the end."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LocalBlobReader(BlobReader, Protocol):
    """A BlobReader that can hand out the blob's local file, so that a tool working on a
    whole blob (the gzip index pass of `storage/rootfs`) reads it in place, without a copy.
    Optional: a reader without `fileno` (HTTP) is taken as having no local file."""

    def fileno(self) -> int | None:
        """A read descriptor of the blob's file, owned by the reader (open until `aclose`;
        use it with `pread` or dup it, never close it), or None where the blob is no local
        file (S3, memory)."""
        ...


def local_fileno(reader: BlobReader) -> int | None:
    """The blob's local file descriptor, when `reader` has one (`LocalBlobReader`)."""
    return reader.fileno() if isinstance(reader, LocalBlobReader) else None


@runtime_checkable
class StreamingBlobReader(BlobReader, Protocol):
    """A BlobReader that reads a blob whole and in order better as one stream than as reads
    at offsets: over HTTP one GET to the end, not a range GET per window. Optional: for
    other readers `read_at` is as good (a local `pread`; S3's reader streams by itself)."""

    async def read_in_order(self, offset: int, size: int) -> Buffer:
        """As `read_at`, for a caller that goes on reading from there to the blob's end in
        order (the next call starts where this one ended) and checks the digest itself."""
        ...


async def read_in_order(reader: BlobReader, offset: int, size: int) -> Buffer:
    """`size` bytes at `offset` of a blob read whole in order (`StreamingBlobReader`)."""
    if isinstance(reader, StreamingBlobReader):
        return await reader.read_in_order(offset, size)
    return await reader.read_at(offset, size)


class Upload(Protocol):
    """One upload being written by its one writer; finishing turns it into a layer."""

    @property
    def uuid(self) -> str: ...

    @property
    def name(self) -> str:
        """The repository it belongs to."""
        ...

    @property
    def started_at(self) -> datetime: ...

    @property
    def size(self) -> int:
        """Bytes written so far (counting those still on their way to storage)."""
        ...

    async def write_at(self, offset: int, data: bytes) -> None:
        """Write at offset ≤ size; InvalidOffset for a gap (or what the source cannot do)."""
        ...

    async def truncate(self, size: int) -> None:
        """Cut the data to size (0 restarts the upload); InvalidOffset for what cannot be."""
        ...

    async def digest(self, expected: Digest | None = None) -> Digest | None:
        """The digest of the data so far; None when the source cannot hash it here (a
        remote upload resumed without its hash state)."""
        ...

    async def settle(self) -> None:
        """Every write so far can be read back (`read_upload`) once this returns, not
        necessarily synced; raises a failed write's error."""
        ...

    async def flush(self) -> None:
        """Every write so far is in storage once this returns; raises a failed write's error."""
        ...

    async def close(self) -> None:
        """Release the writer; the upload stays, to be resumed."""
        ...

    async def finish(self, expected: Digest, size: int | None = None) -> BlobInfo:
        """Verify and commit as layer `expected`; DigestMismatch leaves the upload as it was."""
        ...

    async def cancel(self) -> None: ...


class Layers(Protocol):
    """A repository's layers (blobs linked into it) and its uploads."""

    async def exists(self, digest: Digest) -> bool: ...

    async def stat(self, digest: Digest) -> BlobInfo:
        """UnknownLayer when not linked here (or its blob is gone)."""
        ...

    async def stats(self, digests: Sequence[Digest]) -> builtins.list[BlobInfo | None]:
        """`stat` of many (a listing's), as cheaply as the source can: None for each it
        leaves to `stat` (absent, damaged, or no cheaper way than one by one)."""
        ...

    async def fetch(self, digest: Digest, size: int | None = None) -> BlobReader:
        """A reader of the layer; UnknownLayer when it is not there. `size`: the layer's
        size as the descriptor of a manifest read by its digest gives it; a source that
        would have to ask the registry for it (a HEAD) takes it instead, and a missing blob
        is then found at its first read; a source that knows it cheaply may ignore it."""
        ...

    async def unlink(self, digest: Digest) -> None: ...

    async def relink(self, digest: Digest) -> bool:
        """Link again a blob this repository unlinked a moment ago, if the source still holds
        it and can (False where it cannot: a registry's blob DELETE is final)."""
        ...

    async def upload(self, label: str | None = None) -> Upload:
        """Start an upload; `label` is the client's name for it, kept beside it."""
        ...

    async def resume(self, uuid: str) -> Upload:
        """Open an upload to go on writing it; UnknownUpload when there is none."""
        ...

    async def uploads(self) -> builtins.list[str]:
        """Uuids of the uploads in progress."""
        ...

    async def label(self, uuid: str) -> str | None: ...

    async def set_label(self, uuid: str, label: str) -> None: ...

    async def upload_info(self, uuid: str) -> UploadInfo: ...

    async def read_upload(self, uuid: str) -> BlobReader:
        """The bytes of an upload received so far, as far as the source can read them back."""
        ...

    async def list(self) -> builtins.list[Digest]: ...


class Manifests(Protocol):
    async def put(self, data: bytes, content_type: str | None = None) -> Digest:
        """Check and store (untagged); InvalidManifest names the failed check, nothing stored."""
        ...

    async def get(self, digest: Digest) -> Manifest:
        """UnknownManifest when it is not a revision of this repository."""
        ...

    async def stat(self, digest: Digest) -> BlobInfo: ...

    async def stats(self, digests: Sequence[Digest]) -> builtins.list[BlobInfo | None]:
        """As `Layers.stats`."""
        ...

    async def exists(self, digest: Digest) -> bool: ...

    async def delete(self, digest: Digest) -> builtins.list[str]:
        """Delete the manifest and the tags that point at it; returns those tags (as far as
        the source can say)."""
        ...

    async def list(self) -> builtins.list[Digest]: ...


class Tags(Protocol):
    async def get(self, tag: str) -> Digest:
        """The manifest the tag points at; UnknownTag when there is no such tag."""
        ...

    async def mtime_ns(self, tag: str) -> int:
        """When the tag last moved (as far as the source can say)."""
        ...

    async def read_many(
        self, tags: Sequence[str]
    ) -> builtins.list[tuple[Digest, int] | None] | None:
        """`get` and `mtime_ns` of many tags (a listing's, read ahead of the lookups `ls -l`
        sends), where the source reads them without a request each; None where it would not
        (S3, HTTP). None for each tag it leaves to `get`."""
        ...

    async def put(self, tag: str, digest: Digest) -> None:
        """Point the tag at a stored manifest, in one step (a reader sees old or new)."""
        ...

    async def delete(self, tag: str) -> None: ...

    async def move(self, tag: str, to: str) -> Digest:
        """Point `to` at the manifest `tag` names, and delete `tag` (a retag, `mv`): in the
        order that leaves no tag lost if the source fails between its two steps, and
        nothing changed if it refuses the delete. Returns the manifest's digest."""
        ...

    async def list(self) -> builtins.list[str]: ...


class Repository(Protocol):
    """A view of one repository; cheap to make, holds no state of its own."""

    @property
    def name(self) -> str: ...

    @property
    def tags(self) -> Tags: ...

    @property
    def manifests(self) -> Manifests: ...

    @property
    def layers(self) -> Layers: ...


class Catalog(Protocol):
    """The repositories and the namespaces above them."""

    async def children(self, prefix: str = "") -> list[str]:
        """Name components directly below prefix (namespaces or repositories)."""
        ...

    async def is_repository(self, name: str, with_uploads: bool = False) -> bool:
        """Whether name is a repository; with_uploads, also one holding only uploads."""
        ...

    async def exists(self, prefix: str) -> bool:
        """Whether prefix names a repository or a namespace holding something."""
        ...

    async def mtime_ns(self, prefix: str) -> int | None:
        """When the directory of prefix last changed; None when the source cannot say."""
        ...

    async def repositories(self, n: int | None = None, last: str = "") -> list[str]:
        """Every repository name in lexical order after `last`, at most n."""
        ...


class RegistrySource(Protocol):
    """A registry: its catalog, its repositories, and what the mount asks of it as a whole."""

    @property
    def catalog(self) -> Catalog: ...

    def repository(self, name: str) -> Repository:
        """A repository view; InvalidName for a name the registry would refuse."""
        ...

    async def create_repository(self, name: str) -> Repository:
        """An empty repository (mkdir), listed by the catalog from then on."""
        ...

    async def remove_repository(self, name: str) -> None:
        """rmdir: NotEmpty for a repository holding anything, UnknownRepository for none."""
        ...

    def statvfs(self) -> os.statvfs_result | None:
        """The space of the storage behind the source; None when it has no such thing."""
        ...

    def forget(self) -> None:
        """Drop what the source keeps of what moves beside the mount (the catalog, tag
        listings, blob stats), so that the next ask goes to the registry (SIGHUP)."""
        ...

    async def aclose(self) -> None:
        """Release what the source holds (connections), at unmount."""
        ...


# -- conformance: the checker fails here when an implementation drifts -------------------

if TYPE_CHECKING:
    from . import catalog, layers, manifests, registry, tags, uploads
    from .remote import reader as remote_reader
    from .remote import registry as remote
    from .remote import uploads as remote_uploads

    # Each implementation, by the Protocol it must satisfy; a new source adds its classes
    # here. (A driver's FileReader is held to BlobReader where read_upload returns one.)
    _sources: list[type[RegistrySource]] = [registry.Registry, remote.RemoteRegistry]
    _repositories: list[type[Repository]] = [registry.Repository, remote.RemoteRepository]
    _catalogs: list[type[Catalog]] = [catalog.Catalog, remote.RemoteCatalog]
    _tags: list[type[Tags]] = [tags.TagService, remote.RemoteTags]
    _manifests: list[type[Manifests]] = [manifests.ManifestService, remote.RemoteManifests]
    _layers: list[type[Layers]] = [layers.LayerService, remote.RemoteLayers]
    _uploads: list[type[Upload]] = [uploads.LayerUpload, remote_uploads.RemoteUpload]
    _local_readers: list[type[LocalBlobReader]] = [layers.LayerReader]
    _streaming_readers: list[type[StreamingBlobReader]] = [remote_reader.RemoteLayerReader]
    _readers: list[type[BlobReader]] = [
        layers.LayerReader,
        remote_reader.RemoteLayerReader,
        EmptyReader,
    ]
