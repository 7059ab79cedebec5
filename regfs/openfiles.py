"""Open files: which handle a node gets, one writer per upload or tag, and closing.

A file handle (fh) names one `Handle` (regfs/handles.py) from open or create until release.
The tables are touched only between awaits (docs/concurrency.md), so they need no lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio
from pyfuse3 import FileInfo, FUSEError, RequestContext

from storage.cache import TtlCache
from storage.digests import Digest
from storage.names import validate_tag

from .closers import Close, Closers
from .handles import (
    FinishedWriter,
    Handle,
    ManifestHandle,
    ManifestWriter,
    ReadHandle,
    TagHandle,
    UploadHandle,
    UploadReader,
    finished_refusal,
)
from .nodes import (
    Attr,
    FinishedNode,
    FixedNode,
    LayerNode,
    ManifestNode,
    Node,
    SectionNode,
    TagNode,
    UploadNode,
    digest_name,
)
from .options import MountOptions
from .refusals import refusal
from .tree import FINISHED_GRACE, FINISHED_KEPT, Tree

log = logging.getLogger(__name__)


class OpenFiles:
    def __init__(self, tree: Tree, options: MountOptions) -> None:
        self.tree = tree
        self.options = options
        self._handles: dict[int, Handle] = {}
        self._nodes: dict[int, Node] = {}  # each handle's node
        self._open: Counter[Node] = Counter()  # the handles of each node
        # Files unlinked while open, and what they were then: an open descriptor outlives
        # its name, as on any filesystem (fstat says st_nlink 0), until its last release.
        self._unlinked: dict[Node, Attr] = {}
        # The writer of each upload or manifest, the newest of each tag's: its handle.
        self._writers: dict[Node, int] = {}
        self._closers = Closers(options.mountpoint)
        # Tags whose writers' ends (a check and store each) are under way: one at a time,
        # in the order the closes came, so that the last to close wins.
        self._turns: dict[Node, trio.Lock] = {}
        # Uploads whose last writer is still being released (saving its hash state, fsync,
        # unlocking): release arrives after close() has returned, so a `cp` followed at once
        # by `mv`, `rm` or another writer must wait for it instead of finding the upload busy.
        self._closing: dict[Node, trio.Event] = {}
        # Manifests a writer here stored by digest (manifests/<digest>) and let go less than
        # FINISHED_GRACE ago: the chmod and utimes that `install -m` and `rsync -a` send by
        # path after the close are accepted and ignored, as by a finished upload's name.
        self._stored: TtlCache[Node, bool] = TtlCache(FINISHED_GRACE, FINISHED_KEPT)
        self._next_fh = 1

    # -- the table -------------------------------------------------------------------------

    def get(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise FUSEError(errno.EBADF)
        return handle

    def writer(self, node: Node) -> Handle | None:
        """The handle writing the node, if one is open."""
        return self._handles.get(self._writers.get(node, 0))

    def being_written(self, parent: Node, name: str) -> TagNode | ManifestNode | UploadNode | None:
        """The tag or manifest `name` of section `parent` that a writer created and has not
        stored yet (storage does not know it), or the upload a create of layers/<digest>
        began (linked at its last close)."""
        match parent:
            case SectionNode(repo, "layers"):
                return next(
                    (
                        handle.node
                        for fh in self._writers.values()
                        if isinstance(handle := self._handles[fh], UploadHandle)
                        and handle.layer
                        and handle.node.repo == repo
                        and handle.name == name
                    ),
                    None,
                )
            case SectionNode(repo, "tags"):
                node: TagNode | ManifestNode = TagNode(repo, name)
            case SectionNode(repo, "manifests") if digest_name(name) is not None:
                node = ManifestNode(repo, Digest.parse(name))
            case _:
                return None
        return node if node in self._writers else None

    def is_written(self, node: Node) -> bool:
        return node in self._writers

    def writes_none_of(self, nodes: set[Node]) -> bool:
        """Whether no writer has any of nodes open (`is_written` of a run, in one C call)."""
        return self._writers.keys().isdisjoint(nodes)

    def writes_a_layer(self, node: Node) -> str | None:
        """The layers/ name an upload's writer created it as (`cp -f` over a layer: it
        shows in uploads/ too), if it is one: what its close links, which a rm or mv of it
        in uploads/ must not undo."""
        writer = self.writer(node)
        return writer.name if isinstance(writer, UploadHandle) and writer.layer else None

    def just_stored(self, node: Node) -> bool:
        """Whether a writer here stored node by digest and let go less than 10 s ago."""
        return bool(self._stored.get(node))

    def is_open(self, node: Node) -> bool:
        return node in self._open

    def unlinked(self, node: Node, attr: Attr) -> None:
        """node's name went (rm) while a handle of it is open: what getattr answers now."""
        if self.is_open(node):  # not released while the name was being removed
            self._unlinked[node] = attr

    def unlinked_attr(self, node: Node) -> Attr | None:
        """What node was when unlinked, if its name went while it was open."""
        return self._unlinked.get(node)

    def remove_written(self, node: UploadNode, attr: Attr | None = None) -> None:
        """rm of an upload its writer holds: the name goes now, and the writer's last close
        (or its release) cancels the upload in storage; its writes go on meanwhile, as
        into an unlinked file. The writer holds the upload's lock: no other can cancel it.
        `attr`: what fstat says of it now (None: its writer's size)."""
        writer = self.writer(node)
        assert isinstance(writer, UploadHandle)
        writer.removed = True
        self.tree.removed_uploads.add(node)
        self.tree.changed(node)
        self.unlinked(node, attr or writer.pending_attr() or Attr(False, 0, time.time_ns()))

    def restore_written(self, node: UploadNode) -> None:
        """Undo `remove_written` (a rename over it failed): its name is back."""
        writer = self.writer(node)
        if isinstance(writer, UploadHandle):
            writer.removed = False
        self.tree.removed_uploads.discard(node)
        self.tree.changed(node)
        self._unlinked.pop(node, None)

    def renamed(self, node: UploadNode, name: str) -> None:
        """mv of an upload within uploads/: its writer, if one holds it, writes on under the
        new name (which says whether its last close finishes it)."""
        writer = self.writer(node)
        if isinstance(writer, UploadHandle):
            writer.name = name

    def check_no_writer(self, node: Node) -> None:
        if node in self._writers:
            log.info("open: %s already has a writer (EBUSY)", node)
            raise FUSEError(errno.EBUSY)

    async def settled(self, node: Node) -> None:
        """Wait until the release of the node's last writer is done (see _closing)."""
        closing = self._closing.get(node)
        if closing is not None:
            await closing.wait()

    def add(self, node: Node, handle: Handle) -> FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        info = FileInfo(fh=fh)
        if isinstance(handle, UploadHandle | ManifestWriter):
            self._writers[handle.node] = fh
            node = handle.node  # may be another than opened (a finished upload's name)
        self._nodes[fh] = node
        self._open[node] += 1
        # Digest-addressed content never changes: keep its pages across opens. An upload's
        # readers and its writer go through the page cache too, so that it maps (mmap, a
        # shared writable map of the writer's too: a store is a write at its offset when
        # flushed), dropped at each open and whenever its size or mtime moved (its
        # attributes last 0 s); its one writer's writes keep the pages in step. A tag (and
        # its writer) is read directly: a handle reads the manifest the tag pointed at when
        # opened, and the page cache is the inode's, shared with handles opened after the
        # tag moved (their manifest's pages, their size: a cut manifest).
        reader = isinstance(handle, ReadHandle)
        info.keep_cache = reader and isinstance(node, LayerNode | ManifestNode | FixedNode)
        # A layer opened for writing (`FinishedWriter`) goes around the page cache too: a
        # refused write, and a store into a shared map whose write-back is refused, would
        # leave their bytes in the pages every reader of the layer is served from (keep_cache)
        # until the kernel drops them. Its shared map is refused by the kernel (ENODEV).
        info.direct_io = isinstance(handle, ManifestWriter | FinishedWriter) or isinstance(
            node, TagNode
        )
        return info

    # -- opening ---------------------------------------------------------------------------

    async def open(self, node: Node, flags: int) -> Handle:
        truncate = bool(flags & os.O_TRUNC)
        if flags & os.O_ACCMODE == os.O_RDONLY and not truncate:
            if isinstance(node, UploadNode):
                return UploadReader(await self.tree.open(node), partial(self.writer, node))
            return ReadHandle(await self.tree.open(node))
        if self.options.read_only:
            raise refusal("open", node, self.options.read_only)
        if isinstance(node, UploadNode):
            return await self._upload_writer(node, truncate)
        if isinstance(node, FinishedNode):
            if truncate:  # a new upload, as create begins one
                return (await self.create(SectionNode(node.repo, "uploads"), str(node.digest)))[1]
            # The layer it became, which takes only its own bytes (`dd conv=notrunc` again).
            size = (await self.tree.attr(node)).size
            return FinishedWriter(node, await self.tree.open(node), size)
        if isinstance(node, TagNode):  # writers of a tag each store at their last close
            if flags & os.O_ACCMODE == os.O_RDONLY:
                # O_TRUNC on a descriptor that can write nothing to take the tag's place: the
                # kernel refuses it so for a file that cannot be emptied (append-only),
                # rather than leave a tag no close of that descriptor could end well.
                log.info("open: %s for reading with O_TRUNC: a tag is never emptied (EPERM)", node)
                raise FUSEError(errno.EPERM)
            if truncate:
                return TagHandle(self.tree, node, emptied=True)
            return TagHandle(self.tree, node, await self.tree.read(node))
        raise refusal("open", node, self.options.read_only)

    async def _upload_writer(self, node: UploadNode, truncate: bool) -> UploadHandle:
        self.check_no_writer(node)
        await self.settled(node)
        upload = await self.tree.resume_upload(node)
        try:
            if truncate:
                await upload.truncate(0)
            name = await self.tree.upload_name(node)
        except BaseException:  # a registry's POST failing: no handle will ever close it
            with trio.CancelScope(shield=True):  # never leave the upload locked
                await upload.close()
            raise
        return UploadHandle(self.tree, node, upload, name)

    async def create(self, parent: Node, name: str) -> tuple[Node, Handle, Attr]:
        """A new file in uploads/ (an upload), layers/ (an upload by digest), tags/ (a tag) or
        manifests/ (by digest)."""
        node: UploadNode | TagNode | ManifestNode  # narrowed to the kind each case makes
        match parent:
            case SectionNode(repo, "uploads"):
                node, upload = await self.tree.create_upload(repo, name)
                return node, UploadHandle(self.tree, node, upload, name), await self.tree.attr(node)
            case SectionNode(repo, "layers") if digest_name(name) is not None:
                # A layer a tool unlinked before it creates it again (`cp -f`, `install`,
                # `tar -x`): an upload verified by its name, linked at its last close.
                with contextlib.suppress(LookupError):
                    await self.tree.lookup(parent, name)
                    raise refusal("create", parent, self.options.read_only)  # linked: EPERM
                node, upload = await self.tree.create_upload(repo, name)
                writer = UploadHandle(self.tree, node, upload, name, layer=True)
                return node, writer, await self.tree.attr(node)
            case SectionNode(repo, "tags"):
                validate_tag(name)
                node = TagNode(repo, name)
                handle: ManifestWriter = TagHandle(self.tree, node, emptied=True)
                return node, handle, Attr(False, 0, time.time_ns())
            case SectionNode(repo, "manifests") if digest_name(name) is not None:
                # A manifest by digest, checked and stored on close (an index's children).
                node = ManifestNode(repo, Digest.parse(name))
                self.check_no_writer(node)
                handle = ManifestHandle(self.tree, node, emptied=True)
                return node, handle, Attr(False, 0, time.time_ns())
        raise refusal("create", parent, self.options.read_only)

    async def make_upload(self, parent: SectionNode, name: str) -> tuple[UploadNode, Attr]:
        """An empty upload in uploads/ that no writer holds, as open(O_CREAT) and a close
        leave one: mknod(S_IFREG), or a create for reading (`flock FILE`)."""
        node, upload = await self.tree.create_upload(parent.repo, name)
        with trio.CancelScope(shield=True):  # never leave the upload locked
            await upload.close()
        return node, await self.tree.attr(node)

    # -- truncating ------------------------------------------------------------------------

    async def truncate(self, node: Node, size: int, fh: int | None) -> None:
        handle = self._handles.get(fh) if fh is not None else None
        if handle is None and isinstance(node, UploadNode):
            handle = self._handles.get(self._writers.get(node, -1))
        if handle is not None:
            await handle.truncate(size)
        elif isinstance(node, UploadNode):
            await self._truncate_upload(node, size)
        elif isinstance(node, FinishedNode):  # the layer: to its own size only (no change)
            own = (await self.tree.attr(node)).size
            if size != own:
                raise finished_refusal(node, own, f"a truncate to {size} bytes")
        else:
            raise refusal("truncate", node, self.options.read_only)

    async def _truncate_upload(self, node: UploadNode, size: int) -> None:
        """truncate(2) by path with no writer open: like ftruncate, shrink only. The storage
        writer is exclusive (flock), so a writer opened meanwhile gets EBUSY."""
        await self.settled(node)
        upload = await self.tree.resume_upload(node)
        try:
            await upload.truncate(size)
        finally:
            with trio.CancelScope(shield=True):  # never leave the upload locked
                await upload.close()

    # -- closing ---------------------------------------------------------------------------

    def process_of(self, ctx: RequestContext | None) -> int:
        """The process (tgid) of a request's thread, 0 if it cannot be told (or no request:
        a call made in process)."""
        return self._closers.thread_group(ctx.pid) if ctx is not None else 0

    def opened_by(self, handle: Handle, ctx: RequestContext, inode: int) -> None:
        """Note who opened a writer (the thread of the OPEN or CREATE): its last close ends
        the file (regfs/closers.py)."""
        if isinstance(handle, UploadHandle | ManifestWriter):
            handle.opener = self._closers.opener(ctx.pid, inode)

    async def flush(self, fh: int, tid: int | None) -> None:
        """close(2) of a descriptor of fh by thread tid (None: not told, a stock pyfuse3). A
        tag's writer takes its turn before its closer is scanned: a scan in a worker thread
        may end after a later close's, which must still store after it."""
        handle = self.get(fh)
        if not isinstance(handle, ManifestWriter):
            await handle.flush(await self._close_of(fh, handle, tid))
            return
        async with self._turn(handle.node):
            await handle.flush(await self._close_of(fh, handle, tid))

    async def _close_of(self, fh: int, handle: Handle, tid: int | None) -> Close:
        """What the close of handle fh by thread tid is (regfs/closers.py)."""
        if tid is None or handle.opener is None or not handle.ends_on_close():
            return Close.UNKNOWN
        others = Counter(
            other.opener.process
            for other_fh, other in self._handles.items()
            if other.opener is not None
            and other.opener.inode == handle.opener.inode
            and other_fh != fh
        )
        close = await self._closers.close_of(handle.opener, tid, others)
        log.debug("flush: fh %d by thread %d: %s", fh, tid, close.value)
        return close

    @asynccontextmanager
    async def _turn(self, node: Node) -> AsyncIterator[None]:
        """Hold the node's turn to end (see _turns); dropped once nobody holds or awaits it."""
        turn = self._turns.setdefault(node, trio.Lock())
        try:
            async with turn:
                yield
        finally:
            if not turn.locked() and self._turns.get(node) is turn:
                del self._turns[node]

    def take(self, fh: int) -> Handle:
        """Remove a handle from the table (release), so the node may get a new writer (a
        tag's other writer, if one is open, is its writer then)."""
        handle = self.get(fh)
        del self._handles[fh]
        node = self._nodes.pop(fh)
        self._open[node] -= 1
        if not self._open[node]:
            del self._open[node]
            self._unlinked.pop(node, None)
        if (
            isinstance(handle, UploadHandle | ManifestWriter)
            and self._writers.get(handle.node) == fh
        ):
            del self._writers[handle.node]
            if isinstance(handle, ManifestHandle):
                self._stored.put(handle.node, True)
            for other_fh, other in self._handles.items():
                if isinstance(other, ManifestWriter) and other.node == handle.node:
                    self._writers[handle.node] = other_fh
        return handle

    async def release(self, handle: Handle) -> None:
        """Release a taken handle; an upload's release is waited for by `settled`, a tag's
        (what no flush stored) takes its turn."""
        if isinstance(handle, ManifestWriter):
            async with self._turn(handle.node):
                await handle.release()
            return
        if not isinstance(handle, UploadHandle):
            await handle.release()
            return
        done = self._closing[handle.node] = trio.Event()
        try:
            await handle.release()
        finally:
            done.set()
            if self._closing.get(handle.node) is done:
                del self._closing[handle.node]
            if handle.removed:
                self.tree.removed_uploads.discard(handle.node)
                self.tree.changed(handle.node)
                with trio.CancelScope(shield=True):
                    await self.tree.upload_released(handle.node)
