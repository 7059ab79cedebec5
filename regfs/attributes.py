"""What stat shows: a node's attributes as a FUSE entry, the kernel's timeouts for it, and the
mode, owner and times that chmod, chown and touch gave an upload (`Shown`)."""

from __future__ import annotations

import errno
import logging
import stat
import time
from array import array
from collections import deque
from collections.abc import Callable, Container, Sequence, Set
from dataclasses import dataclass, replace
from itertools import chain, compress, count, repeat
from operator import add, floordiv, is_, is_not
from typing import cast

import pyfuse3
from pyfuse3 import EntryAttributes, FUSEError

from . import fusefeatures
from .handles import ManifestWriter
from .inodes import InodeTable
from .nodes import (
    REGISTRY_KINDS,
    Attr,
    AttrColumns,
    DirNode,
    FinishedNode,
    FixedNode,
    LayerNode,
    ManifestNode,
    Node,
    SectionNode,
    TagNode,
    UploadNode,
)
from .openfiles import OpenFiles
from .options import MountOptions
from .tree import LISTED_ENTRY_TIMEOUT, Tree

log = logging.getLogger(__name__)

FOREVER = 365 * 24 * 3600.0  # digest-addressed content never changes
BLOCK_SIZE = 1 << 20  # the largest FUSE request: cp and cat size their buffers by st_blksize
# A directory's, as on a local disk: glibc's opendir sizes its getdents buffer by st_blksize
# (32 KiB to 1 MiB), and the kernel and pyfuse3 allocate and clear that much for every
# READDIR; 1 MiB per READDIR of an image's small directories was ~30% of a cold find's
# daemon CPU.
DIR_BLOCK_SIZE = 4096
# ... but a registry directory's (a namespace, a repository, a section), whose listing may
# hold 10,000 names and more: Linux 6.16+ sizes each READDIR by the reader's buffer (up to
# the connection's 1 MiB), so `ls` of 10,000 tags takes 13 READDIRPLUS, not 50 (docs/
# performance.md, stop 27, b). 1 MiB took 2 but cost a `find` of 10,000 empty repositories
# ~15% more daemon CPU (50,000 small READDIRs); this much cost it nothing measurable.
LISTING_BLOCK_SIZE = 128 << 10
# An entry's fields in what `rows` gives, and where its size, blocks and times are.
PACKED = len(fusefeatures.PACKED_FIELDS)
_SIZE, _BLOCKS = (fusefeatures.PACKED_FIELDS.index(f) for f in ("st_size", "st_blocks"))
_TIMES = [fusefeatures.PACKED_FIELDS.index(f"st_{t}time_ns") for t in "amc"]
_BLKSIZE = fusefeatures.PACKED_FIELDS.index("st_blksize")
_COLUMNS = [  # where `AttrColumns`' first six are
    fusefeatures.PACKED_FIELDS.index(f"st_{name}")
    for name in ("mode", "nlink", "uid", "gid", "rdev", "size")
]


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
    mtime_ns: int | None = None  # None: the storage's (its last write)
    changed_ns: int = 0  # when they were set: the ctime, unless a write came after


def packed(columns: AttrColumns) -> array[int]:
    """What `Attributes.rows` makes of fixed files and directories (an image's entries), from
    their columns, each field a column at a time (no `Attr` or `EntryAttributes` each)."""
    count = len(columns.mode)
    fields = array("q", [0]) * (PACKED * count)  # no temporary bytes of the same size
    for at, column in zip(_COLUMNS, columns[:6], strict=True):
        fields[at::PACKED] = array("q", column)
    blocks = map(floordiv, map(add, columns.size, repeat(511)), repeat(512))  # _stat's
    fields[_BLOCKS::PACKED] = array("q", blocks)
    sizes = (BLOCK_SIZE, DIR_BLOCK_SIZE)  # st_blksize, by whether it is a directory
    fields[_BLKSIZE::PACKED] = array("q", map(sizes.__getitem__, map(stat.S_ISDIR, columns.mode)))
    mtimes = array("q", columns.mtime_ns)
    for at in _TIMES:
        fields[at::PACKED] = mtimes
    return fields


