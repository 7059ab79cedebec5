"""What the mount shows: nodes of the tree, and how each maps to the registry storage.

    <component>/...          namespaces, one directory per name component
    <repository>/tags/<tag>  the manifest a tag points at (moves: cached for tag_ttl)
    .../manifests/<digest>   a manifest by digest (immutable: cached for good)
    .../layers/<digest>      a linked blob (immutable)
    .../uploads/<uuid>       an upload in progress (its size is the bytes received)

No FUSE here: the operations module turns these into inodes and errnos.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from storage.digests import Digest
from storage.drivers import FileReader, PathNotFound
from storage.errors import InvalidName, UnknownManifest
from storage.layers import LayerReader
from storage.manifests import sniff_media_type
from storage.names import is_component, validate_tag
from storage.paths import RepositoryDir, TagCurrentLink, UploadData, path_for
from storage.registry import Registry, Repository

from .cache import TtlCache

log = logging.getLogger(__name__)

SECTIONS = ("layers", "manifests", "tags", "uploads")


class NotFound(LookupError):
    """A name that does not exist in the tree (ENOENT)."""


@dataclass(frozen=True)
class DirNode:
    """The root (path "") or a namespace/repository directory."""

    path: str


@dataclass(frozen=True)
class SectionNode:
    repo: str
    section: str


@dataclass(frozen=True)
class TagNode:
    repo: str
    tag: str


@dataclass(frozen=True)
class ManifestNode:
    repo: str
    digest: Digest


@dataclass(frozen=True)
class LayerNode:
    repo: str
    digest: Digest


@dataclass(frozen=True)
class UploadNode:
    repo: str
    uuid: str


Node = DirNode | SectionNode | TagNode | ManifestNode | LayerNode | UploadNode
ROOT = DirNode("")


@dataclass(frozen=True)
class Attr:
    is_dir: bool
    size: int
    mtime: float
    immutable: bool = False


class BytesReader:
    """A small file held whole (a manifest), with the read interface of a layer reader."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_at(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    async def aclose(self) -> None:
        pass


Reader = LayerReader | BytesReader | FileReader


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


