"""The FUSE operations: inodes and handles around the tree, every handler errno-safe.

Concurrency: pyfuse3 runs each request as a trio task, so handlers interleave at every await.
The inode table and the handle table are only touched between awaits (never across one), so
they need no lock. See docs/concurrency.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, ReaddirToken, RequestContext

from storage.api import Buffer
from storage.digests import Digest
from storage.errors import CorruptEntry, DigestMismatch
from storage.names import validate_tag

from .errors import fuse_errors
from .handles import (
    Handle,
    ManifestHandle,
    ManifestWriter,
    ReadHandle,
    TagHandle,
    UploadHandle,
    digest_name,
)
from .inodes import InodeTable
from .options import MountOptions
from .tree import (
    Attr,
    DirNode,
    LayerNode,
    ManifestNode,
    Node,
    SectionNode,
    TagNode,
    Tree,
    UploadNode,
)

log = logging.getLogger(__name__)

FOREVER = 365 * 24 * 3600.0  # digest-addressed content never changes
XATTR_PREFIX = b"user.regfs."  # every extended attribute the tree has
BLOCK_SIZE = 1 << 20  # the largest FUSE request: cp and cat size their buffers by st_blksize
# Extended attributes that carry POSIX ACLs: "not supported" (not EPERM) makes cp -p, sed -i
# and rsync fall back to a plain chmod, as on any filesystem without ACLs.
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


@dataclass
class Shown:
    """Mode, owner and mtime that chmod, chown and touch gave an upload.

    The registry's layout has no place for them, so they live in the daemon's memory while
    the upload does (a remount, or the layer it becomes, shows the mount's own again). That
    is enough for what `cp -p`, `rsync -a` and `install -m` do: set them, then stat or rename.
    An upload that ends outside this mount (the registry finishes it) leaves its few bytes
    here until the unmount.
    """

    mode: int
    uid: int
    gid: int
    mtime_ns: int | None = None  # None: the storage's (when the upload started)


class Listing:
    """A directory snapshot taken at opendir, so readdir offsets stay stable."""

    def __init__(self, entries: list[tuple[str, Node]]) -> None:
        self.entries = entries


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, tree: Tree, options: MountOptions) -> None:
        super().__init__()
        self.tree = tree
        self.options = options
        self.inodes = InodeTable()
        self._handles: dict[int, Handle | Listing] = {}
        self._writers: dict[Node, int] = {}  # one writer per upload or tag: its handle
        # Uploads whose last writer is still being released (saving its hash state, fsync,
        # unlocking): release arrives after close() has returned, so a `cp` followed at once
        # by `mv`, `rm` or another writer must wait for it instead of finding the upload busy.
        self._closing: dict[Node, trio.Event] = {}
        self._shown: dict[UploadNode, Shown] = {}
        self._next_fh = 1

    # -- helpers ---------------------------------------------------------------------------

    def _entry(self, node: Node, attr: Attr, timeout: float | None = None) -> EntryAttributes:
        entry = EntryAttributes()
        entry.st_ino = self.inodes.inode(node)
        if attr.is_dir:
            entry.st_mode = stat.S_IFDIR | self.options.dir_mode
            entry.st_nlink = 2
        else:
            entry.st_mode = stat.S_IFREG | self.options.file_mode
            entry.st_nlink = 1
        entry.st_size = attr.size
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_blksize = BLOCK_SIZE
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.mtime_ns
        entry.st_uid = self.options.uid
        entry.st_gid = self.options.gid
        shown = self._shown.get(node) if isinstance(node, UploadNode) else None
        if shown is not None:
            entry.st_mode = stat.S_IFREG | shown.mode
            entry.st_uid, entry.st_gid = shown.uid, shown.gid
            if shown.mtime_ns is not None:
                entry.st_atime_ns = entry.st_mtime_ns = shown.mtime_ns
        if timeout is None:
            timeout = FOREVER if attr.immutable else self.options.tag_ttl
            if isinstance(node, TagNode | UploadNode):
                # What can change through this mount is never cached by the kernel (the
                # daemon caches it for tag_ttl): invalidating a kernel entry takes its
                # directory's lock, which a client waiting for the daemon may hold, and a
                # daemon killed while waiting for it could never exit and free the mount.
                timeout = 0
        entry.attr_timeout = entry.entry_timeout = timeout
        if isinstance(node, LayerNode | ManifestNode):  # bytes fixed; presence not (a DELETE)
            entry.entry_timeout = 0  # so each lookup asks the daemon, which caches for tag_ttl
        return entry

    def _add_handle(self, value: Handle | Listing) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = value
        return fh

    def _refuse(self, operation: str, inode: int) -> FUSEError:
        code = errno.EROFS if self.options.read_only else errno.EPERM
        log.info("%s: refused on %s (%s)", operation, self.inodes.get(inode), errno.errorcode[code])
        return FUSEError(code)

    @staticmethod
    def _name(raw: bytes, invalid: int = errno.ENOENT) -> str:
        """A name as text; bytes that are not UTF-8 never name anything (ENOENT), and make
        no new name (pass EINVAL, as for any other invalid name)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FUSEError(invalid) from None

    # -- lookups and attributes ------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        node = await self.tree.lookup(self.inodes.node(parent_inode), self._name(name))
        entry = self._entry(node, await self.tree.attr(node))
        self.inodes.ref(entry.st_ino)
        return entry

    @fuse_errors
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        return await self._entry_of(self.inodes.node(inode))

    @fuse_errors
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        st = self.tree.registry.statvfs()
        if st is not None:
            for name in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
            ):
                setattr(data, name, getattr(st, name))
        data.f_namemax = 255
        return data

    # -- directories -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        node = self.inodes.node(inode)
        return self._add_handle(Listing(await self.tree.children(node)))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: ReaddirToken) -> None:
        listing = self._handles[fh]
        assert isinstance(listing, Listing)
        for index in range(start_id, len(listing.entries)):
            name, node = listing.entries[index]
            try:
                entry = self._entry(node, await self.tree.attr(node))
            except CorruptEntry as exc:
                # Listed, so the user sees it; uncached, so the next lookup reports EIO.
                log.error("readdir: %s: %s", name, exc)
                entry = self._entry(node, Attr(False, 0, self.tree.started_ns), timeout=0)
            except LookupError:
                continue  # gone since opendir
            if not pyfuse3.readdir_reply(token, name.encode(), entry, index + 1):
                break
            self.inodes.ref(entry.st_ino)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        del self._handles[fh]

    # -- files -----------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        node = self.inodes.node(inode)
        truncate = bool(flags & os.O_TRUNC)
        if flags & os.O_ACCMODE == os.O_RDONLY and not truncate:
            handle: Handle = ReadHandle(await self.tree.open(node))
        elif self.options.read_only:
            raise self._refuse("open", inode)
        elif isinstance(node, UploadNode):
            handle = await self._upload_writer(node, truncate)
        elif isinstance(node, TagNode):
            self._check_no_writer(node)
            handle = TagHandle(self.tree, node, b"" if truncate else await self.tree.read(node))
        else:
            raise self._refuse("open", inode)
        return self._file_info(node, handle)

    def _file_info(self, node: Node, handle: Handle) -> FileInfo:
        info = FileInfo(fh=self._add_handle(handle))
        if isinstance(handle, UploadHandle | ManifestWriter):
            self._writers[handle.node] = info.fh
        # Digest-addressed content never changes: keep its pages across opens. What moves
        # (tags, uploads, a manifest being written) is read directly, so a handle never mixes
        # old pages and new bytes.
        info.keep_cache = isinstance(node, LayerNode | ManifestNode) and isinstance(
            handle, ReadHandle
        )
        info.direct_io = not info.keep_cache
        return info

    def _check_no_writer(self, node: Node) -> None:
        if node in self._writers:
            log.info("open: %s already has a writer (EBUSY)", node)
            raise FUSEError(errno.EBUSY)

    async def _settled(self, node: Node) -> None:
        """Wait until the release of the node's last writer is done (see _closing)."""
        closing = self._closing.get(node)
        if closing is not None:
            await closing.wait()

    async def _upload_writer(self, node: UploadNode, truncate: bool) -> UploadHandle:
        self._check_no_writer(node)
        await self._settled(node)
        upload = await self.tree.resume_upload(node)
        if truncate:
            await upload.truncate(0)
        return UploadHandle(self.tree, node, upload, await self.tree.upload_name(node))

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        parent = self.inodes.node(parent_inode)
        if self.options.read_only:
            raise self._refuse("create", parent_inode)
        text = self._name(name, errno.EINVAL)
        node: UploadNode | TagNode | ManifestNode  # narrowed to the kind each case makes
        match parent:
            case SectionNode(repo, "uploads"):
                node, upload = await self.tree.create_upload(repo, text)
                handle: Handle = UploadHandle(self.tree, node, upload, text)
                attr = await self.tree.attr(node)
            case SectionNode(repo, "tags"):
                validate_tag(text)
                node = TagNode(repo, text)
                self._check_no_writer(node)
                handle = TagHandle(self.tree, node)
                attr = Attr(False, 0, time.time_ns())
            case SectionNode(repo, "manifests") if digest_name(text) is not None:
                # A manifest by digest, checked and stored on close (an index's children).
                node = ManifestNode(repo, Digest.parse(text))
                self._check_no_writer(node)
                handle = ManifestHandle(self.tree, node)
                attr = Attr(False, 0, time.time_ns())
            case _:
                raise self._refuse("create", parent_inode)
        entry = self._entry(node, attr, timeout=0)
        self.inodes.ref(entry.st_ino)
        return self._file_info(node, handle), entry

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        """pyfuse3 replies from any buffer, though its stub says bytes: a memoryview (a remote
        layer's read-ahead window) goes to the kernel without a copy."""
        return await self._handle(fh).read(off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handle(fh)
        written = await handle.write(off, buf)
        if self._shown and isinstance(handle, UploadHandle):
            shown = self._shown.get(handle.node)
            if shown is not None:
                shown.mtime_ns = None  # a write moves the mtime on, as on any filesystem
        return written

    @fuse_errors
    async def flush(self, fh: int) -> None:
        await self._handle(fh).flush()

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._handle(fh)
        del self._handles[fh]
        if (
            isinstance(handle, UploadHandle | ManifestWriter)
            and self._writers.get(handle.node) == fh
        ):
            del self._writers[handle.node]
        if not isinstance(handle, UploadHandle):
            await handle.release()
            return
        if handle.finished:
            self._forget_shown(handle.node)
        done = self._closing[handle.node] = trio.Event()
        try:
            await handle.release()
        finally:
            done.set()
            if self._closing.get(handle.node) is done:
                del self._closing[handle.node]

    def _handle(self, fh: int) -> Handle:
        handle = self._handles.get(fh)
        if not isinstance(handle, Handle):
            raise FUSEError(errno.EBADF)
        return handle

    # -- extended attributes ---------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        if not name.startswith(XATTR_PREFIX):
            # `ls -l` asks every file for security.selinux and ACLs: answer without storage.
            raise FUSEError(pyfuse3.ENOATTR)
        xattrs = await self.tree.xattrs(self.inodes.node(inode))
        try:
            return xattrs[name.decode("utf-8", "replace")]
        except KeyError:
            raise FUSEError(pyfuse3.ENOATTR) from None

    @fuse_errors
    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return [name.encode() for name in await self.tree.xattrs(self.inodes.node(inode))]

    # -- changing the tree ------------------------------------------------------------------

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        """chmod, chown, touch, truncate. What changes nothing succeeds anywhere (cp -p and
        rsync -a set what is already shown); a real change only on an upload (see Shown).
        The times of a tag, or of a manifest being written, are accepted and ignored (they
        say when it was stored): `cp -p` sets them before close."""
        node = self.inodes.node(inode)
        if self.options.read_only:
            raise self._refuse("setattr", inode)
        now = await self._entry_of(node)
        mode = stat.S_IMODE(attr.st_mode if fields.update_mode else now.st_mode)
        uid = attr.st_uid if fields.update_uid else now.st_uid
        gid = attr.st_gid if fields.update_gid else now.st_gid
        owner = (mode, uid, gid) != (stat.S_IMODE(now.st_mode), now.st_uid, now.st_gid)
        retimed = (fields.update_mtime and attr.st_mtime_ns != now.st_mtime_ns) or (
            fields.update_atime and attr.st_atime_ns != now.st_atime_ns
        )
        writer = self._handles.get(self._writers.get(node, 0))
        fixed_times = not isinstance(node, TagNode) and not isinstance(writer, ManifestWriter)
        if not isinstance(node, UploadNode) and (owner or (retimed and fixed_times)):
            log.info(
                "setattr: refused on %s: it keeps the mount's mode %o, owner %d:%d and times"
                " (EPERM)",
                node,
                stat.S_IMODE(now.st_mode),
                now.st_uid,
                now.st_gid,
            )
            raise FUSEError(errno.EPERM)
        if fields.update_size:
            await self._truncate(node, inode, attr.st_size, fh)
        if isinstance(node, UploadNode) and (owner or retimed):
            before = self._shown.get(node)
            mtime = attr.st_mtime_ns if fields.update_mtime else None
            if mtime is None and before is not None:
                mtime = before.mtime_ns
            self._shown[node] = Shown(mode, uid, gid, mtime)
        return await self._entry_of(node)

    async def _entry_of(self, node: Node) -> EntryAttributes:
        """What getattr answers: a writer's pending size, else the storage's."""
        writer = self._handles.get(self._writers.get(node, 0))
        pending = writer.pending_attr() if isinstance(writer, Handle) else None
        if pending is not None:
            return self._entry(node, pending, timeout=0)
        return self._entry(node, await self.tree.attr(node))

    def _forget_shown(self, node: Node) -> None:
        """An upload that ended (finished, cancelled, replaced) takes its Shown along."""
        if isinstance(node, UploadNode):
            self._shown.pop(node, None)

    async def _truncate(self, node: Node, inode: int, size: int, fh: int | None) -> None:
        handle = self._handles.get(fh) if fh is not None else None
        if handle is None and isinstance(node, UploadNode):
            handle = self._handles.get(self._writers.get(node, -1))
        if isinstance(handle, Handle):
            await handle.truncate(size)
        elif isinstance(node, UploadNode):
            await self._truncate_upload(node, size)
        else:
            raise self._refuse("truncate", inode)

    async def _truncate_upload(self, node: UploadNode, size: int) -> None:
        """truncate(2) by path with no writer open: like ftruncate, shrink only. The storage
        writer is exclusive (flock), so a writer opened meanwhile gets EBUSY."""
        await self._settled(node)
        upload = await self.tree.resume_upload(node)
        try:
            await upload.truncate(size)
        finally:
            with trio.CancelScope(shield=True):  # never leave the upload locked
                await upload.close()

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        if self.options.read_only:
            raise self._refuse("unlink", parent_inode)
        node = await self.tree.lookup(self.inodes.node(parent_inode), self._name(name))
        if node in self._writers:
            log.info("unlink: upload %s is open for writing (EBUSY)", node)
            raise FUSEError(errno.EBUSY)
        await self._settled(node)
        await self.tree.remove(node)
        self._forget_shown(node)
        log.info("unlink: removed %s", node)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        """Within uploads/: rename the upload; into layers/<digest>: verify and finish it."""
        if self.options.read_only:
            raise self._refuse("rename", parent_inode_old)
        if flags & ~pyfuse3.RENAME_NOREPLACE:
            # RENAME_EXCHANGE, RENAME_WHITEOUT: taken for a plain rename, an exchange would
            # silently cancel the upload it was meant to keep.
            log.info("rename: flags %#x are not supported (EINVAL)", flags)
            raise FUSEError(errno.EINVAL)
        old_parent = self.inodes.node(parent_inode_old)
        new_parent = self.inodes.node(parent_inode_new)
        node = await self.tree.lookup(old_parent, self._name(name_old))
        if isinstance(node, TagNode) and new_parent == SectionNode(node.repo, "tags"):
            await self._retag(node, self._name(name_new, errno.EINVAL), flags)
            return
        same_repo = (
            isinstance(old_parent, SectionNode)
            and isinstance(new_parent, SectionNode)
            and new_parent.repo == old_parent.repo
        )
        if not isinstance(node, UploadNode) or not same_repo:
            log.info(
                "rename: only an upload can be renamed, within uploads/ or into layers/ "
                "of its repository (EPERM): %s -> %s",
                node,
                new_parent,
            )
            raise FUSEError(errno.EPERM)
        if node in self._writers:
            log.info("rename: upload %s is open for writing (EBUSY)", node.uuid)
            raise FUSEError(errno.EBUSY)
        await self._settled(node)
        assert isinstance(new_parent, SectionNode)
        target = self._name(name_new, errno.EINVAL)
        if new_parent.section == "layers":
            await self._finish_by_rename(node, Digest.parse(target), parent_inode_old)
            return
        if new_parent.section != "uploads":
            raise self._refuse("rename", parent_inode_new)
        existing = (await self.tree.uploads(node.repo)).get(target)
        if existing is not None and existing != node.uuid:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            if UploadNode(node.repo, existing) in self._writers:
                raise FUSEError(errno.EBUSY)
            await self._settled(UploadNode(node.repo, existing))
        expected = digest_name(target)
        if expected is not None:
            await self._finish_by_rename(node, expected, parent_inode_old)
        else:
            await self.tree.rename_upload(node, target)
        if existing is not None and existing != node.uuid:
            await self.tree.remove(UploadNode(node.repo, existing))
            self._forget_shown(UploadNode(node.repo, existing))

    async def _retag(self, node: TagNode, name: str, flags: int) -> None:
        """mv tags/tmp tags/v1: v1 points at tmp's manifest, then tmp goes. The tag's link is
        replaced atomically, so a reader sees v1's old manifest or the new one, never none:
        how `sed -i` and editors that save by rename retag."""
        validate_tag(name)
        if name == node.tag:
            return
        target = TagNode(node.repo, name)
        if flags & pyfuse3.RENAME_NOREPLACE:
            with contextlib.suppress(LookupError):
                await self.tree.lookup(SectionNode(node.repo, "tags"), name)
                raise FUSEError(errno.EEXIST)
        # The manifest is stored already: only the tag's link moves (no second check of it).
        tags = self.tree.registry.repository(node.repo).tags
        digest = await tags.get(node.tag)
        await tags.put(name, digest)
        self.tree.changed(target)
        await self.tree.remove(node)
        # The kernel moves its dentry to the new name with the old inode number.
        ino = self.inodes.known(node)
        if ino is not None:
            self.inodes.rebind(ino, target)
        log.info(
            "rename: tag %s:%s now points at %s (from tag %s)", node.repo, name, digest, node.tag
        )

    async def _finish_by_rename(self, node: UploadNode, digest: Digest, inode: int) -> None:
        upload = await self.tree.resume_upload(node)
        try:
            await self.tree.finish_upload(node, upload, digest)
        except BaseException as exc:
            if isinstance(exc, DigestMismatch):
                log.warning("rename: upload %s not finished: %s; it stays", node.uuid, exc)
            with trio.CancelScope(shield=True):  # never leave the upload locked
                await upload.close()
            raise
        self._forget_shown(node)  # a layer shows the mount's mode and owner
        # The kernel moves its dentry to the new name with the upload's inode number: let
        # that number stand for the layer it became.
        ino = self.inodes.known(node)
        if ino is not None:
            self.inodes.rebind(ino, LayerNode(node.repo, digest))

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        if self.options.read_only or not isinstance(parent, DirNode):
            raise self._refuse("mkdir", parent_inode)
        node = await self.tree.mkdir(parent, self._name(name, errno.EINVAL))
        entry = self._entry(node, await self.tree.attr(node))
        self.inodes.ref(entry.st_ino)
        log.info("mkdir: created repository %s", node.path)
        return entry

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        parent = self.inodes.node(parent_inode)
        if self.options.read_only or not isinstance(parent, DirNode):
            raise self._refuse("rmdir", parent_inode)
        node = await self.tree.rmdir(parent, self._name(name))
        log.info("rmdir: removed repository %s", node.path)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        if name in ACL_XATTRS and not self.options.read_only:
            raise FUSEError(errno.EOPNOTSUPP)
        raise self._refuse("setxattr", inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        raise self._refuse("removexattr", inode)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        raise self._refuse("mknod", parent_inode)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        raise self._refuse("link", inode)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryAttributes:
        raise self._refuse("symlink", parent_inode)