class Attributes:
    def __init__(
        self, tree: Tree, options: MountOptions, inodes: InodeTable, files: OpenFiles
    ) -> None:
        self.tree = tree
        self.options = options
        self.inodes = inodes
        self.files = files
        self._shown: dict[UploadNode, Shown] = {}
        # What a placeholder shows, a file's (`listed`) or a directory's (`by_name`): one
        # object each, as readdir_reply copies it into the reply.
        self._unread = self._stat(Attr(False, 0, tree.started_ns))
        self._unread_dir = self._stat(Attr(True, 0, tree.started_ns))
        for unread in (self._unread, self._unread_dir):
            unread.attr_timeout = unread.entry_timeout = 0
        # The timeouts of every fixed file's entry (`fixed_entry`), for readdir_reply_many.
        self.fixed_template = EntryAttributes()
        self.fixed_template.attr_timeout = self.fixed_template.entry_timeout = FOREVER

    def entry(self, node: Node, attr: Attr, timeout: float | None = None) -> EntryAttributes:
        """The entry the kernel gets for a node; `timeout` overrides the kind's timeouts."""
        entry = self._stat(attr)
        entry.st_ino = self.inodes.inode(node)
        if isinstance(node, DirNode | SectionNode):
            entry.st_ctime_ns = self.tree.kept.ctime_ns(node, attr.mtime_ns)
            entry.st_blksize = LISTING_BLOCK_SIZE
        if attr.immutable and timeout is None and isinstance(node, FixedNode):
            # A file or directory inside an image: kept for good, and nothing below applies
            # (readdir of an image's directory asks this for each entry).
            entry.attr_timeout = entry.entry_timeout = FOREVER
            if attr.is_dir:  # asked again after each READDIR of it (InodeTable.fixed)
                self.inodes.keep_fixed(entry)
            return entry
        shown = self._shown.get(node) if isinstance(node, UploadNode) else None
        if shown is not None:
            entry.st_mode = stat.S_IFREG | shown.mode
            entry.st_uid, entry.st_gid = shown.uid, shown.gid
            if shown.mtime_ns is not None:
                entry.st_atime_ns = entry.st_mtime_ns = shown.mtime_ns
            entry.st_ctime_ns = max(entry.st_ctime_ns, shown.changed_ns)
        if timeout is None:
            timeout = FOREVER if attr.immutable else self.options.tag_ttl
            if isinstance(node, UploadNode | FinishedNode):
                timeout = 0  # its size moves with every write, from any mount; or it goes
        entry.attr_timeout = entry.entry_timeout = timeout
        moves = not attr.immutable and not isinstance(node, REGISTRY_KINDS)  # rootfs/<tag>
        if isinstance(node, TagNode):
            # A name that can go, or point elsewhere, without the kernel seeing it (a tag
            # moved or deleted beside the mount) is kept by the kernel only as briefly as a
            # digest's: invalidating it would take the directory's lock that a client
            # waiting for the daemon may hold, and a daemon killed while waiting for it could
            # never exit and free the mount. Long enough for `ls -l` to stat a name right
            # after readdirplus or a lookup handed it. A tag's name keeps its inode, and
            # writes, rm and mv through the mount update the kernel's own entry; the one
            # change through the mount it does not see, tags deleted with their manifest,
            # waits until these have expired (Tree.remove). A writer's (timeout 0): none.
            entry.entry_timeout = min(timeout, self.options.tag_ttl, LISTED_ENTRY_TIMEOUT)
            if entry.entry_timeout:
                self.tree.tags_listed(node.repo, entry.entry_timeout)
        elif moves or isinstance(node, LayerNode | ManifestNode):
            # A digest's name never means anything else, so the kernel may keep the entry
            # briefly: a registry DELETE beside the mount shows for at most 0.1 s more than
            # the daemon's own cache would (then the lookup says ENOENT and the kernel
            # drops it itself); an unlink or rename through the mount moves it at once.
            # A view's name that moves with a tag (rootfs/<tag>, an image's root) too, or a
            # walk below it (`ls -lR`, `find`) would look it up for every file: every change
            # of a tag through the mount waits until these have expired (Tree.lookup records
            # them; Tree.put_tag and Tree.remove wait), one beside the mount shows as late.
            entry.entry_timeout = min(timeout, self.options.tag_ttl, LISTED_ENTRY_TIMEOUT)
        elif isinstance(node, DirNode | SectionNode) and fusefeatures.PATCHED:
            # The kernel keeps this directory's listing and reads it again only once these
            # attributes expired and its mtime moved (regfs/listings.py), so a change it does
            # not see shows 0.1 s later at most, or is waited for (`Tree._outlive`). Not 0:
            # default_permissions makes every path walk refresh each expired directory on
            # its way (a GETATTR per directory per file that `ls -l` stats).
            entry.attr_timeout = min(timeout, LISTED_ENTRY_TIMEOUT)
            if self.tree.kept.get(node) is not None:
                if isinstance(node, SectionNode):
                    self.tree.section_attrs_handed(node, entry.attr_timeout)
                else:
                    self.tree.dir_attrs_handed(node, entry.attr_timeout)
        return entry

    def _stat(self, attr: Attr) -> EntryAttributes:
        """What stat shows of attr, without inode and timeouts."""
        entry = EntryAttributes()
        if attr.mode is not None:  # a view's file (rootfs/): its own type, mode and links
            entry.st_mode = attr.mode
            entry.st_nlink = attr.nlink or (2 if attr.is_dir else 1)
            entry.st_rdev = attr.rdev
        elif attr.is_dir:
            entry.st_mode = stat.S_IFDIR | self.options.dir_mode
            entry.st_nlink = attr.nlink or 1  # 1: its subdirectories are not known (Tree.attr)
        else:
            entry.st_mode = stat.S_IFREG | self.options.file_mode
            entry.st_nlink = 1
        entry.st_size = attr.size
        entry.st_blocks = (attr.size + 511) // 512
        entry.st_blksize = DIR_BLOCK_SIZE if stat.S_ISDIR(entry.st_mode) else BLOCK_SIZE
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = attr.mtime_ns
        entry.st_uid = self.options.uid if attr.uid is None else attr.uid
        entry.st_gid = self.options.gid if attr.gid is None else attr.gid
        return entry

    def listed(self, node: Node) -> tuple[EntryAttributes, bool] | None:
        """What readdirplus hands the kernel for a tag without reading storage, and whether
        the kernel makes an inode of it (None for other kinds: read their attributes).

        A tag whose attributes the daemon holds gets them, kept briefly (`entry`); one a
        read-ahead under way will read (`Tree.ahead`: `ls -l` looked a tag up) None: readdir
        waits for its attributes in `entry_of`, so `ls -l` stats it without a LOOKUP. Any other
        gets a placeholder: by name and type only where pyfuse3 allows and the kernel holds no
        inode of it (regfs/fusefeatures.py; nothing kept), else with timeouts of 0, which also
        ends what the kernel kept of it (SIGHUP): the next stat or open looks the name up, and
        that reply carries the real attributes. So listing tags reads no link
        (one request per tag on a remote or S3 source). Not while a writer has the tag open:
        the kernel would take the placeholder's size 0 for its file's size.
        """
        if not isinstance(node, TagNode) or self.files.writer(node) is not None:
            return None
        attr = self.tree.cached_attr(node)
        if attr is not None:
            return self.entry(node, attr), True
        if self.tree.ahead(node):
            return None
        entry = self._unread  # one object: readdir_reply copies it into the reply
        if fusefeatures.PATCHED and self.inodes.known(node) is None:
            entry.st_ino = self.inodes.peek(node)
            return entry, False
        entry.st_ino = self.inodes.inode(node)
        return entry, True

    def held(self, nodes: list[Node]) -> list[Attr]:
        """The attributes readdir hands for the longest beginning of nodes (tags, or layers,
        or manifests, of one type) whose attributes the daemon holds and that no writer has
        open, as `listed` and `entry_of` would hand each, without a coroutine; [] if the
        first is none such (`listed`, `entry_of` decide). Their entries have the first's
        timeouts: they agree on `immutable`. One `map` over the run, not `listed` of each."""
        kind = type(nodes[0])
        if kind is TagNode:
            attrs = list(map(self.tree.cached_attr, cast("list[TagNode]", nodes)))
        elif kind is LayerNode or kind is ManifestNode:
            attrs = list(map(self.tree.held_attr, nodes))
        else:
            return []
        held: list[Attr] = []
        written, immutable = self.files.is_written, attrs[0] is not None and attrs[0].immutable
        for node, attr in zip(nodes, attrs, strict=True):
            if attr is None or attr.immutable is not immutable or type(node) is not kind:
                break
            if written(node):  # its size: the writer's (`entry_of`)
                break
            held.append(attr)
        return held

    def rows(self, attrs: list[Attr]) -> array[int]:
        """What stat shows of each (`_stat`), as `readdir_reply_many` takes it: the fields
        `fusefeatures.PACKED_FIELDS` names, one entry after another. A listing's digests or
        tags (the mount's mode and owner, all files or all directories) are made a column
        at a time: the first's fields repeated, size, blocks and times replaced."""
        first = attrs[0]
        if any(
            a.mode is not None or a.uid is not None or a.gid is not None or a.is_dir != first.is_dir
            for a in attrs
        ):
            return array("q", chain.from_iterable(map(self._row, attrs)))
        fields = self._row(first) * len(attrs)
        sizes = [a.size for a in attrs]
        mtimes = array("q", [a.mtime_ns for a in attrs])
        fields[_SIZE::PACKED] = array("q", sizes)
        fields[_BLOCKS::PACKED] = array("q", [(size + 511) // 512 for size in sizes])  # _stat's
        for at in _TIMES:
            fields[at::PACKED] = mtimes
        return fields

    def fixed_entry(self, ino: int, row: Sequence[int]) -> EntryAttributes:
        """What `entry` makes of a fixed file or directory (an image's) whose `rows` row is
        row, with `fixed_template`'s timeouts."""
        entry = EntryAttributes()
        deque(map(setattr, repeat(entry), fusefeatures.PACKED_FIELDS, row), maxlen=0)
        entry.st_ino = ino
        entry.attr_timeout = entry.entry_timeout = FOREVER
        return entry

    def _row(self, attr: Attr) -> array[int]:
        entry = self._stat(attr)
        return array("q", [getattr(entry, name) for name in fusefeatures.PACKED_FIELDS])

    def by_name(
        self, parent: Node, in_use: bool
    ) -> Callable[[Node], EntryAttributes | None] | None:
        """For one readdir chunk of parent's listing: what gives a child's entry by name and
        type only (no inode in daemon or kernel, `readdir_reply(lookup=False)`), or None
        for a child `listed` decides; None where no child goes so (stock pyfuse3). Tested
        per child in a few lookups done in C, not `listed`'s calls (10,000 tags: ~5 each).

        Tags: as `listed` decides, for a tag the daemon holds nothing of, no writer has
        open and the kernel holds no inode of. A directory's repositories and namespaces
        (not a repository's sections, which a walk goes into: they keep their attributes):
        each, unless its entries are in use (`in_use`: one was looked up since the listing
        began: `ls -l`, `du` stat them, so the rest go with their attributes, not a LOOKUP
        each). A plain `ls` asks no attributes; a directory's entry the kernel holds keeps
        its own timeout (tag_ttl), as if not listed again."""
        if not fusefeatures.PATCHED:
            return None
        peek = self.inodes.peek
        if isinstance(parent, DirNode):
            if in_use:
                return None
            directory = self._unread_dir

            def named_dir(node: Node) -> EntryAttributes | None:
                if not isinstance(node, DirNode):
                    return None  # a section: with its attributes (`du`, `find` go in)
                directory.st_ino = peek(node)
                return directory

            return named_dir
        if not isinstance(parent, SectionNode) or parent.section != "tags":
            return None
        cached, pending = self.tree.tags_held(parent.repo)
        written, known, unread = self.files.is_written, self.inodes.known, self._unread

        def named_tag(node: Node) -> EntryAttributes | None:
            if node in cached or node in pending or written(node) or known(node) is not None:
                return None
            unread.st_ino = peek(node)
            return unread

        return named_tag

    def by_name_run(
        self, parent: Node, in_use: bool
    ) -> tuple[Callable[[list[Node]], int], EntryAttributes] | None:
        """`by_name` of a run of parent's children at once (`Directories._reply_named`): what
        tells how many of a run's first children go by name, as `by_name` decides for each,
        and the entry they share (each with its own st_ino); None where `by_name` is. Tested
        for the whole run in a few C calls where it can be (no tag of it held, pending,
        written or known: a fresh listing), else child by child with `by_name`'s test."""
        named = self.by_name(parent, in_use)
        if named is None:
            return None
        if isinstance(parent, DirNode):

            def directories(nodes: list[Node]) -> int:  # repositories and namespaces
                kinds = map(type, nodes)
                return next(compress(count(), map(is_not, kinds, repeat(DirNode))), len(nodes))

            return directories, self._unread_dir
        cached, pending = self.tree.tags_held(cast("SectionNode", parent).repo)
        files, inodes = self.files, self.inodes

        def tags(nodes: list[Node]) -> int:
            run = set(nodes)  # each tag hashed once (a tuple's hash is not kept), then each
            if (  # test walks the smaller side: most often nothing is held
                cached_none(cached, run)
                and cached_none(pending, run)
                and files.writes_none_of(run)
                and inodes.holds_none_of(run)
            ):
                return len(nodes)
            return next(compress(count(), map(is_, map(named, nodes), repeat(None))), len(nodes))

        return tags, self._unread

    async def entry_of(self, node: Node) -> EntryAttributes:
        """What getattr answers: a writer's pending size, else the storage's; for a file
        whose name went while it was open (`OpenFiles.unlinked`), st_nlink 0 and what it
        was then (its writer's size), until its last close or its name is back."""
        writer = self.files.writer(node)
        pending = writer.pending_attr() if writer is not None else None
        if pending is not None:
            entry = self.entry(node, pending, timeout=0)
            if self.files.unlinked_attr(node) is not None:
                entry.st_nlink = 0
            return entry
        try:
            return await self._stored_entry(node)
        except (LookupError, FileNotFoundError):
            gone = self.files.unlinked_attr(node)
            if gone is None:
                raise
        entry = self.entry(node, gone, timeout=0)
        entry.st_nlink = 0
        return entry

    async def _stored_entry(self, node: Node) -> EntryAttributes:
        if isinstance(node, TagNode) and self.tree.ahead(node):
            # What readdir asks of a tag being read ahead (`listed`): its attributes once
            # read. One the read-ahead leaves out (damaged) is listed as a placeholder, as
            # any other, whose lookup reports it (a rare getattr of it reads size 0).
            attr = await self.tree.read_ahead(node)
            if attr is None:
                return self.entry(node, Attr(False, 0, self.tree.started_ns), timeout=0)
            return self.entry(node, attr)
        held = self.tree.held_attr(node)  # a listing's digests: no coroutine each
        return self.entry(node, held if held is not None else await self.tree.attr(node))

    # -- chmod, chown, touch ---------------------------------------------------------------

    async def check_change(
        self, node: Node, attr: EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> Shown | None:
        """What setattr would show, EPERM if the node cannot show it, None if nothing to keep.

        What changes nothing succeeds anywhere (cp -p and rsync -a set what is already shown);
        a real change only on an upload (see Shown). Whatever is set on a tag, or a manifest
        being written, or a finished upload's name (`FinishedNode`: the layer), is accepted
        and ignored (its times say when it was stored); so are a directory's times in the
        registry's tree (`rsync -a`, `cp -a` and `tar -x` of a directory into uploads/ set its
        times last, and failed on EPERM)."""
        now = await self.entry_of(node)
        mode = stat.S_IMODE(attr.st_mode if fields.update_mode else now.st_mode)
        uid = attr.st_uid if fields.update_uid else now.st_uid
        gid = attr.st_gid if fields.update_gid else now.st_gid
        owner = (mode, uid, gid) != (stat.S_IMODE(now.st_mode), now.st_uid, now.st_gid)
        retimed = (fields.update_mtime and attr.st_mtime_ns != now.st_mtime_ns) or (
            fields.update_atime and attr.st_atime_ns != now.st_atime_ns
        )
        writer = self.files.writer(node)
        if (
            isinstance(node, TagNode | FinishedNode)
            or isinstance(writer, ManifestWriter)
            or self.files.just_stored(node)
        ):
            # A manifest keeps no mode, owner or times: `cp -p` and `rsync -a` of a manifest
            # file made under umask 077 (mktemp) set mode 600 and exited non-zero on EPERM,
            # the tag stored. Accepted and ignored, as rclone's mount does; and by the name
            # of an upload that finished at its close, or of a manifest just stored by
            # digest, which `install -m` chmods and `rsync -a` retimes next.
            return None
        fixed_times = not isinstance(node, DirNode | SectionNode)
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
        if isinstance(node, UploadNode) and (owner or retimed):
            return Shown(mode, uid, gid, attr.st_mtime_ns if fields.update_mtime else None)
        return None

    def show(self, node: Node, shown: Shown) -> None:
        """Keep what check_change returned (an mtime not given stays what it was), changed
        now: chmod, chown and touch move the ctime, as on any filesystem."""
        if not isinstance(node, UploadNode):
            return
        before = self._shown.get(node)
        if shown.mtime_ns is None and before is not None:
            shown = replace(shown, mtime_ns=before.mtime_ns)
        self._shown[node] = replace(shown, changed_ns=time.time_ns())

    def written(self, node: Node) -> None:
        """A write moves the mtime on, as on any filesystem."""
        shown = self._shown.get(node) if isinstance(node, UploadNode) else None
        if shown is not None:
            shown.mtime_ns = None

    def forget_shown(self, node: Node) -> None:
        """An upload that ended (finished, cancelled, replaced) takes its Shown along."""
        if isinstance(node, UploadNode):
            self._shown.pop(node, None)


def cached_none(held: Container[Node], nodes: set[Node]) -> bool:
    """Whether none of nodes is in held (a set or a dict's keys: one C call; else each)."""
    if isinstance(held, Set):
        return held.isdisjoint(nodes)
    return not any(map(held.__contains__, nodes))
