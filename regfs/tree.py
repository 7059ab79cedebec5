"""What the mount shows of the registry: how each node (regfs/nodes.py) maps to storage.

    <component>/...          namespaces, one directory per name component
    <repository>/tags/<tag>  the manifest a tag points at (moves: cached for tag_ttl)
    .../manifests/<digest>   a manifest by digest (its bytes never change)
    .../layers/<digest>      a linked blob (its bytes never change)
    .../uploads/<uuid>       an upload in progress (its size is the bytes received)

Whether a digest is there does change (the registry's DELETE and garbage collection), so
what the daemon knows of manifests/ and layers/ is cached for tag_ttl, like tags.

A view (regfs/views.py) adds a section of its own beside these; `Tree` routes to it.
No FUSE here: the operations module turns these into inodes and errnos.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import itemgetter
from typing import TypeVar

import trio

from storage.api import BlobReader, RegistrySource, Repository, Upload
from storage.cache import TtlCache
from storage.digests import Digest
from storage.errors import (
    InvalidName,
    NotEmpty,
    StorageError,
    UnknownManifest,
    UnknownRepository,
    UnknownTag,
)
from storage.gcpause import gc_paused
from storage.manifest_format import sniff_media_type
from storage.names import is_component, validate_name, validate_tag

from .listings import KeptListings
from .nodes import (
    Attr,
    DirNode,
    FinishedNode,
    LayerNode,
    ManifestNode,
    Node,
    NotFound,
    SectionNode,
    TagNode,
    UploadNode,
    digest_name,
)
from .views import View

log = logging.getLogger(__name__)
T = TypeVar("T")

SECTIONS = ("layers", "manifests", "tags", "uploads")
# How long the kernel may keep a name that can change without it seeing (a digest's name, a
# tag's as a listing gave it, a tag's image root under a view) without asking: long enough
# for `ls -l` to stat each name right after its readdirplus chunk gave it, and for a walk
# below rootfs/<tag> not to look the root up for every file; short enough that SIGHUP (which
# cannot reach the kernel's entries) is followed at once for anyone but a racing stat
# (docs/concurrency.md). What changes through the mount waits for these (`Handed`).
LISTED_ENTRY_TIMEOUT = 0.1
# A listing's reply reaches the kernel a little after the daemon sends it, on a loaded
# machine much later; this long after it, the client surely has it (see `remove`).
LISTED_LATE = 1.0
TICK = 0.02  # the kernel rounds an entry's timeout up to its clock's tick (4-10 ms)
# Tags whose target and attributes are kept (the most recent): memory stays bounded with
# 100,000 tags in a repository; a listing of more hands the rest to the kernel unread.
TAGS_KEPT = 20_000
# Tags read ahead per driver call (`Tree._read_tags`): each batch is cached as soon as it is
# read (the lookups `ls -l` sends meanwhile find the first ones), the next read meanwhile,
# and little is held. A local root's stat worker reads 512 per request (REQUEST_ENTRIES).
TAGS_READ_BATCH = 512
# Digests whose attributes are kept (the most recently read; ~0.6 KB each, 24 MB at most):
# a tag's attributes last only as long as its manifest's, so room for as many manifests as
# tags, and as many again for a listing of layers/ or manifests/ read at once (`read_attrs`).
DIGESTS_KEPT = 2 * TAGS_KEPT
# What a file in uploads/ may be called: no path syntax, room for `sha256:<hex>` and the
# `.name.XXXXXX` temporaries that tools write before a rename.
UPLOAD_NAME_RE = re.compile(r"[A-Za-z0-9._:@+=~#-]{1,255}")  # ~, #: backups (cp -b, editors)
# How long the name of an upload that finished as uploads/<digest> still resolves (to the
# layer it became, `FinishedNode`), and for how many such uploads at most (the oldest go
# first): a tool sets the mode and times by path right after its close.
FINISHED_GRACE = 10.0
FINISHED_KEPT = 1000
# How long, and for how many tags at most, an unlink through the mount keeps what it deleted
# (`Tree._unlinked_tags`): tools that replace a file unlink it, then create it again.
UNLINKED_GRACE = 60.0
UNLINKED_KEPT = 10_000
# Sections whose names changed through the mount, and when: their mtime and ctime move then,
# as a directory's do when an entry comes or goes (the oldest forgotten past this many).
SECTIONS_CHANGED_KEPT = 10_000


class BytesReader:
    """A small file held whole (a manifest), as a BlobReader."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read_at(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    async def aclose(self) -> None:
        pass


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


@dataclass
class Handed:
    """When the kernel was last handed entries of a repository that it keeps for a while and
    that a change through the mount leaves stale behind its back (the kernel is never told:
    an invalidation can hang a killed daemon, docs/concurrency.md). Such a change waits, by
    a plain sleep, until they have expired (`expiry`)."""

    _last: dict[str, tuple[float, float]] = field(default_factory=dict)  # (monotonic, s)

    def handed(self, repo: str, seconds: float) -> None:
        if seconds > 0:
            self._last[repo] = (time.monotonic(), seconds)

    def expiry(self, repo: str, started: float) -> float:
        """When no entry of repo handed before `started` (a change's arrival) can be valid:
        the kernel took each by then, so each expires by `started` plus its timeout (and a
        tick). Only after a recent hand-out: a client that takes more than LISTED_LATE to
        read a reply is not waited for."""
        last = self._last.get(repo)
        if last is None or started - last[0] >= LISTED_LATE + last[1]:
            return started
        return started + last[1] + TICK


@dataclass
class ReadAhead:
    """A read-ahead of a repository's tags under way (`Tree._read_tags`): the tags it has
    yet to read, and an event set (and replaced) as each batch is cached. A readdir chunk
    sent meanwhile waits for the tags it hands (`Tree.ahead`), so `ls -l` finds them with
    their attributes rather than looking each up."""

    pending: set[TagNode]
    progress: trio.Event = field(default_factory=trio.Event)

    def done(self, batch: Sequence[TagNode]) -> None:
        self.pending.difference_update(batch)
        self.progress.set()
        self.progress = trio.Event()


