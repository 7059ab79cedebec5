"""The FUSE operations: each handler resolves inodes and names, then hands the request to the
module whose job it is (docs/architecture.md). Every handler is errno-safe (`fuse_errors`).

Concurrency: pyfuse3 runs each request as a trio task, so handlers interleave at every await.
The inode table and the handle tables are only touched between awaits (never across one), so
they need no lock. See docs/concurrency.md.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Sequence

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, ReaddirToken, RequestContext

from storage.api import Buffer

from . import fusefeatures
from .attributes import BLOCK_SIZE, Attributes
from .directories import Directories
from .errors import fuse_errors
from .handles import UploadHandle
from .inodes import InodeTable, inode_key
from .nodes import Attr, DirNode, Node, SectionNode, TagNode, UploadNode
from .openfiles import OpenFiles
from .options import MountOptions
from .refusals import decode_name, refusal
from .renames import Renames
from .tree import Tree
from .xattrs import Xattrs

log = logging.getLogger(__name__)

# What statfs says of a source that has no space to tell (an https:// registry, S3): every
# local filesystem gives block sizes, and tools divide by them; free space unknown is
# better said as plenty (1 PiB, as rclone says) than as none.
_UNKNOWN_FRSIZE = 4096
_UNKNOWN_SPACE = 1 << 50
_UNKNOWN_FILES = 1 << 32


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    # The kernel keeps what readlink answered (regfs's pyfuse3 build; a stock one ignores it):
    # the only links are inside images (rootfs/), whose members never change.
    enable_cache_symlinks = True

    def __init__(self, tree: Tree, options: MountOptions) -> None:
        super().__init__()
        self.tree = tree
        self.options = options
        # `--plain-readdir` (regfs's pyfuse3 build reads it at init): the rest of a plain `ls`
        # or `find` in READDIRs by name (`Directories._reply_plain`). Off by default: `ls` of
        # 10,000 tags 52-60 -> 24-27 ms, but a cold `find` of an image 334-359 -> 383-436 ms,
        # its subdirectories listed without attributes looked up one by one (547 LOOKUPs).
        self.enable_readdirplus_auto = options.plain_readdir
        self.inodes = InodeTable(inode_key())
        self.files = OpenFiles(tree, options)
        self.attributes = Attributes(tree, options, self.inodes, self.files)
        self.directories = Directories(tree, self.inodes, self.attributes)
        self.renames = Renames(tree, self.inodes, self.files, self.attributes)
        self.xattrs = Xattrs(tree, self.inodes)

    def _refuse(self, operation: str, inode: int) -> FUSEError:
        return refusal(operation, self.inodes.get(inode), self.options.read_only)

    # -- lookups and attributes ------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        node = await self._named(parent, decode_name(name))
        entry = await self.directories.entry_of(node)  # a tag being written: its pending size
        self.inodes.ref(entry.st_ino)
        self.directories.entries_used(parent)
        return entry

    async def _named(self, parent: Node, name: str) -> Node:
        """The node `name` in parent: what the tree has, or a tag or manifest being written,
        which exists from its create on, as on any filesystem (a second O_CREAT|O_EXCL is
        EEXIST: the lock-file idiom; rm and mv of it are EBUSY until its writer closes)."""
        try:
            return await self.tree.lookup(parent, name)
        except LookupError:  # NotFound, UnknownTag, UnknownManifest...
            written = self.files.being_written(parent, name)
            if written is None:
                raise
            return written

    def getattr_kept(self, inode: int) -> EntryAttributes | None:
        """GETATTR of an image's directory (its atime, after each READDIR of it) answered
        without a coroutine, on regfs's pyfuse3 build (`fusefeatures.GETATTR_KEPT`)."""
        return self.inodes.fixed(inode)

    @fuse_errors
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        fixed = self.inodes.fixed(inode)  # what getattr_kept answers on regfs's build
        if fixed is not None:
            return fixed
        node = self.inodes.node(inode)
        entry = await self.directories.entry_of(node)
        if isinstance(node, DirNode) and entry.st_nlink == 1:  # its subdirectories unknown
            entry.st_nlink = await self.tree.counted_nlink(node)
        return entry

    @fuse_errors
    async def readlink(self, inode: int, ctx: RequestContext) -> bytes:
        """A view's symlink (rootfs/): its target is its content."""
        return await self.tree.read(self.inodes.node(inode))

    @fuse_errors
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            node = self.inodes.get(inode)
            self.inodes.forget(inode, count)
            if node is not None and self.inodes.get(inode) is None:
                self.directories.forgotten(node)

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        st = self.tree.registry.statvfs()
        if st is None:  # a registry over HTTP, S3: no space to tell; plenty, as rclone says
            data.f_bsize, data.f_frsize = BLOCK_SIZE, _UNKNOWN_FRSIZE
            data.f_blocks = data.f_bfree = data.f_bavail = _UNKNOWN_SPACE // _UNKNOWN_FRSIZE
            data.f_files = data.f_ffree = data.f_favail = _UNKNOWN_FILES
        else:
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

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        """chmod, chown, touch (regfs/attributes.py), truncate (regfs/openfiles.py)."""
        node = self.inodes.node(inode)
        if self.options.read_only:
            raise self._refuse("setattr", inode)
        shown = await self.attributes.check_change(node, attr, fields)
        if fields.update_size:
            await self.files.truncate(node, attr.st_size, fh)
        if shown is not None:
            self.attributes.show(node, shown)
        return await self.attributes.entry_of(node)

    # -- directories -----------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        """ENOSYS with regfs's pyfuse3 build: Linux then sends no OPENDIR or RELEASEDIR again
        and keeps every listing (regfs/listings.py; readdir finds its directory by the
        token's inode). A stock pyfuse3 cannot tell readdir the inode: the handle is the
        inode, and the kernel reads every listing from the daemon."""
        if fusefeatures.PATCHED:
            raise FUSEError(errno.ENOSYS)
        self.inodes.node(inode)  # ESTALE if unknown
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: ReaddirToken) -> None:
        inode = token.inode if fusefeatures.PATCHED else fh
        await self.directories.read(self.inodes.node(inode), start_id, token)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        """Nothing to release: a handle is an inode (a stock pyfuse3 only)."""

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        parent = self.inodes.node(parent_inode)
        if self.options.read_only or not isinstance(parent, DirNode):
            raise self._refuse("mkdir", parent_inode)
        entry = await self.directories.make(parent, decode_name(name, errno.EINVAL))
        self.tree.kept.kernel_changed(parent)
        return entry

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        parent = self.inodes.node(parent_inode)
        if self.options.read_only or not isinstance(parent, DirNode):
            raise self._refuse("rmdir", parent_inode)
        await self.directories.remove(parent, decode_name(name))
        self.tree.kept.kernel_changed(parent)

    # -- files -----------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        node = self.inodes.node(inode)
        handle = await self.files.open(node, flags)
        if isinstance(handle, UploadHandle) and handle.node != node:
            self.inodes.rebind(inode, handle.node)  # a finished upload's name begun again
        self.files.opened_by(handle, ctx, inode)
        return self.files.add(node, handle)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        parent = self.inodes.node(parent_inode)
        if self.options.read_only:
            raise self._refuse("create", parent_inode)
        if (
            flags & (os.O_ACCMODE | os.O_TRUNC) == os.O_RDONLY
            and isinstance(parent, SectionNode)
            and parent.section == "uploads"
        ):
            # `flock FILE` (O_RDONLY|O_CREAT): an empty upload, opened by a reader, which
            # holds no writer's place (SPEC 5: one writer), so `cmd >> FILE` can write next.
            upload, made = await self.files.make_upload(parent, decode_name(name, errno.EINVAL))
            reader = await self.files.open(upload, os.O_RDONLY)
            entry = self.attributes.entry(upload, made, timeout=0)
            self.inodes.ref(entry.st_ino)
            return self.files.add(upload, reader), entry
        node, handle, attr = await self.files.create(parent, decode_name(name, errno.EINVAL))
        entry = self.attributes.entry(node, attr, timeout=0)
        self.inodes.ref(entry.st_ino)
        self.files.opened_by(handle, ctx, entry.st_ino)
        return self.files.add(node, handle), entry

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> Buffer:  # type: ignore[override]
        """pyfuse3 replies from any buffer, though its stub says bytes: a memoryview (a remote
        layer's read-ahead window) goes to the kernel without a copy.

        What an open file reads from may go (a blob deleted on a registry, a cache file
        removed): that is EIO, logged, as a disk's failure is; ENOENT would say that the
        name is gone, which a read cannot."""
        try:
            return await self.files.get(fh).read(off, size)
        except (LookupError, FileNotFoundError) as exc:
            log.error("read: %s (EIO)", exc)
            raise FUSEError(errno.EIO) from None

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.files.get(fh)
        if isinstance(handle, UploadHandle) and handle.finished:
            # A shared map's stores after the close that finished (or cancelled) the upload,
            # written back at its munmap: the layer it became never changes.
            log.warning(
                "write: upload %s has ended (finished or cancelled): %d bytes at %d not "
                "written (EBADF; a store into a map after its last close?)",
                handle.name,
                len(buf),
                off,
            )
            raise FUSEError(errno.EBADF)
        written = await handle.write(off, buf)
        if isinstance(handle, UploadHandle):
            self.attributes.written(handle.node)
        return written

    @fuse_errors
    async def flush(self, fh: int) -> None:
        """close(2) on a stock pyfuse3, which does not tell who closes (regfs/closers.py)."""
        await self.files.flush(fh, None)

    @fuse_errors
    async def flush_closer(self, fh: int, ctx: RequestContext, lock_owner: int) -> None:
        """close(2) by thread ctx.pid (regfs's pyfuse3 build): only the opener's last close
        ends a file being written (regfs/closers.py)."""
        await self.files.flush(fh, ctx.pid)

    @fuse_errors
    async def release(self, fh: int) -> None:
        """The last reference is gone: what no flush ended ends here (errors logged)."""
        handle = self.files.take(fh)
        await self.files.release(handle)
        if isinstance(handle, UploadHandle) and handle.finished:
            self.attributes.forget_shown(handle.node)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """fsync(2) and fdatasync(2) of an upload being written return once every byte
        written before is in storage (the driver's sync, as at close: a local file's fsync,
        a remote or S3 upload's tail sent), and report a failed write. Without this handler
        Linux took pyfuse3's ENOSYS as success: `dd conv=fsync` returned with bytes still in
        flight. A tag's writer holds its bytes in memory until its last close stores them:
        its fsync answers at once, having stored nothing."""
        handle = self.files.get(fh)
        if isinstance(handle, UploadHandle) and not handle.finished:
            await handle.upload.flush()

    # -- names that go -----------------------------------------------------------------------

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        if self.options.read_only:
            raise self._refuse("unlink", parent_inode)
        parent = self.inodes.node(parent_inode)
        node = await self._named(parent, decode_name(name))
        if not isinstance(node, UploadNode) and self.files.is_written(node):
            # A tag or manifest: its writer stores it at its close.
            log.info("unlink: %s is open for writing (EBUSY)", node)
            raise FUSEError(errno.EBUSY)
        if (
            isinstance(parent, SectionNode)
            and parent.section == "uploads"
            and (layer := self.files.writes_a_layer(node))
        ):
            # Its own name, layers/<digest>, is unlinked as any file being written.
            log.info("unlink: %s is layers/%s being written (EBUSY)", node, layer)
            raise FUSEError(errno.EBUSY)
        if isinstance(node, UploadNode) and self.files.is_written(node):
            # What its writer has, not storage's: its last close may be finishing it now
            # (named by its digest), and then storage has it no more.
            writer = self.files.writer(node)
            pending = writer.pending_attr() if writer is not None else None
            self.files.remove_written(node, pending or Attr(False, 0, time.time_ns()))
            self.attributes.forget_shown(node)
            log.info("unlink: removed %s; its writer's last close cancels it", node)
            return
        # What a descriptor still open reads and fstat says once the name is gone, as on
        # any filesystem: what the file is now, with st_nlink 0 (`Attributes.entry_of`).
        attr = await self.tree.attr(node) if self.files.is_open(node) else None
        await self.files.settled(node)
        try:
            # What it took is remembered a while for this process's own create (cp -f).
            await self.tree.remove(node, unlinked_by=self.files.process_of(ctx))
        except LookupError:
            if not isinstance(node, UploadNode):
                raise
            # Its writer's last close finished it meanwhile (named by its digest): the name
            # is the layer's now (`FinishedNode`), and goes as that, as rm of a file racing
            # its writer's close removes the name whichever came first.
            node = await self._named(parent, decode_name(name))
            await self.tree.remove(node)
        if attr is not None:
            self.files.unlinked(node, attr)
        self.attributes.forget_shown(node)
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
        if self.options.read_only:
            raise self._refuse("rename", parent_inode_old)
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE):
            # RENAME_WHITEOUT: taken for a plain rename, it would silently cancel the upload
            # it was meant to keep.
            log.info("rename: flags %#x are not supported (EINVAL)", flags)
            raise FUSEError(errno.EINVAL)
        old_parent = self.inodes.node(parent_inode_old)
        new_parent = self.inodes.node(parent_inode_new)
        node = await self._named(old_parent, decode_name(name_old))
        if isinstance(node, TagNode) and self.files.is_written(node):
            log.info("rename: %s is open for writing (EBUSY)", node)  # stored at its close
            raise FUSEError(errno.EBUSY)
        if flags & pyfuse3.RENAME_EXCHANGE:
            await self.renames.exchange(node, old_parent, new_parent, name_new)
            return
        await self.renames.rename(node, old_parent, new_parent, name_new, flags)

    # -- extended attributes ---------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        return await self.xattrs.get(inode, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return await self.xattrs.names(inode)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        self.xattrs.check_set(inode, name, self.options.read_only)
        raise self._refuse("setxattr", inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        await self.xattrs.remove(inode, name, self.options.read_only)

    # -- what the mount never does ---------------------------------------------------------

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        """mknod(S_IFREG) in uploads/ makes an empty upload, as open(O_CREAT) and close would
        (GNU tar --xattrs makes a file so, sets its xattrs, then opens it to write). The
        mode given is the mount's, as for a create. Any other node is refused."""
        parent = self.inodes.node(parent_inode)
        if (
            self.options.read_only
            or not stat.S_ISREG(mode)
            or not isinstance(parent, SectionNode)
            or parent.section != "uploads"
        ):
            raise self._refuse("mknod", parent_inode)
        node, attr = await self.files.make_upload(parent, decode_name(name, errno.EINVAL))
        entry = self.attributes.entry(node, attr, timeout=0)
        self.inodes.ref(entry.st_ino)
        return entry

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
