"""rename(2): an upload renamed within uploads/ or finished by a rename into layers/ (or to
its digest), a tag moved within tags/ (retag), and a finished upload's name (`FinishedNode`)
moved into layers/ or copied elsewhere. Nothing else moves."""

from __future__ import annotations

import contextlib
import errno
import logging

import pyfuse3
import trio
from pyfuse3 import FUSEError

from storage.digests import Digest
from storage.errors import DigestMismatch
from storage.names import validate_tag

from .attributes import Attributes
from .handles import UploadHandle
from .inodes import InodeTable
from .nodes import FinishedNode, LayerNode, Node, SectionNode, TagNode, UploadNode, digest_name
from .openfiles import OpenFiles
from .refusals import decode_name, refusal
from .tree import Tree

log = logging.getLogger(__name__)


class Renames:
    def __init__(
        self, tree: Tree, inodes: InodeTable, files: OpenFiles, attributes: Attributes
    ) -> None:
        self.tree = tree
        self.inodes = inodes
        self.files = files
        self.attributes = attributes

    async def rename(
        self, node: Node, old_parent: Node, new_parent: Node, new_name: bytes, flags: int
    ) -> None:
        """Within uploads/: rename the upload; into layers/<digest>: verify and finish it.
        `flags` is what rename(2) passed (RENAME_NOREPLACE or 0)."""
        if isinstance(node, FinishedNode):
            await self._move_finished(node, new_parent, decode_name(new_name, errno.EINVAL))
            return
        if (
            isinstance(node, UploadNode | TagNode)
            and isinstance(old_parent, SectionNode)
            and isinstance(new_parent, SectionNode)
            and new_parent.section == old_parent.section
            and new_parent.repo != old_parent.repo
        ):
            # As between two filesystems: mv then copies it and removes the original (the
            # copy is checked, or finished, as any other write into that section).
            log.info("rename: %s to another repository (EXDEV): %s", node, new_parent)
            raise FUSEError(errno.EXDEV)
        if isinstance(node, TagNode) and new_parent == SectionNode(node.repo, "tags"):
            await self._retag(node, decode_name(new_name, errno.EINVAL), flags)
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
        assert isinstance(new_parent, SectionNode)
        target = decode_name(new_name, errno.EINVAL)
        if layer := self.files.writes_a_layer(node):
            log.info("rename: %s is layers/%s being written (EBUSY)", node, layer)
            raise FUSEError(errno.EBUSY)
        if self.files.is_written(node) and (
            new_parent.section != "uploads" or digest_name(target) is not None
        ):
            # A finish by rename verifies every byte, and the writer may still send more:
            # the same mv succeeds once it has closed (a within-uploads/ rename does now).
            log.info("rename: upload %s is open for writing, no finish (EBUSY)", node.uuid)
            raise FUSEError(errno.EBUSY)
        await self.files.settled(node)
        if new_parent.section == "layers":
            await self._finish(node, Digest.parse(target), named=False)
            return
        if new_parent.section != "uploads":
            raise refusal("rename", new_parent, read_only=False)
        existing = (await self.tree.uploads(node.repo)).get(target)
        replaced = None
        if existing is not None and existing != node.uuid:
            replaced = UploadNode(node.repo, existing)
        written = False
        if replaced is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                log.info("rename: uploads/%s exists (EEXIST, RENAME_NOREPLACE)", target)
                raise FUSEError(errno.EEXIST)
            if layer := self.files.writes_a_layer(replaced):
                log.info("rename: %s is layers/%s being written (EBUSY)", replaced, layer)
                raise FUSEError(errno.EBUSY)
            written = self.files.is_written(replaced)
            if written:
                # As rm of it: the name goes now and its writer writes on, its last close
                # cancelling it (README). Hidden first, so that no listing meanwhile shows
                # two uploads of one name; shown again if the rename fails.
                self.files.remove_written(replaced)
            else:
                await self.files.settled(replaced)
        try:
            expected = digest_name(target)
            if expected is not None:
                await self._finish(node, expected, named=True)
            else:
                await self._rename_upload(node, target)
        except BaseException:
            if written:
                assert replaced is not None
                self.files.restore_written(replaced)
            raise
        if replaced is not None:
            if written:
                log.info("rename: replaced %s; its writer's last close cancels it", replaced)
            else:
                await self.tree.remove(replaced)
            self.attributes.forget_shown(replaced)

    async def _rename_upload(self, node: UploadNode, name: str) -> None:
        """Rename within uploads/; a writer, if one holds it, writes on under the new name,
        given before the storage is (a last close that comes meanwhile must see it: under
        the old digest name it would finish the upload the mv renames), taken back if the
        rename fails."""
        writer = self.files.writer(node)
        before = writer.name if isinstance(writer, UploadHandle) else None
        self.files.renamed(node, name)
        try:
            await self.tree.rename_upload(node, name)
        except BaseException:
            if before is not None:
                self.files.renamed(node, before)
            raise

    async def _retag(self, node: TagNode, name: str, flags: int) -> None:
        """mv tags/tmp tags/v1: v1 points at tmp's manifest and tmp goes. The tag's link is
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
        digest = await self.tree.retag(node, target)
        # The kernel moves its dentry to the new name with the old inode number.
        ino = self.inodes.known(node)
        if ino is not None:
            self.inodes.rebind(ino, target)
        log.info(
            "rename: tag %s:%s now points at %s (from tag %s)", node.repo, name, digest, node.tag
        )

    async def exchange(
        self, node: Node, old_parent: Node, new_parent: Node, new_name: bytes
    ) -> None:
        """renameat2(RENAME_EXCHANGE), `mv --exchange`: of two tags of one repository, a swap
        of what they point at (as `mv` of a tag is a retag), each link replaced atomically,
        so a reader of either finds one of the two manifests, never none. Nothing else
        swaps: an exchange taken for a rename would cancel the upload it meant to keep
        (EINVAL, as on a filesystem without it)."""
        tags = SectionNode(node.repo, "tags") if isinstance(node, TagNode) else None
        if tags is None or old_parent != tags or new_parent != tags:
            log.info("rename: only two tags of one repository are exchanged (EINVAL): %s", node)
            raise FUSEError(errno.EINVAL)
        assert isinstance(node, TagNode)
        name = decode_name(new_name, errno.EINVAL)
        written = self.files.being_written(tags, name)  # stored or only created: stored at close
        if written is not None:
            log.info("rename: %s is open for writing (EBUSY)", written)
            raise FUSEError(errno.EBUSY)
        other = await self.tree.lookup(tags, name)
        assert isinstance(other, TagNode)
        if other == node:
            return
        await self.tree.exchange_tags(node, other)
        # The kernel swaps the two dentries: each inode now names the other tag, which
        # points at what that inode's name pointed at before (its cached size holds).
        self.inodes.exchange(node, other)

    async def _finish(self, node: UploadNode, digest: Digest, named: bool) -> None:
        """Finish an upload by rename: verified against digest, it becomes that layer
        (`named`: renamed to uploads/<digest>, see `Tree.finish_upload`)."""
        upload = await self.tree.resume_upload(node)
        try:
            await self.tree.finish_upload(node, upload, digest, named)
        except BaseException as exc:
            if isinstance(exc, DigestMismatch):
                log.warning("rename: upload %s not finished: %s; it stays", node.uuid, exc)
            with trio.CancelScope(shield=True):  # never leave the upload locked
                await upload.close()
            raise
        self.attributes.forget_shown(node)  # a layer shows the mount's mode and owner
        self._rebind(node, LayerNode(node.repo, digest))

    async def _move_finished(self, node: FinishedNode, new_parent: Node, name: str) -> None:
        """mv of a finished upload's name: into layers/ under its digest (the finish by
        rename a script does next), the name goes, the layer is there already; a different
        digest is EINVAL, as that finish would be. Into uploads/ of any repository, as
        between two filesystems (EXDEV): mv copies the layer's bytes into a new upload
        there, then removes this name. Elsewhere EPERM, as for an upload."""
        if new_parent == SectionNode(node.repo, "layers"):
            if Digest.parse(name) != node.digest:
                log.warning("rename: %s is the layer %s, not %s (EINVAL)", node, node.digest, name)
                raise FUSEError(errno.EINVAL)
            await self.tree.remove(node)
            self._rebind(node, LayerNode(node.repo, node.digest))
            return
        if isinstance(new_parent, SectionNode) and new_parent.section == "uploads":
            log.info("rename: %s is a finished upload, mv copies it (EXDEV)", node)
            raise FUSEError(errno.EXDEV)
        raise refusal("rename", node, read_only=False)

    def _rebind(self, node: Node, layer: LayerNode) -> None:
        """The kernel moves its dentry to the new name with node's inode number: let that
        number stand for the layer node became."""
        ino = self.inodes.known(node)
        if ino is not None:
            self.inodes.rebind(ino, layer)
