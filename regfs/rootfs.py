"""The `rootfs/` view (issue 16): the files inside every tagged image, read-only and lazy.

    <repo>/rootfs/<tag>/...                          the merged root filesystem of the image
    <repo>/rootfs/sha256:<hex>/...                   the same by manifest digest
    <repo>/rootfs/<tag>/<os>-<arch>[-<variant>]/...  an image index: one image per platform

`rootfs/` itself lists nothing and answers lookups, as autofs does without `browse`: a `find`,
`du`, `grep -r` or `rsync -a` of the mount must not index (decompress) every image of the
registry and count its files on top of the blobs; whoever names an image gets it.

`storage/rootfs` does the work: `image` reads manifests, `Indexer` indexes each layer once
(kept in the on-disk `IndexCache`), `merge` applies the layers, `LayerFiles` reads a file's
bytes. This module maps names to the merged trees' inodes, keeps the trees of the most
recently used images, and answers a bad image (a layer that is no tar, a wrong digest, a
merge refusal) with EIO for that image only. See docs/rootfs.md ("The view").
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import tempfile
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, compress, count, repeat
from operator import attrgetter, mul, or_

import trio

from storage.api import Buffer, RegistrySource, Repository
from storage.cache import TtlCache
from storage.digests import Digest
from storage.errors import CorruptEntry, InvalidName, StorageError
from storage.gcpause import gc_paused
from storage.names import validate_tag
from storage.rootfs.cache import IndexCache
from storage.rootfs.errors import BadLayer, UnsafeCacheDir
from storage.rootfs.image import Image, NotAnImage, Platforms, load
from storage.rootfs.index import Indexer, LayerIndex, LayerRef
from storage.rootfs.members import Kind, Member
from storage.rootfs.merge import MergedTree, MergeError, is_utf8, merge
from storage.rootfs.reader import LayerFiles

from .attributes import PACKED, packed
from .nodes import (
    Attr,
    AttrColumns,
    FixedNode,
    Listing,
    Node,
    NotFound,
    SectionNode,
    digest_name,
)
from .tree import BytesReader

log = logging.getLogger(__name__)

SECTION = "rootfs"
_ENCODING, _ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # fsdecode
_IMAGE_KIND = "image"  # ImageNode's marker: unequal to every other kind of node
_new_tuple = tuple.__new__
INDEX_XATTR = "user.regfs.index"
DIGEST_XATTR = "user.regfs.digest"
# umoci never sets these from a layer; a tar that carries them must not show them either.
HIDDEN_XATTRS = frozenset({"security.selinux", "system.nfs4_acl"})
MAX_IMAGES = 8  # merged trees kept (each refers to its layers' member tables)
MAX_KEPT_INODES = 2_000_000  # and their inodes in all (~0.5 KB each with the members,
# and 88 B more once the image is listed: `_Build.rows`)
PAUSE_GC_AT = 200  # entries of a listing made with no cyclic collection
PACK_RUN = 16_384  # entries packed at a time (`_packed_rows`): the loop waits 7-16 ms at most
ROOT_WAIT = 0.5  # seconds a stat of an image's root waits for a build already under way
_FILE, _DIR, _REG, _DIR_TYPE = Kind.FILE, Kind.DIR, stat.S_IFREG, stat.S_IFDIR
_KIND, _MODE, _UID, _GID, _MTIME, _SIZE = (
    attrgetter(name) for name in ("kind", "mode", "uid", "gid", "mtime_ns", "size")
)
_IS_FILE = {kind: int(kind is Kind.FILE) for kind in Kind}  # a directory's size shows as 0
_SPECIAL = frozenset((Kind.SYMLINK, Kind.CHAR, Kind.BLOCK))  # what `_attr` shows otherwise
_TYPES = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHAR: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
}


@dataclass(frozen=True)
class PlatformsNode(FixedNode):
    """`rootfs/<name>/` for an image index: one directory per platform."""

    repo: str
    via: tuple[str, ...]  # the names below rootfs/ that lead here
    digest: Digest


class ImageNode(tuple[str, str, tuple[str, ...], str, int], FixedNode):
    """Inode `ino` of the merged tree of image manifest `digest`, reached through `via`.

    A directory has one path, so `via` keeps two names of one image (a tag and its digest)
    apart; below one root, hard links are one node, hence one inode. The root (`ino` 1)
    names a moving thing (a tag), everything below it fixed bytes.

    A tuple (a kind marker, repo, via, the digest's text, ino), as `TagNode` is: a listing
    of an image's directory makes one per entry, which the inode table hashes and compares;
    a tuple of strings and ints is made, hashed and compared in C (a `Digest` in it would
    be hashed by its dataclass's Python `__hash__`, three times per listed entry).
    """

    __slots__ = ()
    __match_args__ = ("repo", "via", "digest", "ino")

    def __new__(
        cls, repo: str, via: tuple[str, ...], digest: Digest, ino: int = MergedTree.ROOT
    ) -> ImageNode:
        return tuple.__new__(cls, (_IMAGE_KIND, repo, via, str(digest), ino))

    @property
    def repo(self) -> str:
        return self[1]

    @property
    def via(self) -> tuple[str, ...]:
        return self[2]

    @property
    def digest(self) -> Digest:
        return _parsed(self[3])

    @property
    def ino(self) -> int:
        return self[4]

    @property
    def is_root(self) -> bool:
        return self[4] == MergedTree.ROOT

    def below(self, ino: int) -> ImageNode:
        """Inode `ino` of the same image, reached the same way (no Python call to `__new__`:
        one per entry of a listing)."""
        return _new_tuple(ImageNode, (_IMAGE_KIND, self[1], self[2], self[3], ino))

    def below_all(self, inos: Iterable[int]) -> Iterator[ImageNode]:
        """`below` of each, made in C (a listing's entries)."""
        fields = zip(repeat(_IMAGE_KIND), repeat(self[1]), repeat(self[2]), repeat(self[3]), inos)
        return map(_new_tuple, repeat(ImageNode), fields)

    def __repr__(self) -> str:
        return f"ImageNode(repo={self[1]!r}, via={self[2]!r}, digest={self[3]!r}, ino={self[4]})"

    def __getnewargs__(self) -> tuple[str, tuple[str, ...], Digest, int]:
        return self[1], self[2], self.digest, self[4]


@lru_cache(maxsize=1024)
def _parsed(digest: str) -> Digest:
    """An image node's digest, from the text it holds (checked when the node was made)."""
    return Digest.parse(digest)


class BrokenImage(CorruptEntry):
    """An image whose layers cannot be indexed or merged: EIO for it, the mount goes on."""

    def __init__(self, repo: str, digest: Digest, why: str) -> None:
        StorageError.__init__(self, f"image {repo}@{digest}: {why}")
        self.path = f"{repo}@{digest}"


@dataclass(frozen=True)
class _Last:
    """The build an image's last listing came from, by the texts of its key: a walk lists
    its directories one after another, and the key's `Digest` is parsed and hashed by
    Python calls (`RootfsView._build_of`). Always the most recently used build, so a listing
    from it need not move it up in the LRU order: forgotten whenever `_build_of` hands
    another, or a build is dropped (`_drop`)."""

    key: tuple[str, str]  # repo, the digest's text
    build: _Build


@dataclass(eq=False)
class _Build:
    """One image's merged tree: being built, built, or why it cannot be."""

    image: Image
    done: trio.Event = field(default_factory=trio.Event)
    indexes: list[LayerIndex] = field(default_factory=list)
    tree: MergedTree | None = None
    root: Attr | None = None  # the tree's root, asked for once per path walk below a tag
    # What stat shows of each entry of the tree, made at its first listing (a cold `find`
    # lists all of them): packed fields (`attributes.packed`), 88 bytes an entry.
    rows: array[int] | None = None
    packing: trio.Event | None = None  # while `rows` are being made (`RootfsView._pack`)
    error: str | None = None


class MemberReader:
    """A file inside an image, as a BlobReader (reads go to `LayerFiles`)."""

    def __init__(
        self, files: LayerFiles, layer: LayerRef, index: LayerIndex, member: Member, where: str
    ) -> None:
        self.files = files
        self.layer = layer
        self.index = index
        self.member = member
        self.where = where

    async def read_at(self, offset: int, size: int) -> Buffer:
        try:
            return await self.files.read(self.layer, self.index, self.member, offset, size)
        except BadLayer as exc:
            raise CorruptEntry(self.where, str(exc)) from None

    async def aclose(self) -> None:
        pass  # the layer stays open in LayerFiles' LRU


class RootfsView:
    """The `rootfs/` section of every repository (regfs/views.py)."""

    node_types: tuple[type[Node], ...] = (PlatformsNode, ImageNode)

    def __init__(
        self,
        registry: RegistrySource,
        cache: IndexCache,
        tag_ttl: float,
        max_images: int = MAX_IMAGES,
        temporary_cache: bool = False,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.indexer = Indexer(cache)
        self.files = LayerFiles(cache)
        self.max_images = max_images
        self._temporary_cache = temporary_cache
        self._tags: TtlCache[tuple[str, str], Digest] = TtlCache(tag_ttl)
        self._manifests: TtlCache[tuple[str, Digest], Image | Platforms] = TtlCache(tag_ttl)
        self._builds: OrderedDict[tuple[str, Digest], _Build] = OrderedDict()
        self._last: _Last | None = None
        self._scopes: set[trio.CancelScope] = set()
        self._running = 0
        self._idle = trio.Event()

    @classmethod
    def create(cls, registry: RegistrySource, tag_ttl: float, cache_size: int) -> RootfsView:
        """The view with the user's index cache, or a private temporary one (logged) when
        that directory is unsafe: someone else could write what the daemon would show."""
        try:
            view = cls(registry, IndexCache(max_bytes=cache_size), tag_ttl)
        except UnsafeCacheDir as exc:
            temporary = tempfile.mkdtemp(prefix="regfs-index-")
            log.warning("rootfs: %s; layer indexes last this mount only (%s)", exc, temporary)
            cache = IndexCache(temporary, max_bytes=cache_size)
            view = cls(registry, cache, tag_ttl, temporary_cache=True)
        # The first gzip pass then finds its child started (storage/rootfs/fastgzip.py).
        view.indexer.children.keep_spare()
        return view

    def stop(self) -> None:
        """Cancel the builds under way (at unmount): the requests waiting for them get EIO."""
        for scope in self._scopes:
            scope.cancel()

    async def aclose(self) -> None:
        """At unmount: stop the builds, close every open layer (native decompressors must be
        closed before the interpreter exits), then the cache."""
        self.stop()
        if self._running:
            await self._idle.wait()
        self.indexer.children.close()
        await self.files.aclose()
        self.cache.close()
        if self._temporary_cache:
            shutil.rmtree(self.cache.directory, ignore_errors=True)

    def forget_moving(self) -> None:
        """SIGHUP: tags are read again, and images that failed are tried again."""
        self._tags.clear()
        self._manifests.clear()
        for key in [k for k, build in self._builds.items() if build.error is not None]:
            self._drop(key)

    # -- names -----------------------------------------------------------------------------

    def _repo(self, name: str) -> Repository:
        return self.registry.repository(name)

    async def _manifest(self, repo: str, digest: Digest) -> Image | Platforms:
        found = self._manifests.get((repo, digest))
        if found is None:
            found = await load(self._repo(repo), digest)
            self._manifests.put((repo, digest), found)
        return found

    async def _tag(self, repo: str, tag: str) -> Digest:
        digest = self._tags.get((repo, tag))
        if digest is None:
            try:
                validate_tag(tag)
            except InvalidName:
                raise NotFound(tag) from None
            digest = await self._repo(repo).tags.get(tag)
            self._tags.put((repo, tag), digest)
        return digest

    async def _named(self, repo: str, via: tuple[str, ...], digest: Digest) -> Node:
        found = await self._manifest(repo, digest)
        if isinstance(found, Platforms):
            return PlatformsNode(repo, via, digest)
        return ImageNode(repo, via, digest)

    async def lookup(self, parent: Node, name: str) -> Node:
        match parent:
            case SectionNode(repo, _):
                digest = digest_name(name) or await self._tag(repo, name)
                return await self._named(repo, (name,), digest)
            case PlatformsNode(repo, via, digest):
                platforms = await self._manifest(repo, digest)
                assert isinstance(platforms, Platforms)
                child = platforms.get(name)
                if child is not None:
                    return ImageNode(repo, (*via, name), child)
            case ImageNode(ino=ino):
                found = (await self._tree(parent)).lookup(ino, name)
                if found is not None:
                    return parent.below(found)
        raise NotFound(name)

    async def children(self, node: Node) -> list[tuple[str, Node]]:
        if type(node) is ImageNode:  # first: a walk of an image lists ~1,700 directories
            last = self._last
            if last is None or last.key != (node[1], node[3]):
                build = await self._build_of(node)
                last = _Last((node[1], node[3]), build)
                if self._builds.get((node.repo, node.digest)) is build:
                    self._last = last  # not one an eviction dropped while we waited
            if last.build.rows is None:
                await self._pack(last.build)
            return self._listing(node, last.build)
        match node:
            case SectionNode():
                return []  # looked up, never listed (see the module's docstring)
            case PlatformsNode(repo, via, digest):
                platforms = await self._manifest(repo, digest)
                assert isinstance(platforms, Platforms)
                return [(n, ImageNode(repo, (*via, n), d)) for n, d in platforms.platforms]
        raise NotFound(str(node))

    async def _pack(self, build: _Build) -> None:
        """Make `_Build.rows` at the image's first listing, in a worker thread: ~0.7 us an
        entry (11 ms for the bench's 15,000), which for an image of millions would hold
        every other request for seconds. One at a time per image: the listings that come
        meanwhile wait for it, and one of them packs if that one was cancelled."""
        while build.rows is None:
            if build.packing is not None:
                await build.packing.wait()
                continue
            packing = build.packing = trio.Event()
            try:
                build.rows = await trio.to_thread.run_sync(_packed_rows, build.tree)
            finally:
                build.packing = None
                packing.set()

    def _listing(self, node: ImageNode, build: _Build) -> Listing:
        """An image directory's listing, with every entry's attributes packed (`_Build.rows`):
        per listing a few calls in C, no step an entry."""
        tree, rows = build.tree, build.rows
        assert tree is not None and rows is not None
        raw, inodes, start = tree.names(node.ino)
        if not inodes:
            return Listing([], array("q"))
        rows = rows[start * PACKED : (start + len(inodes)) * PACKED]
        text = raw.decode(_ENCODING, _ERRORS)  # os.fsdecode of each, at once
        names, encoded = text.split("\0"), raw.split(b"\0")
        if not (tree.utf8 or is_utf8(text)):
            shown = [i for i, name in enumerate(names) if _is_utf8(name)]
            names, encoded = [names[i] for i in shown], [encoded[i] for i in shown]
            inodes = [inodes[i] for i in shown]
            rows = array(
                "q", chain.from_iterable(rows[i * PACKED : (i + 1) * PACKED] for i in shown)
            )
        listing = Listing(encoded, rows)
        if len(inodes) <= PAUSE_GC_AT:
            listing += zip(names, node.below_all(inodes), strict=True)
            return listing
        # Tracked objects an entry: a big directory's would set off collections (see
        # gc_paused); a small one's at most one young one, cheaper than the pause.
        with gc_paused():
            listing += zip(names, node.below_all(inodes), strict=True)
        return listing

    # -- attributes ------------------------------------------------------------------------

    async def attr(self, node: Node) -> Attr:
        match node:
            case PlatformsNode(repo, _, digest):
                info = await self._repo(repo).manifests.stat(digest)
                return Attr(True, 0, info.mtime_ns)
            case ImageNode():
                if node.is_root:
                    # A stat of the root (every `ls -l rootfs/`) starts no build: until one
                    # is done it shows an image root's defaults (what merge gives a root
                    # without a `./` member).
                    build = await self._started(node)
                    if build is not None and not build.done.is_set():
                        # A walk asks this of a tag's root often (its name is kept 0.1 s
                        # only): no trip through the loop when it is built.
                        with trio.move_on_after(ROOT_WAIT):
                            await build.done.wait()
                    if build is None or build.tree is None:
                        # st_nlink 1: its subdirectories are not known yet (2 said none,
                        # which a walk's leaf optimisation may believe).
                        return _attr(_DEFAULT_ROOT, 1, fixed=False)
                    if build.root is None:
                        found = build.tree.node(node.ino)
                        build.root = _attr(found.member, found.nlink, fixed=False)
                    return build.root
                found = (await self._tree(node)).node(node.ino)
                return _attr(found.member, found.nlink, fixed=True)
        raise NotFound(str(node))

    async def xattrs(self, node: Node) -> dict[str, bytes]:
        match node:
            case PlatformsNode(_, _, digest):
                return {DIGEST_XATTR: str(digest).encode()}
            case ImageNode():
                if not node.is_root:
                    member = (await self._tree(node)).node(node.ino).member
                    return _member_xattrs(member)
                build = await self._started(node)
                shown = {}
                if build is not None and build.tree is not None:
                    shown = _member_xattrs(build.tree.node(node.ino).member)
                shown[DIGEST_XATTR] = str(node.digest).encode()
                shown[INDEX_XATTR] = self._status(await self._image(node), build).encode()
                return shown
        return {}

    def _status(self, image: Image, build: _Build | None) -> str:
        """What `getfattr -n user.regfs.index` says of an image's root."""
        layers = image.layers
        if build is None:
            size = sum(layer.size for layer in layers)
            return f"not indexed yet: {len(layers)} layers, {size} bytes (listing it starts)"
        if build.error is not None:
            return f"failed: {build.error}"
        if build.tree is not None:
            return f"indexed: {len(layers)} layers, {len(build.tree)} inodes"
        lines = [f"indexing: {len(build.indexes)} of {len(layers)} layers indexed"]
        lines += [
            self.indexer.progress[layer.digest].describe()
            for layer in layers
            if layer.digest in self.indexer.progress
        ]
        return "\n".join(lines)

    # -- reading ---------------------------------------------------------------------------

    async def open(self, node: Node) -> BytesReader | MemberReader:
        if not isinstance(node, ImageNode):
            raise IsADirectoryError(str(node))
        build = await self._build_of(node)
        assert build.tree is not None
        found = build.tree.node(node.ino)
        member = found.member
        if member.kind is Kind.DIR:
            raise IsADirectoryError(str(node))
        if member.kind is Kind.SYMLINK:
            return BytesReader(os.fsencode(member.linkname))  # what readlink answers
        if member.kind is not Kind.FILE:
            raise PermissionError(f"{node}: a device node or fifo is not read through regfs")
        where = f"{node.repo}@{node.digest} ({member.path})"
        layer = build.image.layers[found.layer]
        return MemberReader(self.files, layer, build.indexes[found.layer], member, where)

    # -- building --------------------------------------------------------------------------

    async def _image(self, node: ImageNode) -> Image:
        image = await self._manifest(node.repo, node.digest)
        if not isinstance(image, Image):  # an index's entry that is an index itself
            raise NotAnImage(f"manifest {node.digest} in {node.repo} is an index, no image")
        return image

    async def _started(self, node: ImageNode) -> _Build | None:
        """The image's build if one was started (and is kept), without starting one; the
        manifest is read either way (NotAnImage, UnknownManifest: ENOENT)."""
        await self._image(node)
        return self._builds.get((node.repo, node.digest))

    async def _build_of(self, node: ImageNode) -> _Build:
        """The image's finished build, started now if need be; BrokenImage if it failed."""
        key = (node.repo, node.digest)
        build = self._builds.get(key)
        if build is None:
            image = await self._image(node)
            build = self._builds.get(key)  # another request may have started it meanwhile
            if build is None:
                build = self._builds[key] = _Build(image)
                self._running += 1
                trio.lowlevel.spawn_system_task(self._run, node.repo, build)
                self._evict()
        else:
            self._builds.move_to_end(key)
        if self._last is not None and self._last.build is not build:
            self._last = None
        if not build.done.is_set():  # waiting on a set Event is a trip through the loop
            await build.done.wait()
        if build.error is not None:
            raise BrokenImage(node.repo, node.digest, build.error)
        return build

    async def _tree(self, node: ImageNode) -> MergedTree:
        tree = (await self._build_of(node)).tree
        assert tree is not None
        return tree

    def _evict(self) -> None:
        """Drop the least recently used finished builds beyond `max_images` images or
        `MAX_KEPT_INODES` inodes; the newest is always kept. An image dropped and asked for
        again is merged again from the on-disk indexes (no pass)."""
        kept = sum(len(b.tree) for b in self._builds.values() if b.tree is not None)
        for key, build in list(self._builds.items())[:-1]:
            if len(self._builds) <= self.max_images and kept <= MAX_KEPT_INODES:
                break
            if build.done.is_set():
                kept -= len(build.tree) if build.tree is not None else 0
                self._drop(key)

    async def _run(self, repo: str, build: _Build) -> None:
        """Index the image's layers in order (the indexer makes one pass at a time), then
        merge them in a worker thread. A system task: it outlives the request that started
        it (a `cat` interrupted by ^C), and `aclose` cancels it."""
        image = build.image
        key = (repo, image.digest)
        layers = [layer.digest for layer in image.layers]
        merged = False
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                for layer in image.layers:
                    build.indexes.append(await self.indexer.index(layer))
                self.files.prepare(list(zip(image.layers, build.indexes, strict=True)))
                tables = [index.members for index in build.indexes]
                tree, merged = await trio.to_thread.run_sync(self._merged, layers, tables)
                build.tree = tree
                log.info(
                    "rootfs: image %s@%s: %d layers %s, %d inodes",
                    repo,
                    image.digest,
                    len(tables),
                    "merged" if merged else "merged before (the tree kept)",
                    len(tree),
                )
            except BadLayer as exc:  # the indexer has logged the layer and the reason
                build.error = str(exc)
            except MergeError as exc:
                digest = image.layers[exc.layer].digest
                build.error = f"layer {exc.layer} ({digest}): {exc.path!r}: {exc.reason}"
                log.error("rootfs: image %s@%s: %s", repo, image.digest, build.error)
            except Exception as exc:  # the source failing (a registry away): tried again
                build.error = f"{type(exc).__name__}: {exc}"
                log.error("rootfs: image %s@%s: %s", repo, image.digest, build.error)
                self._forget(key, build)
        self._scopes.discard(scope)
        if scope.cancelled_caught:
            build.error = "the mount is going away"
            self._forget(key, build)
        build.done.set()
        if merged and build.tree is not None:  # for the next mount, once this one is served
            tables = [index.members for index in build.indexes]
            await trio.to_thread.run_sync(self.cache.store_tree, layers, tables, build.tree)
        self._evict()
        self._running -= 1
        if not self._running:
            self._idle.set()
            self._idle = trio.Event()

    def _merged(self, layers: list[Digest], tables: list[list[Member]]) -> tuple[MergedTree, bool]:
        """The image's tree as a former mount kept it, else merged now (True): a worker
        thread's job. Loading a kept tree is ~2x cheaper than merging (docs/rootfs.md)."""
        kept = self.cache.load_tree(layers, tables)
        if kept is not None:
            return kept, False
        return merge(tables), True

    def _forget(self, key: tuple[str, Digest], build: _Build) -> None:
        if self._builds.get(key) is build:
            self._drop(key)

    def _drop(self, key: tuple[str, Digest]) -> None:
        del self._builds[key]
        self._last = None


_DEFAULT_ROOT = Member("", Kind.DIR, 0o755, 0, 0, 0)


def _attr(member: Member, nlink: int, fixed: bool) -> Attr:
    """What stat shows of a merged inode: the tar's type, mode, owner, times and size.
    Made once per listed entry (15,000 in a cold `find` of the bench's image): the member's
    fields unpacked at once, and every field of the Attr given, so no call to the named
    tuple's `__new__`."""
    _, kind, mode, uid, gid, mtime_ns, size, _, linkname, major, minor, _ = member
    if kind is _FILE:
        return _new_tuple(Attr, (False, size, mtime_ns, fixed, _REG | mode, uid, gid, nlink, 0))
    if kind is _DIR:
        return _new_tuple(Attr, (True, 0, mtime_ns, fixed, _DIR_TYPE | mode, uid, gid, nlink, 0))
    size = 0
    if kind is Kind.SYMLINK:
        size, mode = len(os.fsencode(linkname)), 0o777  # as Linux shows every symlink
    rdev = os.makedev(major, minor) if kind in (Kind.CHAR, Kind.BLOCK) else 0
    return _new_tuple(
        Attr, (False, size, mtime_ns, fixed, _TYPES[kind] | mode, uid, gid, nlink, rdev)
    )


def _columns(members: list[Member], nlinks: list[int]) -> AttrColumns:
    """`_attr` of each (fixed), a column at a time: a step per entry in C, and in Python only
    for a symlink or a device node."""
    kinds = list(map(_KIND, members))
    modes = list(map(or_, map(_TYPES.__getitem__, kinds), map(_MODE, members)))
    sizes = list(map(mul, map(_SIZE, members), map(_IS_FILE.__getitem__, kinds)))
    rdevs = [0] * len(kinds)
    for i in compress(count(), map(_SPECIAL.__contains__, kinds)):
        member = members[i]
        if member.kind is Kind.SYMLINK:  # as Linux shows every symlink
            sizes[i], modes[i] = len(os.fsencode(member.linkname)), stat.S_IFLNK | 0o777
        else:
            rdevs[i] = os.makedev(member.devmajor, member.devminor)
    uids, gids, mtimes = (list(map(field, members)) for field in (_UID, _GID, _MTIME))
    return AttrColumns(modes, nlinks, uids, gids, rdevs, sizes, mtimes)


def _packed_rows(tree: MergedTree | None) -> array[int]:
    """What stat shows of every entry of the tree, packed (a worker thread's job), PACK_RUN
    entries at a time: each column is one call in C, which holds the GIL throughout, and
    the trio loop waits for it (a 1M-entry image's whole columns: 83-122 ms at a time, and
    the temporary lists peaked at twice the 88 MB result)."""
    assert tree is not None
    rows, start = array("q"), 0
    while True:
        members, nlinks = tree.entry_columns(start, start + PACK_RUN)
        if not members:
            return rows
        rows += packed(_columns(members, nlinks))
        start += PACK_RUN


def _member_xattrs(member: Member) -> dict[str, bytes]:
    return {name: value for name, value in member.xattrs if name not in HIDDEN_XATTRS}


def _is_utf8(name: str) -> bool:
    """A name the mount can show: names are UTF-8 in regfs (refusals.decode_name)."""
    if is_utf8(name):
        return True
    log.info("rootfs: a name that is not UTF-8 is not shown: %r", name)
    return False