class Tree:
    def __init__(self, registry: Registry, tag_ttl: float) -> None:
        self.registry = registry
        self.started = time.time()
        self._tags: TtlCache[TagNode, Digest] = TtlCache(tag_ttl)
        self._listings: TtlCache[Node, list[tuple[str, Node]]] = TtlCache(tag_ttl)
        self._immutable: TtlCache[Node, Attr] = TtlCache(None)
        self._shadow_logged: set[str] = set()

    def forget_moving(self) -> None:
        """Drop every cached tag and listing (SIGHUP)."""
        self._tags.clear()
        self._listings.clear()

    def _repo(self, name: str) -> Repository:
        return self.registry.repository(name)

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(self, parent: Node, name: str) -> Node:
        match parent:
            case DirNode(path):
                if name in SECTIONS and path and await self.registry.catalog.is_repository(path):
                    return SectionNode(path, name)
                child = _join(path, name)
                if is_component(name) and await self.registry.catalog.exists(child):
                    return DirNode(child)
            case SectionNode(repo, "tags"):
                node = TagNode(repo, name)
                await self._tag_target(node)
                return node
            case SectionNode(repo, "manifests"):
                node = ManifestNode(repo, _parse_digest(name))
                await self.attr(node)
                return node
            case SectionNode(repo, "layers"):
                node = LayerNode(repo, _parse_digest(name))
                await self.attr(node)
                return node
            case SectionNode(repo, "uploads"):
                node = UploadNode(repo, name)
                await self.attr(node)
                return node
        raise NotFound(name)

    async def children(self, node: Node) -> list[tuple[str, Node]]:
        cached = self._listings.get(node)
        if cached is None:
            cached = await self._list(node)
            self._listings.put(node, cached)
        return cached

    async def _list(self, node: Node) -> list[tuple[str, Node]]:
        match node:
            case DirNode(path):
                names = await self.registry.catalog.children(path)
                if not path or not await self.registry.catalog.is_repository(path):
                    return [(n, DirNode(_join(path, n))) for n in names]
                shadowed = sorted(set(names) & set(SECTIONS))
                if shadowed and path not in self._shadow_logged:
                    self._shadow_logged.add(path)
                    log.warning(
                        "list: in repository %s, nested %s hidden by reserved names",
                        path,
                        ", ".join(_join(path, n) for n in shadowed),
                    )
                sections = [(s, SectionNode(path, s)) for s in SECTIONS]
                return sections + [(n, DirNode(_join(path, n))) for n in names if n not in SECTIONS]
            case SectionNode(repo, "tags"):
                return [(t, TagNode(repo, t)) for t in await self._repo(repo).tags.list()]
            case SectionNode(repo, "manifests"):
                digests = await self._repo(repo).manifests.list()
                return [(str(d), ManifestNode(repo, d)) for d in digests]
            case SectionNode(repo, "layers"):
                digests = await self._repo(repo).layers.list()
                return [(str(d), LayerNode(repo, d)) for d in digests]
            case SectionNode(repo, "uploads"):
                uuids = await self._repo(repo).layers.uploads()
                return [(u, UploadNode(repo, u)) for u in uuids]
        raise NotFound(str(node))

    # -- attributes ------------------------------------------------------------------------

    async def attr(self, node: Node) -> Attr:
        cached = self._immutable.get(node)
        if cached is not None:
            return cached
        match node:
            case DirNode(path) | SectionNode(path, _):
                return Attr(True, 0, await self._dir_mtime(path))
            case TagNode(repo, tag):
                digest = await self._tag_target(node)
                info = await self._repo(repo).manifests.stat(digest)
                mtime = await self._mtime(path_for(TagCurrentLink(repo, tag)))
                return Attr(False, info.size, mtime)
            case ManifestNode(repo, digest):
                info = await self._repo(repo).manifests.stat(digest)
                attr = Attr(False, info.size, info.mtime, immutable=True)
            case LayerNode(repo, digest):
                info = await self._repo(repo).layers.stat(digest)
                attr = Attr(False, info.size, info.mtime, immutable=True)
            case UploadNode(repo, uuid):
                upload = await self._repo(repo).layers.upload_info(uuid)
                return Attr(False, upload.size, upload.started_at.timestamp())
        self._immutable.put(node, attr)
        return attr

    async def _mtime(self, path: str) -> float:
        try:
            return (await self.registry.driver.stat(path)).mtime
        except PathNotFound:
            return self.started

    async def _dir_mtime(self, path: str) -> float:
        return await self._mtime(path_for(RepositoryDir(path)))

    async def _tag_target(self, node: TagNode) -> Digest:
        digest = self._tags.get(node)
        if digest is None:
            try:
                validate_tag(node.tag)
            except InvalidName:
                raise NotFound(node.tag) from None
            digest = await self._repo(node.repo).tags.get(node.tag)
            self._tags.put(node, digest)
        return digest

    async def xattrs(self, node: Node) -> dict[str, bytes]:
        match node:
            case TagNode(repo, _):
                digest = await self._tag_target(node)
                manifest = await self._repo(repo).manifests.get(digest)
                return {
                    "user.regfs.digest": str(digest).encode(),
                    "user.regfs.mediatype": manifest.media_type.encode(),
                }
            case ManifestNode(repo, digest):
                data = (await self._repo(repo).manifests.get(digest)).data
                return {
                    "user.regfs.digest": str(digest).encode(),
                    "user.regfs.mediatype": sniff_media_type(data).encode(),
                }
            case LayerNode(_, digest):
                return {"user.regfs.digest": str(digest).encode()}
            case UploadNode(repo, uuid):
                info = await self._repo(repo).layers.upload_info(uuid)
                started = info.started_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                return {"user.regfs.uuid": uuid.encode(), "user.regfs.startedat": started.encode()}
        return {}

    # -- reading ---------------------------------------------------------------------------

    async def open(self, node: Node) -> Reader:
        """A reader of the node's bytes; a tag is resolved now, so a handle never changes."""
        match node:
            case LayerNode(repo, digest):
                return await self._repo(repo).layers.fetch(digest)
            case ManifestNode(repo, digest):
                return BytesReader((await self._repo(repo).manifests.get(digest)).data)
            case TagNode(repo, _):
                digest = await self._tag_target(node)
                try:
                    return BytesReader((await self._repo(repo).manifests.get(digest)).data)
                except UnknownManifest:
                    self._tags.pop(node)
                    raise
            case UploadNode(repo, uuid):
                await self._repo(repo).layers.upload_info(uuid)
                return await self.registry.driver.reader(path_for(UploadData(repo, uuid)))
        raise IsADirectoryError(str(node))


def _parse_digest(name: str) -> Digest:
    try:
        return Digest.parse(name)
    except InvalidName:
        raise NotFound(name) from None
