"""Every location in the registry's storage tree, and the one function that maps it to a path.

    /docker/registry/v2/
      blobs/sha256/<hex[:2]>/<hex>/data                          blob bytes
      repositories/<name>/
        _layers/sha256/<hex>/link                                blob linked into <name>
        _layers/.regfs-keep                                      marks an empty repository
        _manifests/revisions/sha256/<hex>/link                   manifest revision of <name>
        _manifests/tags/<tag>/current/link                       digest the tag points at
        _manifests/tags/<tag>/index/sha256/<hex>/link            every digest the tag had
        _uploads/<uuid>/data                                     upload bytes so far
        _uploads/<uuid>/startedat                                RFC 3339 start time
        _uploads/<uuid>/hashstates/sha256/<offset>               Go sha256 state at <offset>
        _uploads/<uuid>/regfs-label                              the name a client gave it

The registry ignores extra files in an upload directory; `regfs-label` is regfs's own.

<name> keeps its slashes (`library/alpine` is two directories). A link file holds
`sha256:<hex>` with no newline. Names, tags, digests and uuids are validated before they
get here, so no location can name a path outside this tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from .digests import Digest

ROOT = "/docker/registry/v2"
REPOSITORIES = f"{ROOT}/repositories"


@dataclass(frozen=True)
class BlobsDir:
    """The blob store of one algorithm; lists two-hex-digit fan-out directories."""

    algorithm: str = "sha256"


@dataclass(frozen=True)
class BlobDir:
    digest: Digest


@dataclass(frozen=True)
class BlobData:
    digest: Digest


@dataclass(frozen=True)
class RepositoryDir:
    """A repository, or with name "" the root of all repositories."""

    name: str


@dataclass(frozen=True)
class LayersDir:
    name: str


@dataclass(frozen=True)
class EmptyMarker:
    """Makes an empty repository a repository: the registry's catalog wants `_layers`."""

    name: str


@dataclass(frozen=True)
class LayerLink:
    name: str
    digest: Digest


@dataclass(frozen=True)
class RevisionsDir:
    name: str


@dataclass(frozen=True)
class RevisionLink:
    name: str
    digest: Digest


@dataclass(frozen=True)
class TagsDir:
    name: str


@dataclass(frozen=True)
class TagDir:
    name: str
    tag: str


@dataclass(frozen=True)
class TagCurrentLink:
    name: str
    tag: str


@dataclass(frozen=True)
class TagIndexDir:
    name: str
    tag: str


@dataclass(frozen=True)
class TagIndexLink:
    name: str
    tag: str
    digest: Digest


@dataclass(frozen=True)
class UploadsDir:
    name: str


@dataclass(frozen=True)
class UploadDir:
    name: str
    uuid: str


@dataclass(frozen=True)
class UploadData:
    name: str
    uuid: str


@dataclass(frozen=True)
class UploadStartedAt:
    name: str
    uuid: str


@dataclass(frozen=True)
class UploadLabel:
    name: str
    uuid: str


@dataclass(frozen=True)
class HashStatesDir:
    name: str
    uuid: str
    algorithm: str = "sha256"


@dataclass(frozen=True)
class HashState:
    name: str
    uuid: str
    offset: int
    algorithm: str = "sha256"


Location = (
    BlobsDir
    | BlobDir
    | BlobData
    | RepositoryDir
    | LayersDir
    | EmptyMarker
    | LayerLink
    | RevisionsDir
    | RevisionLink
    | TagsDir
    | TagDir
    | TagCurrentLink
    | TagIndexDir
    | TagIndexLink
    | UploadsDir
    | UploadDir
    | UploadData
    | UploadStartedAt
    | UploadLabel
    | HashStatesDir
    | HashState
)


def path_for(loc: Location) -> str:
    match loc:
        case BlobsDir(algorithm):
            return f"{ROOT}/blobs/{algorithm}"
        case BlobDir(d):
            return f"{ROOT}/blobs/{d.algorithm}/{d.hex[:2]}/{d.hex}"
        case BlobData(d):
            return f"{path_for(BlobDir(d))}/data"
        case RepositoryDir(name):
            return f"{REPOSITORIES}/{name}" if name else REPOSITORIES
        case LayersDir(name):
            return f"{REPOSITORIES}/{name}/_layers/sha256"
        case EmptyMarker(name):
            return f"{REPOSITORIES}/{name}/_layers/.regfs-keep"
        case LayerLink(name, d):
            return f"{REPOSITORIES}/{name}/_layers/{d.algorithm}/{d.hex}/link"
        case RevisionsDir(name):
            return f"{REPOSITORIES}/{name}/_manifests/revisions/sha256"
        case RevisionLink(name, d):
            return f"{REPOSITORIES}/{name}/_manifests/revisions/{d.algorithm}/{d.hex}/link"
        case TagsDir(name):
            return f"{REPOSITORIES}/{name}/_manifests/tags"
        case TagDir(name, tag):
            return f"{REPOSITORIES}/{name}/_manifests/tags/{tag}"
        case TagCurrentLink(name, tag):
            return f"{path_for(TagDir(name, tag))}/current/link"
        case TagIndexDir(name, tag):
            return f"{path_for(TagDir(name, tag))}/index/sha256"
        case TagIndexLink(name, tag, d):
            return f"{path_for(TagDir(name, tag))}/index/{d.algorithm}/{d.hex}/link"
        case UploadsDir(name):
            return f"{REPOSITORIES}/{name}/_uploads"
        case UploadDir(name, uuid):
            return f"{REPOSITORIES}/{name}/_uploads/{uuid}"
        case UploadData(name, uuid):
            return f"{path_for(UploadDir(name, uuid))}/data"
        case UploadStartedAt(name, uuid):
            return f"{path_for(UploadDir(name, uuid))}/startedat"
        case UploadLabel(name, uuid):
            return f"{path_for(UploadDir(name, uuid))}/regfs-label"
        case HashStatesDir(name, uuid, algorithm):
            return f"{path_for(UploadDir(name, uuid))}/hashstates/{algorithm}"
        case HashState(name, uuid, offset, algorithm):
            return f"{path_for(UploadDir(name, uuid))}/hashstates/{algorithm}/{offset}"
    raise TypeError(f"not a storage location: {loc!r}")
