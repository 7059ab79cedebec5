"""Extended attributes: the tree's own (`user.regfs.*`, read-only) and the answers that let
`ls -l`, `cp -p` and `rsync -X` go on without asking storage."""

from __future__ import annotations

import errno
import logging
import os

import pyfuse3
from pyfuse3 import FUSEError

from .inodes import InodeTable
from .nodes import REGISTRY_KINDS, ROOT, Node, TagNode, UploadNode
from .refusals import refusal
from .tree import Tree

log = logging.getLogger(__name__)

XATTR_PREFIX = b"user.regfs."  # every extended attribute the tree has
# Extended attributes that carry POSIX ACLs: "not supported" (not EPERM) makes cp -p, sed -i
# and rsync fall back to a plain chmod, as on any filesystem without ACLs.
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
# What `ls -l` asks of every file. "Not supported" (EOPNOTSUPP), not "no such attribute"
# (ENODATA): coreutils' ls then stops asking for the rest of the device (getfilecon_cache,
# file_has_acl_cache), which saves two FUSE round trips per listed file.
UNSUPPORTED_PREFIX = b"security."
SELINUX = b"security.selinux"
# On the mount's root: how many inodes the daemon holds for the kernel (its lookup counts
# not yet forgotten), the root included. A user watching memory, and the tests, can see
# from outside that what the kernel lets go the daemon lets go too (no count leaks).
INODES_XATTR = "user.regfs.inodes"


class Xattrs:
    def __init__(self, tree: Tree, inodes: InodeTable) -> None:
        self.tree = tree
        self.inodes = inodes

    async def get(self, inode: int, name: bytes) -> bytes:
        node = self.inodes.node(inode)
        if not name.startswith(XATTR_PREFIX) and isinstance(node, REGISTRY_KINDS):
            # `ls -l` asks every file for security.selinux and ACLs: answer without storage.
            # A view's files may have any name (an image's files keep their tar xattrs).
            if name in ACL_XATTRS or name.startswith(UNSUPPORTED_PREFIX):
                raise FUSEError(errno.EOPNOTSUPP)
            raise FUSEError(pyfuse3.ENOATTR)
        xattrs = await self._of(node)
        try:
            return xattrs[os.fsdecode(name)]
        except KeyError:
            if name == SELINUX or name in ACL_XATTRS:
                # A view's file without it (rootfs/ never shows a label; an ACL only from
                # an image's tar): "not supported" too, so `ls -l` stops asking. One cost:
                # ls then shows no `+` for a later file of the mount that has an ACL.
                raise FUSEError(errno.EOPNOTSUPP) from None
            raise FUSEError(pyfuse3.ENOATTR) from None

    async def remove(self, inode: int, name: bytes, read_only: bool) -> None:
        """removexattr: what a local filesystem answers, so that `setfattr -x` and `rsync
        -X` (which removes from its copy each xattr its source lacks) go on: a name the
        file does not have is ENODATA (ENOTSUP for ACLs and security.*, as `get` says);
        one of the tree's own (`user.regfs.*`, what the registry holds, computed at each
        read) is accepted and ignored, as a tag's times are; an image's own xattrs
        (rootfs/) are refused, as the rest of a view."""
        if read_only:
            raise refusal("removexattr", self.inodes.get(inode), read_only)
        node = self.inodes.node(inode)
        if isinstance(node, REGISTRY_KINDS) and (
            name in ACL_XATTRS or name.startswith(UNSUPPORTED_PREFIX)
        ):
            raise FUSEError(errno.EOPNOTSUPP)
        if os.fsdecode(name) not in await self._of(node):
            raise FUSEError(pyfuse3.ENOATTR)
        if not name.startswith(XATTR_PREFIX):
            raise refusal("removexattr", node, read_only)
        log.debug("removexattr: %s of %s accepted and ignored (computed)", name, node)

    async def names(self, inode: int) -> list[bytes]:
        return [os.fsencode(name) for name in await self._of(self.inodes.node(inode))]

    async def _of(self, node: Node) -> dict[str, bytes]:
        if node == ROOT:
            return {INODES_XATTR: str(len(self.inodes)).encode()}
        return await self.tree.xattrs(node)

    def check_set(self, inode: int, name: bytes, read_only: bool) -> None:
        """Setting an ACL is "not supported", and so is a user.* name of a file being written
        (an upload or a tag: neither keeps one; the tree's own user.regfs.* included), as on
        a filesystem without user xattrs: `mv` and `cp -a` of a downloaded file
        (user.xdg.origin.url), or of an upload to another repository, then go on in
        silence, where EPERM made them warn. The caller refuses every other name."""
        if read_only:
            return
        written = isinstance(self.inodes.node(inode), UploadNode | TagNode)
        if name in ACL_XATTRS or (name.startswith(b"user.") and written):
            raise FUSEError(errno.EOPNOTSUPP)