class Tree:
    """The registry's sections, and the router to the views (regfs/views.py) beside them."""

    def __init__(
        self, registry: RegistrySource, tag_ttl: float, views: Mapping[str, View] | None = None
    ) -> None:
        self.registry = registry
        self._views = dict(views or {})  # section name → the view below it
        self._owners = {kind: view for view in self._views.values() for kind in view.node_types}
        self.sections = tuple(sorted((*SECTIONS, *self._views)))
        self.started_ns = time.time_ns()
        self._lists_cheaply = registry.statvfs() is not None  # a storage root (`_dir_nlink`)
        self._tag_ttl = tag_ttl
        self._tags: TtlCache[TagNode, Digest] = TtlCache(tag_ttl, TAGS_KEPT)
        self._listings: TtlCache[Node, list[tuple[str, Node]]] = TtlCache(tag_ttl)
        # Subdirectories of each repository or namespace listed (st_nlink, `_dir_nlink`),
        # kept as long as the kernel keeps a directory's attributes at least: a count as old
        # as the listing it came from, as `find` reads the two together.
        self._subdirs: TtlCache[Node, int] = TtlCache(max(tag_ttl, LISTED_ENTRY_TIMEOUT))
        self._digests: TtlCache[Node, Attr] = TtlCache(tag_ttl, DIGESTS_KEPT)  # layers/, manifests/
        # A tag's attributes (its manifest's size, its link's mtime), kept like its target and
        # as long as its manifest's: a listing hands them to the kernel without a storage read.
        self._tag_attrs: TtlCache[TagNode, tuple[Attr, ManifestNode]] = TtlCache(tag_ttl, TAGS_KEPT)
        self._upload_names: TtlCache[str, dict[str, str]] = TtlCache(tag_ttl)
        # Uploads removed (rm) while a writer holds them: gone from uploads/ at once, and
        # cancelled in storage by that writer's last close, or its release
        # (regfs/openfiles.py, `remove_written`).
        self.removed_uploads: set[UploadNode] = set()
        # Repositories rmdir'd while writers of such uploads hold them: hidden until they go.
        self._removed_repos: set[str] = set()
        self._finished: TtlCache[FinishedNode, bool] = TtlCache(FINISHED_GRACE, FINISHED_KEPT)
        # Namespaces that went with the last repository an rmdir here removed (no longer
        # listed: `Catalog.children`), still found by name for FINISHED_GRACE: `rm -r` of a
        # namespace ends with its rmdir, which a kernel whose entry expired meanwhile looks
        # up first.
        self._emptied: TtlCache[str, bool] = TtlCache(FINISHED_GRACE, FINISHED_KEPT)
        self._sections_changed: TtlCache[SectionNode, int] = TtlCache(None, SECTIONS_CHANGED_KEPT)
        # Tags an unlink through the mount deleted (`rm tags/t`, or with their manifest: `rm
        # manifests/<d>`) and the manifest each named, for UNLINKED_GRACE: `install`, `tar
        # -x`, `cp -f` and `cp --remove-destination` unlink a file before they create it
        # again, and what that create stores (`put_manifest`) or refuses (`tag_refused`)
        # puts those tags back, as tags/ on ext4 would be symlinks that dangle and revive.
        # Each with the process that unlinked it: only its own create puts it back (another
        # process's write is no tool replacing a file, and a deliberate rm stays done).
        self._unlinked_tags: TtlCache[TagNode, tuple[Digest, int]] = TtlCache(
            UNLINKED_GRACE, UNLINKED_KEPT
        )
        # And the layers it unlinked, as long: bytes written over one that are another's
        # are refused (`layer_refused`), and it is linked again where the source can.
        self._unlinked_layers: TtlCache[LayerNode, int] = TtlCache(UNLINKED_GRACE, UNLINKED_KEPT)
        # Tag entries a listing gave the kernel, kept briefly: tags deleted with their
        # manifest wait for them (`remove`). And the names in a view's section, a tag's image
        # root (rootfs/<tag>) that moves with the tag: every change of a tag waits for them.
        self._listed_tags = Handed()
        self._view_roots = Handed()
        # Listings the kernel keeps (regfs/listings.py), and when it was handed the attributes
        # of a section it keeps a listing of (keyed `repo/section`): a change through the mount
        # that it does not see waits for them, as for the tags above.
        self.kept = KeptListings()
        self._section_attrs = Handed()
        # ... and of a namespace (or the root) it keeps a listing of (keyed by its path): an
        # rmdir that empties namespaces below it waits for them (`_namespaces_emptied`).
        self._dir_attrs = Handed()
        self._shadow_logged: set[str] = set()
        self._tags_reading: dict[str, ReadAhead] = {}  # repositories whose tags are read now
        self._tags_unread: set[str] = set()  # ... whose tags were listed, none looked up since
        # The manifest node (and digest) of each manifest a kept tag points at, one object for
        # all its tags (`_manifest_node`), dropped with the last: ~0.3 KB less per kept tag.
        self._targets: weakref.WeakValueDictionary[tuple[str, Digest], ManifestNode] = (
            weakref.WeakValueDictionary()
        )
        self._repos: dict[str, Repository] = {}  # stateless views, kept to save rebuilding
        # Counts changes (through the mount, SIGHUP). A cache is filled only if none came
        # while its value was read: a lookup that read a tag's old target, then waited (a
        # remote registry), must not put it back after `changed` dropped it.
        self._changes = 0

    def _unchanged_since(self, count: int) -> bool:
        return count == self._changes

    def forget_moving(self) -> None:
        """Drop every cached tag, listing and digest entry (SIGHUP)."""
        self._changes += 1
        self._tags.clear()
        self._tag_attrs.clear()
        self._listings.clear()
        self._subdirs.clear()
        self.kept.move_all()
        self._digests.clear()
        self._upload_names.clear()
        self.registry.forget()
        for view in self._views.values():
            view.forget_moving()

    def _view_of(self, node: Node) -> View | None:
        """The view that answers for a node: a view's section directory, or its own kinds."""
        if isinstance(node, SectionNode):
            return self._views.get(node.section)
        return self._owners.get(type(node))

    def changed(self, *nodes: Node) -> None:
        """Forget what the daemon cached about nodes that changed through this mount."""
        self._changes += 1
        for node in nodes:
            self._relist(node)
            self._digests.pop(node)
            match node:
                case TagNode():
                    self._tags.pop(node)
                    self._tag_attrs.pop(node)
                    self._relist(SectionNode(node.repo, "tags"))
                    for view in self._views.values():  # rootfs/<tag> follows the tag at once
                        view.forget_moving()
                case SectionNode(repo, "uploads") | UploadNode(repo, _):
                    self._upload_names.pop(repo)
                    self._relist(SectionNode(repo, "uploads"))
                case LayerNode(repo, _) | ManifestNode(repo, _):
                    section = "layers" if isinstance(node, LayerNode) else "manifests"
                    self._relist(SectionNode(repo, section))
                case DirNode(path) if path:
                    # A namespace is listed while a repository is below it (`Catalog.children`),
                    # so every one above may have come or gone with this one.
                    while path:
                        path = path.rpartition("/")[0]
                        self._relist(DirNode(path))

    def _relist(self, node: Node) -> None:
        """node's names changed: the daemon lists it again, the kernel too (its mtime moves)."""
        self._listings.pop(node)
        self._subdirs.pop(node)
        self.kept.move(node)
        if isinstance(node, SectionNode):
            self._sections_changed.put(node, time.time_ns())

    def section_attrs_handed(self, node: SectionNode, seconds: float) -> None:
        """The kernel was handed the attributes of a section whose listing it keeps, for
        `seconds`: it reads the listing again only once they expired and the mtime moved."""
        self._section_attrs.handed(_join(node.repo, node.section), seconds)

    def dir_attrs_handed(self, node: DirNode, seconds: float) -> None:
        """The same for a namespace (or the root) whose listing the kernel keeps."""
        self._dir_attrs.handed(node.path, seconds)

    def _repo(self, name: str) -> Repository:
        repo = self._repos.get(name)
        if repo is None:
            repo = self._repos[name] = self.registry.repository(name)
        return repo

    async def _is_repository(self, path: str) -> bool:
        """Also a directory holding only uploads: a client's first push to a repository,
        interrupted before any blob finished, must show its uploads for a resume."""
        if path in self._removed_repos:
            return False
        return await self.registry.catalog.is_repository(path, with_uploads=True)

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(self, parent: Node, name: str) -> Node:
        if (view := self._view_of(parent)) is not None:
            if isinstance(parent, SectionNode):  # a tag's root: the kernel keeps it briefly
                self._view_roots.handed(parent.repo, min(self._tag_ttl, LISTED_ENTRY_TIMEOUT))
            return await view.lookup(parent, name)
        found: Node  # narrowed to the kind each case makes
        match parent:
            case DirNode(path):
                if name in self.sections and path and await self._is_repository(path):
                    return SectionNode(path, name)
                if (listed := self._listed_dir(parent, name)) is not None:
                    return listed
                child = _join(path, name)
                if (
                    is_component(name)
                    and child not in self._removed_repos
                    and (self._emptied.get(child) or await self.registry.catalog.exists(child))
                ):
                    return DirNode(child)
            case SectionNode(repo, "tags"):
                self._read_tags_ahead(repo)
                found = TagNode(repo, name)
                await self._tag_target(found)
                return found
            case SectionNode(repo, "manifests"):
                found = ManifestNode(repo, _parse_digest(name))
                await self.attr(found)
                return found
            case SectionNode(repo, "layers"):
                found = LayerNode(repo, _parse_digest(name))
                await self.attr(found)
                return found
            case SectionNode(repo, "uploads"):
                uuid = (await self.uploads(repo)).get(name)
                if uuid is not None:
                    return UploadNode(repo, uuid)
                if (finished := self._finished_as(repo, name)) is not None:
                    return finished
        raise NotFound(name)

    def _finished_as(self, repo: str, name: str) -> FinishedNode | None:
        """The upload of repo that finished as uploads/<name> less than FINISHED_GRACE ago."""
        digest = digest_name(name)
        if digest is None:
            return None
        node = FinishedNode(repo, digest)
        return node if self._finished.get(node) else None

    def _listed_dir(self, parent: DirNode, name: str) -> DirNode | None:
        """The repository or namespace `name` if parent's cached listing has it: a namespace
        goes to the kernel by name only (`Attributes.by_name`), so `find` and `ls -l` after
        `ls` look each up, and the listing says it is there for as long as it is cached."""
        listing = self._listings.get(parent)
        if listing is None:
            return None
        # A namespace's listing is in the storage's (sorted) order; a repository's begins with
        # its sections, so a repository nested in it may be missed here: then a stat asks.
        at = bisect.bisect_left(listing, name, key=itemgetter(0))
        found = listing[at][1] if at < len(listing) and listing[at][0] == name else None
        return found if isinstance(found, DirNode) else None

    async def uploads(self, repo: str) -> dict[str, str]:
        """The names under uploads/ and their uuids: the label regfs stored, else the uuid."""
        names = self._upload_names.get(repo)
        if names is None:
            since = self._changes
            layers = self._repo(repo).layers
            names = {}
            for uuid in await layers.uploads():
                if UploadNode(repo, uuid) in self.removed_uploads:
                    continue
                label = await layers.label(uuid)
                if label is None or not UPLOAD_NAME_RE.fullmatch(label) or label in names:
                    if label is not None:
                        log.warning(
                            "uploads: %s in %s is shown by its uuid (label %r taken or invalid)",
                            uuid,
                            repo,
                            label,
                        )
                    label = uuid
                names[label] = uuid
            if self._unchanged_since(since):
                self._upload_names.put(repo, names)
        return names

    async def upload_name(self, node: UploadNode) -> str:
        for name, uuid in (await self.uploads(node.repo)).items():
            if uuid == node.uuid:
                return name
        raise NotFound(node.uuid)

    async def children(self, node: Node) -> list[tuple[str, Node]]:
        if (view := self._view_of(node)) is not None:
            return await view.children(node)
        cached = self._listings.get(node)
        if cached is None:
            since = self._changes
            cached = await self._list(node)
            if self._unchanged_since(since):
                self._listings.put(node, cached)
                if isinstance(node, DirNode):  # every entry a directory
                    self._subdirs.put(node, len(cached))
            if isinstance(node, SectionNode) and node.section == "tags":
                self._tags_unread.add(node.repo)  # read ahead at its first lookup
        return cached

    async def _list(self, node: Node) -> list[tuple[str, Node]]:
        match node:
            case DirNode(path):
                names = await self.registry.catalog.children(path)
                if self._removed_repos:
                    names = [n for n in names if _join(path, n) not in self._removed_repos]
                if not path or not await self._is_repository(path):
                    with gc_paused():  # 10,000 repositories: see gc_paused
                        return [(n, DirNode(_join(path, n))) for n in names]
                shadowed = sorted(set(names) & set(self.sections))
                if shadowed and path not in self._shadow_logged:
                    self._shadow_logged.add(path)
                    log.warning(
                        "list: in repository %s, nested %s hidden by reserved names",
                        path,
                        ", ".join(_join(path, n) for n in shadowed),
                    )
                entries: list[tuple[str, Node]] = [(s, SectionNode(path, s)) for s in self.sections]
                entries += [(n, DirNode(_join(path, n))) for n in names if n not in self.sections]
                return entries
            case SectionNode(repo, "tags"):
                return TagNode.listing(repo, await self._repo(repo).tags.list())
            case SectionNode(repo, "manifests"):
                return ManifestNode.listing(repo, await self._repo(repo).manifests.list())
            case SectionNode(repo, "layers"):
                return LayerNode.listing(repo, await self._repo(repo).layers.list())
            case SectionNode(repo, "uploads"):
                uploads = await self.uploads(repo)
                return [(n, UploadNode(repo, u)) for n, u in sorted(uploads.items())]
        raise NotFound(str(node))

    # -- attributes ------------------------------------------------------------------------

    def cached_attr(self, node: TagNode) -> Attr | None:
        """A tag's attributes if the daemon holds them: a listing reads no link for them."""
        kept = self._tag_attrs.get(node)
        if kept is None or self._digests.get(kept[1]) is None:
            return None  # the manifest may be gone: a lookup finds out (`_tagged`)
        return kept[0]

    def ahead(self, node: TagNode) -> bool:
        """Whether a read-ahead under way will read node, whose target no lookup has read:
        a readdir chunk waits for it (`read_ahead`) rather than hand a placeholder that costs
        `ls -l` a LOOKUP. A lookup reads the target it needs itself, and waits for nothing."""
        if not self._tags_reading:  # every placeholder of a plain `ls` asks: kept cheap
            return False
        reading = self._tags_reading.get(node.repo)
        return reading is not None and node in reading.pending and self._tags.get(node) is None

    def tags_held(self, repo: str) -> tuple[Container[Node], Container[Node]]:
        """What the daemon may hold of repo's tags, tested in C for each tag of a listing
        (`Attributes.by_name`): those whose attributes may be cached, those a read-ahead
        under way will read. A tag in neither has no `cached_attr` and is not `ahead`."""
        reading = self._tags_reading.get(repo)
        return self._tag_attrs.keys(), frozenset() if reading is None else reading.pending

    async def read_ahead(self, node: TagNode) -> Attr | None:
        """node's cached attributes, once a read-ahead under way that will read it has
        (`ahead`); None if it is not cached then (damaged: the read-ahead leaves it out)."""
        while (cached := self.cached_attr(node)) is None and self.ahead(node):
            await self._tags_reading[node.repo].progress.wait()
        return cached

    def tags_listed(self, repo: str, seconds: float) -> None:
        """A listing gives the kernel entries of repo's tags that it keeps for `seconds`."""
        self._listed_tags.handed(repo, seconds)

    def held_attr(self, node: Node) -> Attr | None:
        """A digest's attributes if cached (what `attr` answers without awaiting anything)."""
        return self._digests.get(node)

    async def attr(self, node: Node) -> Attr:
        if (view := self._owners.get(type(node))) is not None:
            return await view.attr(node)
        cached = self._digests.get(node)
        if cached is not None:
            return cached
        since = self._changes
        match node:
            case DirNode(path) | SectionNode(path, _):
                stored = await self._dir_mtime_ns(path)
                if isinstance(node, SectionNode):  # its own names moved through the mount
                    stored = max(stored, self._sections_changed.get(node) or 0)
                nlink = self._dir_nlink(node)
                return Attr(True, 0, self.kept.mtime_ns(node, stored), nlink=nlink)
            case TagNode(repo, tag):
                if (cached := self.cached_attr(node)) is not None:
                    return cached
                try:
                    target, manifest = await self._tagged(
                        node, lambda d: self._manifest_attr(self._manifest_node(repo, d))
                    )
                except UnknownManifest as exc:  # damage: ENOENT, but say so
                    log.warning("attr: %s", exc)
                    raise
                attr = Attr(False, manifest.size, await self._repo(repo).tags.mtime_ns(tag))
                if self._unchanged_since(since):
                    self._tag_attrs.put(node, (attr, target))
                return attr
            case ManifestNode(repo, digest):
                info = await self._repo(repo).manifests.stat(digest)
                attr = Attr(False, info.size, info.mtime_ns, immutable=True)
            case LayerNode(repo, digest):
                info = await self._repo(repo).layers.stat(digest)
                attr = Attr(False, info.size, info.mtime_ns, immutable=True)
            case UploadNode(repo, uuid):
                upload = await self._repo(repo).layers.upload_info(uuid)
                return Attr(False, upload.size, upload.mtime_ns)
            case FinishedNode(repo, digest):  # its name goes: not kept, asked each time
                info = await self._repo(repo).layers.stat(digest)
                return Attr(False, info.size, info.mtime_ns)
        if self._unchanged_since(since):
            self._digests.put(node, attr)
        return attr

    async def read_attrs(self, nodes: Sequence[Node]) -> list[Attr | None]:
        """The attributes of a listing's digests (layers/, manifests/: readdirplus hands
        every entry's), as `attr` gives them: those not cached read in bulk where the source
        can (a local root: a few syscalls per entry in one worker thread call, not a chain
        of calls per entry), and cached. None for each the source leaves (absent, damaged):
        `attr` says why. At most DIGESTS_KEPT are read, so none pushes out another before it
        is used."""
        attrs = [self._digests.get(node) for node in nodes]
        wanted = [at for at, attr in enumerate(attrs) if attr is None][:DIGESTS_KEPT]
        found = await self._read_digests([nodes[at] for at in wanted])
        for at, attr in zip(wanted, found, strict=True):
            attrs[at] = attr
        return attrs

    async def _read_digests(self, nodes: Sequence[Node]) -> list[Attr | None]:
        """`read_attrs` of nodes not cached, all of one section (a listing's)."""
        if not nodes or not isinstance(first := nodes[0], LayerNode | ManifestNode):
            return [None] * len(nodes)
        since = self._changes
        store = self._repo(first.repo)
        source = store.layers if isinstance(first, LayerNode) else store.manifests
        digests = [n.digest for n in nodes if isinstance(n, LayerNode | ManifestNode)]
        infos = await source.stats(digests)
        attrs = [
            None if info is None else Attr(False, info.size, info.mtime_ns, immutable=True)
            for info in infos
        ]
        if self._unchanged_since(since):  # those stated (an Attr is never false), in bulk
            self._digests.put_many(list(compress(nodes, attrs)), list(filter(None, attrs)))
        return attrs

    def _read_tags_ahead(self, repo: str) -> None:
        """A tag of repo is looked up: if it is the first since a listing of repo's tags was
        read from storage, the targets and attributes of the listed tags are read in the
        background, ahead of the lookups `ls -l` sends next (a tag's kernel entry has timeout
        0), so each finds them cached. Not at the listing: a plain `ls` (or `watch ls`) looks
        nothing up and reads no link. Once per listing read, one at a time per repository;
        none if the listing is no longer cached (expired, changed, SIGHUP)."""
        if repo in self._tags_unread and repo not in self._tags_reading:
            self._tags_unread.discard(repo)
            listing = self._listings.get(SectionNode(repo, "tags"))
            nodes = [
                n
                for _, n in (listing or [])[:TAGS_KEPT]
                if isinstance(n, TagNode) and not self.cached_attr(n)
            ]
            if nodes:
                self._tags_reading[repo] = ReadAhead(set(nodes))
                trio.lowlevel.spawn_system_task(self._read_tags, repo, nodes)

    async def _read_tags(self, repo: str, nodes: list[TagNode]) -> None:
        """The tags not cached yet (at most what the cache holds), read in bulk where the
        source can (`Tags.read_many`), with their manifests, and cached as a lookup caches
        them, a batch at a time (each cached as soon as read, what is held meanwhile stays
        small), unless anything changed meanwhile (`_changes`). The next batch is read
        (`_read_batch`: on a local root by the stat worker, on the other core) while this
        one is cached, and only then the one after it; the last cached, the read-ahead
        has ended (no other step: a READDIR that waited for it sees it gone). A system
        task, so it must not raise: whatever fails is left to the lookups, which report it."""
        since, started = self._changes, time.monotonic()
        reading = self._tags_reading[repo]
        try:
            log.debug("%s: reading %d tags ahead", repo, len(nodes))
            manifests: dict[Digest, tuple[ManifestNode, Attr] | None] = {}
            size = TAGS_READ_BATCH
            batches = [nodes[at : at + size] for at in range(0, len(nodes), size)]
            async with trio.open_nursery() as nursery:
                read = self._read_batch(nursery, repo, batches[0])
                for at, batch in enumerate(batches):
                    found = await read()
                    if found is None:
                        return
                    if at + 1 < len(batches):  # read while this one is cached
                        read = self._read_batch(nursery, repo, batches[at + 1])
                        # Let it ask (the worker's request sent) before this one is cached:
                        # caching awaits nothing, and the read would start only after.
                        await trio.lowlevel.checkpoint()
                    if not await self._cache_tags(repo, batch, found, manifests, since):
                        nursery.cancel_scope.cancel()
                        return
                    reading.done(batch)
            took = (time.monotonic() - started) * 1000
            log.debug("%s: %d tags read ahead in %.0f ms", repo, len(nodes), took)
        except Exception as exc:  # a head start only (an ExceptionGroup of the nursery too)
            log.debug("%s: reading tags ahead failed: %s", repo, exc)
        finally:
            del self._tags_reading[repo]
            reading.done(nodes)  # whoever waits asks alone

    async def _cache_tags(
        self, repo: str, batch: list[TagNode], found: list[tuple[Digest, int] | None],
        manifests: dict[Digest, tuple[ManifestNode, Attr] | None], since: int,
    ) -> bool:  # fmt: skip
        """Caches what was read of a batch of tags with their manifests' attributes (read
        once each, kept in manifests), as a lookup would; False, caching nothing, if anything
        changed since the read-ahead began."""
        # Each Digest object read (read_many makes one per manifest pointed at) is looked up
        # by identity, not hashed per tag: that is a Python call each.
        read = {id(got[0]): got[0] for got in found if got is not None}
        new = [self._manifest_node(repo, d) for d in set(read.values()) - set(manifests)]
        for manifest, attr in zip(new, await self.read_attrs(new), strict=True):
            manifests[manifest.digest] = None if attr is None else (manifest, attr)
        if not self._unchanged_since(since):
            return False
        targets = {key: manifests[digest] for key, digest in read.items()}
        kept = [  # absent, damaged, or its manifest gone: its lookup says so
            (node, got[1], target)
            for node, got in zip(batch, found, strict=True)
            if got is not None and (target := targets[id(got[0])]) is not None
        ]
        held = [node for node, _, _ in kept]
        self._tags.put_many(held, [target[0].digest for _, _, target in kept])
        self._tag_attrs.put_many(
            held, [(Attr(False, t[1].size, mtime_ns), t[0]) for _, mtime_ns, t in kept]
        )
        return True

    def _read_batch(
        self, nursery: trio.Nursery, repo: str, batch: list[TagNode]
    ) -> Callable[[], Awaitable[list[tuple[Digest, int] | None] | None]]:
        """`Tags.read_many` of a batch of repo's tags, begun now in nursery: what it read,
        to be awaited (an error of it fails the nursery)."""
        done, found = trio.Event(), []

        async def read() -> None:
            found.append(await self._repo(repo).tags.read_many([n.tag for n in batch]))
            done.set()

        async def result() -> list[tuple[Digest, int] | None] | None:
            await done.wait()
            return found[0]

        nursery.start_soon(read)
        return result

    def _manifest_node(self, repo: str, digest: Digest) -> ManifestNode:
        """The node of a manifest tags point at: the one cached tags hold if any, so 20,000
        tags of one image (a CI repository) keep one node and one digest, not one each."""
        node = self._targets.get((repo, digest))
        if node is None:
            node = self._targets[repo, digest] = ManifestNode(repo, digest)
        return node

    async def _manifest_attr(self, target: ManifestNode) -> tuple[ManifestNode, Attr]:
        return target, await self.attr(target)

    def _dir_nlink(self, node: DirNode | SectionNode) -> int:
        """st_nlink: 2 and a link for each subdirectory, as on ext4. `find` trusts it: once it
        has met that many subdirectories it takes the other entries for files, unstatted,
        so a count too low hides directories. A registry section holds files only; a
        repository or namespace is counted from its last listing if the daemon has it (the
        one `ls` reads, for `--tag-ttl` or 0.1 s at least); else 1, the count for "unknown"
        (btrfs's), as for a view's section (rootfs/ lists no image). `counted_nlink` reads
        the listing."""
        if isinstance(node, SectionNode):
            return 1 if node.section in self._views else 2
        subdirs = self._subdirs.get(node)
        return 1 if subdirs is None else 2 + subdirs

    async def counted_nlink(self, node: DirNode) -> int:
        """`_dir_nlink`, the listing read for it where that is cheap: on a storage root (one
        getdents; over HTTP or S3 a request). For a GETATTR only (`stat dir`, `find`'s fstat
        of a directory it enters): a lookup does without (`ls -l` of 2,000 repositories
        would list each: 3x the daemon's CPU)."""
        if self._lists_cheaply and self._subdirs.get(node) is None:
            try:
                await self.children(node)
            except (NotFound, StorageError) as exc:
                log.debug("getattr: %s counted as 1 link: %s", node, exc)
        return self._dir_nlink(node)

    async def _dir_mtime_ns(self, path: str) -> int:
        mtime_ns = await self.registry.catalog.mtime_ns(path)
        return self.started_ns if mtime_ns is None else mtime_ns

    async def _tagged(self, node: TagNode, use: Callable[[Digest], Awaitable[T]]) -> T:
        """use(the manifest the tag points at). A cached target whose manifest is gone is
        read again once: the registry deletes a manifest with the tags that point at it, and
        that is no damage. UnknownManifest names the tag when it really points at nothing."""
        digest = await self._tag_target(node)
        try:
            return await use(digest)
        except UnknownManifest:
            self._tags.pop(node)
            self._tag_attrs.pop(node)
            if (fresh := await self._tag_target(node)) != digest:
                return await use(fresh)
            raise UnknownManifest(
                f"tag {node.repo}:{node.tag} points at {digest}, no manifest here"
            ) from None

    async def _tag_target(self, node: TagNode) -> Digest:
        digest = self._tags.get(node)
        if digest is None:
            try:
                validate_tag(node.tag)
            except InvalidName:
                raise NotFound(node.tag) from None
            since = self._changes
            digest = self._manifest_node(
                node.repo, await self._repo(node.repo).tags.get(node.tag)
            ).digest
            if self._unchanged_since(since):
                self._tags.put(node, digest)
        return digest

    async def xattrs(self, node: Node) -> dict[str, bytes]:
        if (view := self._view_of(node)) is not None:
            return await view.xattrs(node)
        match node:
            case TagNode(repo, _):
                manifest = await self._tagged(node, self._repo(repo).manifests.get)
                return {
                    "user.regfs.digest": str(manifest.digest).encode(),
                    "user.regfs.mediatype": manifest.media_type.encode(),
                }
            case ManifestNode(repo, digest):
                data = (await self._repo(repo).manifests.get(digest)).data
                return {
                    "user.regfs.digest": str(digest).encode(),
                    "user.regfs.mediatype": sniff_media_type(data).encode(),
                }
            case LayerNode(_, digest) | FinishedNode(_, digest):
                return {"user.regfs.digest": str(digest).encode()}
            case UploadNode(repo, uuid):
                info = await self._repo(repo).layers.upload_info(uuid)
                started = info.started_at.strftime("%Y-%m-%dT%H:%M:%SZ")
                return {"user.regfs.uuid": uuid.encode(), "user.regfs.startedat": started.encode()}
        return {}

    async def read(self, node: Node) -> bytes:
        """The whole content of a small file (a tag's manifest; bytes() of bytes is no copy)."""
        reader = await self.open(node)
        try:
            return bytes(await reader.read_at(0, (await self.attr(node)).size))
        finally:
            await reader.aclose()

    # -- reading ---------------------------------------------------------------------------

    async def open(self, node: Node) -> BlobReader:
        """A reader of the node's bytes; a tag is resolved now, so a handle never changes."""
        if (view := self._view_of(node)) is not None:
            return await view.open(node)
        match node:
            case LayerNode(repo, digest) | FinishedNode(repo, digest):
                return await self._repo(repo).layers.fetch(digest)
            case ManifestNode(repo, digest):
                return BytesReader((await self._repo(repo).manifests.get(digest)).data)
            case TagNode(repo, _):
                return BytesReader((await self._tagged(node, self._repo(repo).manifests.get)).data)
            case UploadNode(repo, uuid):
                return await self._repo(repo).layers.read_upload(uuid)
        raise IsADirectoryError(str(node))

    # -- changing ----------------------------------------------------------------------------

    async def create_upload(self, repo: str, name: str) -> tuple[UploadNode, Upload]:
        if not UPLOAD_NAME_RE.fullmatch(name) or name in (".", ".."):
            raise InvalidName(f"invalid upload name {name!r}")
        upload = await self._repo(repo).layers.upload(label=name)
        node = UploadNode(repo, upload.uuid)
        if (finished := digest_name(name)) is not None:  # the name is an upload's again
            self._finished.pop(FinishedNode(repo, finished))
        self.changed(node)
        return node, upload

    async def resume_upload(self, node: UploadNode) -> Upload:
        return await self._repo(node.repo).layers.resume(node.uuid)

    async def finish_upload(
        self, node: UploadNode, upload: Upload, digest: Digest, named: bool = True
    ) -> None:
        """Verify and commit; the upload stays (and DigestMismatch propagates) on a mismatch.

        `named`: it finished as uploads/<digest> (closed, or renamed to it), not by a rename
        into layers/. That name then resolves to the layer for FINISHED_GRACE seconds
        (`FinishedNode`), for the chmod, utimes and stat by path that copying tools send
        after the close; none lists it, and only FINISHED_KEPT are held, the oldest dropped."""
        started = time.monotonic()
        finished = FinishedNode(node.repo, digest)
        # The name resolves to the layer from before the upload goes (the finish's last
        # step: the layer is linked by then), so a lookup meanwhile (an `rm` racing the
        # close) never finds neither.
        put = named and not self._finished.get(finished)
        if put:
            self._finished.put(finished, True)
        try:
            await upload.finish(digest)
        except BaseException:
            if put:
                self._finished.pop(finished)
            raise
        if named:
            self._finished.put(finished, True)
        self.changed(node, LayerNode(node.repo, digest))
        # A `cp` into uploads/<digest> ends here, at its close: the kernel sees neither
        # listing change.
        await self._outlive(started, self._sections(node.repo, "layers", "uploads"))

    async def rename_upload(self, node: UploadNode, name: str) -> None:
        if not UPLOAD_NAME_RE.fullmatch(name) or name in (".", ".."):
            raise InvalidName(f"invalid upload name {name!r}")
        await self._repo(node.repo).layers.set_label(node.uuid, name)
        self.changed(node)

    async def remove(self, node: Node, unlinked_by: int | None = None) -> list[TagNode]:
        """rm: cancel an upload, delete a tag, a manifest (and its tags), unlink a layer.

        Returns the tags that went with a manifest. `unlinked_by`: the process (tgid) of an
        unlink through the mount (0: not told, as where /proc is another pid namespace's,
        and then any create not told matches it), whose deleted tags and layer are remembered
        for it (`_unlinked_tags`, `_unlinked_layers`); None: a rename's.
        """
        started = time.monotonic()
        gone: list[TagNode] = []
        gone_with: list[Node] = []  # directories whose names may move with it
        stale: list[tuple[Handed, str]] = []  # what the kernel keeps that this change outdates
        match node:
            case UploadNode(repo, uuid):
                await (await self._repo(repo).layers.resume(uuid)).cancel()
                # A repository that held only this upload went with it (LayerUpload.cancel).
                gone_with = [DirNode(repo), DirNode(repo.rpartition("/")[0])]
            case TagNode(repo, tag):
                tags = self._repo(repo).tags
                named = await tags.get(tag) if unlinked_by is not None else None
                await tags.delete(tag)
                if named is not None and unlinked_by is not None:
                    self._unlinked_tags.put(node, (named, unlinked_by))
                stale = [(self._view_roots, repo)]
            case ManifestNode(repo, digest):
                deleted = await self._repo(repo).manifests.delete(digest)
                gone = [TagNode(repo, tag) for tag in deleted]
                if unlinked_by is not None:
                    self._unlinked_tags.put_many(gone, [(digest, unlinked_by)] * len(gone))
                if gone:  # the kernel did not see these tags go
                    stale = [(self._listed_tags, repo), (self._view_roots, repo)]
                    stale += self._sections(repo, "tags")
            case LayerNode(repo, digest):
                await self._repo(repo).layers.unlink(digest)
                if unlinked_by is not None:
                    self._unlinked_layers.put(node, unlinked_by)
            case FinishedNode():  # only the name goes: the layer is in layers/
                self._finished.pop(node)
            case DirNode() | SectionNode():
                raise PermissionError(f"directories cannot be removed: {node}")
            case _:
                raise PermissionError(f"a view is read-only: {node}")
        self.changed(node, *gone, *gone_with)
        await self._outlive(started, stale)
        return gone

    def _sections(self, repo: str, *sections: str) -> list[tuple[Handed, str]]:
        return [(self._section_attrs, _join(repo, section)) for section in sections]

    async def _outlive(self, started: float, stale: list[tuple[Handed, str]]) -> None:
        """Return once what the kernel was handed before `started` (a change's arrival) under
        each (Handed, key) that the change outdates has expired. Forgotten first (`changed`),
        so none is handed again; a sleep, nothing a dying daemon waits on."""
        until = max((handed.expiry(key, started) for handed, key in stale), default=started)
        if until > started:
            await trio.sleep(max(0.0, until - time.monotonic()))

    async def put_tag(self, node: TagNode, data: bytes) -> Digest:
        """Check and store the manifest, then point the tag at it (InvalidManifest: nothing)."""
        started = time.monotonic()
        repo = self._repo(node.repo)
        digest = await repo.manifests.put(data)
        await repo.tags.put(node.tag, digest)
        self._unlinked_tags.pop(node)
        self.changed(node, ManifestNode(node.repo, digest))
        stale = [(self._view_roots, node.repo), *self._sections(node.repo, "manifests")]
        await self._outlive(started, stale)
        return digest

    async def retag(self, node: TagNode, target: TagNode) -> Digest:
        """Point target where node pointed and delete node (`mv` of a tag): the source's
        `Tags.move` orders its two steps. Returns the manifest's digest."""
        started = time.monotonic()
        try:
            digest = await self._repo(node.repo).tags.move(node.tag, target.tag)
        finally:
            self.changed(node, target)  # either may have moved, even on a failure
        # Set (target) and deleted for good (node) through the mount, as put_tag sets: what an
        # earlier unlink of either remembered is no longer theirs to put back.
        self._unlinked_tags.pop(target)
        self._unlinked_tags.pop(node)
        await self._outlive(started, [(self._view_roots, node.repo)])
        return digest

    async def exchange_tags(self, a: TagNode, b: TagNode) -> None:
        """Point a where b pointed and b where a did (renameat2's RENAME_EXCHANGE). Two puts:
        if the second fails (or is cancelled), a is put back first, so that both tags stay as
        they were, as a failed rename changes neither name."""
        started = time.monotonic()
        tags = self._repo(a.repo).tags
        digest_a, digest_b = await tags.get(a.tag), await tags.get(b.tag)
        await tags.put(a.tag, digest_b)
        try:
            await tags.put(b.tag, digest_a)
        except BaseException:
            with trio.CancelScope(shield=True):
                try:
                    await tags.put(a.tag, digest_a)
                except Exception:
                    self.changed(a)  # a now points at b's manifest: forget what was handed
                    log.exception("rename: tag %s of %s not put back", a.tag, a.repo)
            raise
        self.changed(a, b)
        await self._outlive(started, [(self._view_roots, a.repo)])
        log.info("rename: tags %s and %s of %s exchanged", a.tag, b.tag, a.repo)

    async def put_manifest(self, node: ManifestNode, data: bytes, by: int) -> Digest:
        """Check and store a manifest by digest, without a tag (InvalidManifest: nothing).
        `by`: the writer's process; the tags its own unlink of the manifest deleted a
        moment ago point at it again."""
        stored = await self._repo(node.repo).manifests.put(data)
        self.changed(ManifestNode(node.repo, stored))
        if self._unlinked_tags.keys():
            await self._tags_back(
                [
                    tag
                    for tag in list(self._unlinked_tags.keys())
                    if tag.repo == node.repo and self._unlinked_tags.get(tag) == (stored, by)
                ],
                by,
                f"manifest {node.repo}@{stored} stored again",
            )
        return stored

    async def tag_refused(self, node: TagNode, by: int) -> None:
        """A manifest written to tags/<tag> by process `by` was refused: if that process's
        unlink deleted the tag a moment ago (a tool's unlink before its create), it is put
        back, so that the refused write leaves the registry as it was (SPEC 7)."""
        await self._tags_back([node], by, "its new manifest refused")

    async def layer_refused(self, node: LayerNode, by: int) -> None:
        """Bytes written to layers/<digest> by process `by` were another's: if that
        process's unlink took the layer a moment ago (`cp -f`, `install`: unlink, then
        create), it is linked again where the source still can, so that the refused write
        loses nothing. Another process's rm of it stays done."""
        if self._unlinked_layers.get(node) != by:
            return
        self._unlinked_layers.pop(node)
        relinked = await self._repo(node.repo).layers.relink(node.digest)
        if relinked:
            self.changed(node)
        log.log(
            logging.INFO if relinked else logging.WARNING,
            "layer %s of %s %s: the bytes written over it were refused",
            node.digest,
            node.repo,
            "linked again" if relinked else "stays unlinked (its source cannot link it again)",
        )

    async def _tags_back(self, nodes: Sequence[TagNode], by: int, why: str) -> None:
        """Point each tag process `by`'s unlink through the mount deleted a moment ago back
        at the manifest it named, unless it is set again meanwhile (by anyone: it is left
        alone)."""
        for node in nodes:
            unlinked = self._unlinked_tags.get(node)
            if unlinked is None or unlinked[1] != by:
                continue
            self._unlinked_tags.pop(node)
            digest = unlinked[0]
            tags = self._repo(node.repo).tags
            with contextlib.suppress(UnknownTag):
                await tags.get(node.tag)
                continue  # set again meanwhile
            try:
                await tags.put(node.tag, digest)
            except (UnknownManifest, UnknownRepository) as exc:
                log.warning("tag %s of %s not put back: %s", node.tag, node.repo, exc)
                continue
            self.changed(node)
            log.info("tag %s of %s points at %s again: %s", node.tag, node.repo, digest, why)

    async def mkdir(self, parent: DirNode, name: str) -> DirNode:
        path = _join(parent.path, name)
        validate_name(path)
        await self.registry.create_repository(path)
        self._removed_repos.discard(path)  # made again: it stays
        self.changed(parent)
        return DirNode(path)

    async def rmdir(self, parent: DirNode, node: DirNode) -> bool:
        """rmdir of an empty repository (what `mkdir` made) or an emptied namespace. One whose
        only content is uploads removed while written (`rm -r` beside a `cp` into uploads/)
        goes at once, as a local directory goes with its last name: hidden now, removed in
        storage once the last of those writers let go (`upload_released`); so does a
        namespace that holds only such hidden ones (`rm -r` of the namespace). True if
        removed, False if only hidden."""
        started = time.monotonic()
        removed = True
        try:
            await self.registry.remove_repository(node.path)
        except (NotEmpty, UnknownRepository):
            # Gone where nothing shown is left (what the registry's deletes left stays).
            catalog = self.registry.catalog
            if not self._emptied.get(node.path) and await catalog.exists(node.path):
                if not (
                    await self._holds_only_removed_uploads(node.path)
                    or await self._holds_only_hidden(node.path)
                ):
                    raise
                self._removed_repos.add(node.path)
                removed = False
        listing = self._listings.get(parent)
        self.changed(parent, node)
        if listing is not None:  # kept, less node: `rm -r` lists (and counts) parent once
            listing = [entry for entry in listing if entry[1] != node]
            self._listings.put(parent, listing)
            self._subdirs.put(parent, len(listing))
        if removed:
            self._emptied.pop(node.path)
            await self._namespaces_emptied(parent.path, started)
        return removed

    async def _namespaces_emptied(self, path: str, started: float) -> None:
        """After an rmdir below path (arrived at `started`): each namespace up from path that
        now holds nothing shown went with it (`Catalog.children`), but is found by name for a
        while (`_emptied`). The kernel is not told (it bumps only the rmdir's own parent), so
        a listing it keeps above one of them is read again only once the attributes it was
        handed expire (and the mtime moved): wait for those it was handed lately, of a
        listing it read after the last change of that directory it saw itself
        (`KeptListings.may_hold`). `rm -r MNT/*` waited 0.1 s for every namespace of one
        repository (23 s for 200): only the first waits now, as each namespace's own rmdir
        makes the kernel read the root's listing again."""
        stale: list[tuple[Handed, str]] = []
        while path and not await self.registry.catalog.exists(path):
            self._emptied.put(path, True)
            path = path.rpartition("/")[0]
            if self.kept.may_hold(DirNode(path)):
                stale.append((self._dir_attrs, path))
        await self._outlive(started, stale)

    async def _holds_only_removed_uploads(self, path: str) -> bool:
        if not any(upload.repo == path for upload in self.removed_uploads):
            return False
        repo = self._repo(path)
        return not (
            await self.uploads(path)
            or await repo.tags.list()
            or await repo.manifests.list()
            or await repo.layers.list()
            or await self.registry.catalog.children(path)
        )

    async def _holds_only_hidden(self, path: str) -> bool:
        """Whether a namespace's every child is a repository or namespace rmdir hid."""
        if not any(hidden.startswith(path + "/") for hidden in self._removed_repos):
            return False
        children = await self.registry.catalog.children(path)
        return all(_join(path, child) in self._removed_repos for child in children) and not (
            await self.registry.catalog.is_repository(path, with_uploads=True)
        )

    async def upload_released(self, node: UploadNode) -> None:
        """A writer of an upload removed while written let go (the upload is cancelled): its
        repository, if rmdir'd meanwhile and no other such writer holds it, goes now, then
        each namespace above it that rmdir hid and that hides nothing else."""
        if any(upload.repo == node.repo for upload in self.removed_uploads):
            return
        path = node.repo
        while path in self._removed_repos and not any(
            hidden.startswith(path + "/") for hidden in self._removed_repos
        ):
            self._removed_repos.discard(path)
            parent = path.rpartition("/")[0]
            try:
                await self.registry.remove_repository(path)
            except UnknownRepository:  # it held uploads alone: the writer's cancel removed it
                pass
            except NotEmpty as exc:  # something came meanwhile: it stays, as do those above
                log.warning("rmdir: %s stays after all: %s", path, exc)
                above = {h for h in self._removed_repos if path.startswith(h + "/")}
                self._removed_repos -= above
                self.changed(*(DirNode(p) for h in above for p in (h, h.rpartition("/")[0])))
            self.changed(DirNode(parent), DirNode(path))
            path = parent


def _parse_digest(name: str) -> Digest:
    digest = digest_name(name)
    if digest is None:
        raise NotFound(name)
    return digest
