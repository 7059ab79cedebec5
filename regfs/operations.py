"""The FUSE operations: inodes and handles around the tree, every handler errno-safe.

Concurrency: pyfuse3 runs each request as a trio task, so handlers interleave at every await.
The inode table and the handle table are only touched between awaits (never across one), so
they need no lock. See docs/concurrency.md.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, ReaddirToken, RequestContext

from storage.drivers import FilesystemDriver
from storage.errors import CorruptEntry

from .errors import fuse_errors
from .inodes import InodeTable
from .options import MountOptions
from .tree import Attr, LayerNode, ManifestNode, Node, Reader, Tree

log = logging.getLogger(__name__)

FOREVER = 365 * 24 * 3600.0  # digest-addressed content never changes
BLOCK_SIZE = 128 << 10  # FUSE reads arrive in 128 KiB pieces: tools that follow st_blksize match


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
        self._handles: dict[int, Reader | Listing] = {}
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
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = int(attr.mtime * 1e9)
        entry.st_uid = self.options.uid
        entry.st_gid = self.options.gid
        if timeout is None:
            timeout = FOREVER if attr.immutable else self.options.tag_ttl
        entry.attr_timeout = entry.entry_timeout = timeout
        return entry

    def _add_handle(self, value: Reader | Listing) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = value
        return fh

    def _refuse(self, operation: str, inode: int) -> FUSEError:
        code = errno.EROFS if self.options.read_only else errno.EPERM
        log.info("%s: refused on %s (%s)", operation, self.inodes.get(inode), errno.errorcode[code])
        return FUSEError(code)

    @staticmethod
    def _name(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FUSEError(errno.ENOENT) from None

    # -- lookups and attributes ------------------------------------------------------------

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        node = await self.tree.lookup(self.inodes.node(parent_inode), self._name(name))
        entry = self._entry(node, await self.tree.attr(node))
        self.inodes.ref(entry.st_ino)
        return entry

    @fuse_errors
    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        node = self.inodes.node(inode)
        return self._entry(node, await self.tree.attr(node))

    @fuse_errors
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @fuse_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        driver = self.tree.registry.driver
        if isinstance(driver, FilesystemDriver):
            st = os.statvfs(driver.root)
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
                entry = self._entry(node, Attr(False, 0, self.tree.started), timeout=0)
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
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise self._refuse("open", inode)
        node = self.inodes.node(inode)
        reader = await self.tree.open(node)
        info = FileInfo(fh=self._add_handle(reader))
        # Digest-addressed content never changes: keep its pages across opens. What moves
        # (tags, uploads) is read directly, so a handle never mixes old pages and new bytes.
        info.keep_cache = isinstance(node, LayerNode | ManifestNode)
        info.direct_io = not info.keep_cache
        return info

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        reader = self._handles[fh]
        assert not isinstance(reader, Listing)
        return await reader.read_at(off, size)

    @fuse_errors
    async def release(self, fh: int) -> None:
        reader = self._handles.pop(fh)
        assert not isinstance(reader, Listing)
        await reader.aclose()

    @fuse_errors
    async def flush(self, fh: int) -> None:
        pass

    # -- extended attributes ---------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        xattrs = await self.tree.xattrs(self.inodes.node(inode))
        try:
            return xattrs[name.decode("utf-8", "replace")]
        except KeyError:
            raise FUSEError(pyfuse3.ENOATTR) from None

    @fuse_errors
    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return [name.encode() for name in await self.tree.xattrs(self.inodes.node(inode))]

    # -- everything that writes: refused until uploads land ---------------------------------

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        raise self._refuse("setattr", inode)

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        raise self._refuse("setxattr", inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: RequestContext) -> None:
        raise self._refuse("removexattr", inode)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        raise self._refuse("create", parent_inode)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        raise self._refuse("mknod", parent_inode)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        raise self._refuse("mkdir", parent_inode)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        raise self._refuse("unlink", parent_inode)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: RequestContext) -> None:
        raise self._refuse("rmdir", parent_inode)

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
        raise self._refuse("rename", parent_inode_old)

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

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise self._refuse("write", 0)
