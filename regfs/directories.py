"""Directories: listings read by inode and offset, the kernel's kept listings checked at
GETATTR, and repositories made by mkdir and removed by rmdir."""

from __future__ import annotations

import errno
import logging
import mmap
import stat
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import compress, count, islice
from operator import itemgetter

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FUSEError, ReaddirToken

from storage.errors import CorruptEntry

from . import fusefeatures, statahead
from .attributes import PACKED, Attributes
from .inodes import InodeTable
from .listings import names_of
from .nodes import (
    Attr,
    DirNode,
    FinishedNode,
    FixedNode,
    LayerNode,
    Listing,
    ManifestNode,
    Node,
    NotFound,
    SectionNode,
    TagNode,
    UploadNode,
)
from .tree import LISTED_ENTRY_TIMEOUT, SECTIONS, TICK, Tree

log = logging.getLogger(__name__)

# Listings being read (any directory): a readdir's offset names its listing, so the chunks
# of one listing come from one snapshot whatever changes meanwhile. No release says when a
# listing is done (opendir answers ENOSYS); a reader that falls this far behind goes on in
# the directory's current listing, as on a directory that changed under it. Kept: this many,
# holding at most SNAPSHOT_ENTRIES entries in all (the newest alone may hold more), and each
# only ENDED_KEPT seconds after its end went out: one is most often the tree's cached
# listing itself, but one kept past --tag-ttl is a copy of its own beside the tree's next
# (two of 100,000 tags took the daemon past 150 MB in `bench --only tags_rss`).
SNAPSHOTS_KEPT = 64
SNAPSHOT_ENTRIES = 100_000
ENDED_KEPT = 1.0
_INDEX_BITS = 32  # offset = snapshot << 32 | index of the next entry
_SNAPSHOT_IDS = 1 << 31  # positive offsets (off_t is signed)
# A readdir at offset 0 hands at most this many placeholders (tags by name only): the kernel
# asks for the rest at once, and `ls -l`, which stats what it got first, has by then looked
# one up, which starts the tags' read-ahead; the next chunk waits for it and goes with the
# attributes (`Tree.ahead`), not a LOOKUP per tag (a first chunk of 1 MiB held 6,553 of
# 10,000). A plain `ls` pays one READDIR more.
FIRST_PLACEHOLDERS = 32
# Linux keeps a listing as `struct fuse_dirent`s (24 bytes and the name, 8-aligned), none across
# a page (fs/fuse/readdir.c, fuse_add_dirent_to_cache). When they fill their last page to its
# end, a reader whose offset is not in that copy (another snapshot's: a listing begun before
# the kept one) is told the listing ended there, not sent to the daemon (fuse_readdir_cached's
# "EOF?" test, met after the last full page): of two `ls` of 1,024 tags at once, one saw 32.
# Every listing begins with "." and ".." (as every local directory's does; `ls`, `find`,
# readdir(3) users skip them); one that would so fill its last page begins with "." alone,
# or, if that would too, ends with "." unless that would too (`_dots`): the kernel's copy
# never ends on a page's end. docs/concurrency.md.
_DIRENT = 24
_DOTS = (b".", b"..")
_DOT_LENGTHS = (1, 2)
# The offsets after a listing's "." and after its ".." (the index field's last two values:
# an entry's offset stays its index + 1)
_AFTER_DOT, _AFTER_DOTS = (1 << _INDEX_BITS) - 2, (1 << _INDEX_BITS) - 1
_PAGE = mmap.PAGESIZE
# Entries handed in one readdir_reply_many (pyfuse3 with regfs's patch, `_reply_held`) at
# least: a run takes the rest of what the last full READDIRPLUS took (~145 digests in `ls -l`'s,
# one call, not five runs of 32: 10-25 ms of daemon CPU less per cold `ls -l` of 10,000), and
# what it makes for entries that do not fit is made again for the next READDIR.
RUN = 32
# Entries of a READDIR handed in one call (`_reply_plain`): as many as the last full one took
# (`ls`'s getdents buffer, 32 KiB, holds 1,024 six-letter names), then PLAIN_MORE at a time;
# what a run numbered for entries that did not fit is numbered again for the next READDIR.
PLAIN_RUN = 1024
# Entries by name of a READDIRPLUS handed in one call (`_reply_named`) at first: then as many
# as the last full one took (`ls`'s 32 KiB hold 204 six-letter tags, 160 bytes each).
NAMED_RUN = 256
PLAIN_MORE = 8
_DIRECTORY_KINDS = frozenset({DirNode, SectionNode})
_FILE_KINDS = frozenset({TagNode, ManifestNode, LayerNode, UploadNode, FinishedNode})
_DIGEST_KINDS = frozenset({ManifestNode, LayerNode})  # listed only if their stat succeeds
_MODE = fusefeatures.PACKED_FIELDS.index("st_mode")
_NAME, _NODE = itemgetter(0), itemgetter(1)


@dataclass
class _Snapshot:
    """A listing being read. Its entries stay for ENDED_KEPT after the last went out, not
    only until then: a reader whose getdents buffer took part of the last reply asks again
    at an offset inside it, and so may another reader of the same listing through the
    kernel's kept copy; going on in the current listing there would hand an entry twice,
    or skip one, if an earlier one came or went meanwhile."""

    node: Node
    entries: list[tuple[str, Node]] | None  # None: let go (`Directories._let_go`)
    length: int
    since: int  # `Directories._uses` when it began: were its entries in use since?
    front: int = 2  # "." and ".." first; fewer where the kernel's copy would fill pages
    dot: bool = False  # the listing ends with "." (neither came first, and it fits: `_dots`)
    whole: bool = False  # its last entry went out
    ahead: statahead.StatAhead | None = None  # its digests' attributes, being read (`_listing`)


class Directories:
    def __init__(self, tree: Tree, inodes: InodeTable, attributes: Attributes) -> None:
        self.tree = tree
        self.inodes = inodes
        self.attributes = attributes
        self._snapshots: OrderedDict[int, _Snapshot] = OrderedDict()
        self._entries_kept = 0  # of all snapshots
        self._read_whole: deque[tuple[float, _Snapshot]] = deque()  # their end went out when
        self._next_snapshot = 1
        self._held_fits = RUN  # entries the last full READDIRPLUS took (`_reply_held`)
        self._named_fits = NAMED_RUN  # ... of entries by name (`_reply_named`)
        # The directories (outside the sections) whose entries were last in use (an entry
        # looked up, or listed with its attributes) at which count of such uses: a listing
        # begun before then hands the rest with attributes (`Attributes.by_name`). One per
        # directory inode the kernel holds (dropped when it forgets it).
        self._uses = 0
        self._used: dict[Node, int] = {}
        self._plain_fit = PLAIN_RUN  # entries the last full READDIR took (`_reply_plain`)
        self._plain = {True: EntryAttributes(), False: EntryAttributes()}  # `_reply_plain`'s
        self._plain[True].st_mode, self._plain[False].st_mode = stat.S_IFDIR, stat.S_IFREG

    async def read(self, node: Node, start_id: int, token: ReaddirToken) -> None:
        """readdir: from offset 0 a new snapshot of node's listing, else the one the offset
        names. Offsets carry the snapshot, so the kernel, which keeps a listing only from a
        chain of offsets that follow one another, never mixes two snapshots in one. A listing
        begins with "." and ".." (`_Snapshot.front`), as every local directory's does: their
        offsets are the index field's last two values, so an entry's is its index + 1."""
        snapshot, at = start_id >> _INDEX_BITS, start_id & ((1 << _INDEX_BITS) - 1)
        start = 0 if at >= _AFTER_DOT else at
        kept = self._snapshots.get(snapshot) if start_id else None
        if (
            kept is not None
            and kept.node == node
            and (kept.entries is not None or start >= kept.length)
        ):
            self._snapshots.move_to_end(snapshot)
            entries = kept.entries or []  # let go when it was read to its end: nothing more
        else:  # a reader back in a listing read whole long ago goes on in the current
            self._let_go()
            entries, ahead = await self._listing(node)
            snapshot = self._snapshot(node, entries)
            self._snapshots[snapshot].ahead = ahead
            if start_id == 0 and _kept_by_kernel(node):
                self.tree.kept.listed(node, names_of(entries))
                self.tree.kept.filled(node)
        base = snapshot << _INDEX_BITS
        if (at == 0 or at == _AFTER_DOT) and not self._reply_dots(node, base, at, token):
            return
        if fusefeatures.READDIRPLUS_AUTO and not token.plus:
            ahead = self._snapshots[snapshot].ahead
            if await self._reply_plain(entries, start, base, token, ahead):
                end = self._ended(snapshot, start, token)
                if end and isinstance(entries, Listing) and fusefeatures.READDIR_ENDED:
                    pyfuse3.readdir_ended(token, base | end)
            return
        if isinstance(entries, Listing):
            self._reply_listed(entries, start, base, token)
            return
        in_use = self._used.get(node, 0) > self._snapshots[snapshot].since
        if (ahead := self._snapshots[snapshot].ahead) is not None:
            await ahead.ready(start)
        named = self.attributes.by_name(node, in_use)
        runs = self.attributes.by_name_run(node, in_use) if fusefeatures.READDIRPLUS_AUTO else None
        with_attributes = False
        index = start
        while index < len(entries):
            if runs is not None and (ahead is None or index < ahead.read):
                after, full = self._reply_named(entries, index, start, base, token, runs)
                if full:
                    break
                if after > index:
                    index = after
                    continue
            name, child = entries[index]
            if ahead is not None and index >= ahead.read:  # the next READDIR waits for it
                break
            listed = None
            entry = named(child) if named is not None else None
            if entry is None and fusefeatures.REPLY_MANY:
                after, full = self._reply_held(entries, index, start, base, token)
                with_attributes |= after > index
                if full:
                    break
                if after > index:
                    index = after
                    continue
            index += 1
            if entry is None:
                listed = self.attributes.listed(child)  # a tag: no storage read
                if listed is not None and not listed[1]:
                    entry = listed[0]
            if entry is not None:  # by name only: no inode, no count
                if start == 0 and index > FIRST_PLACEHOLDERS:
                    break
                if not pyfuse3.readdir_reply(
                    token, name.encode(), entry, base | index, lookup=False
                ):
                    break
                continue
            try:
                # Not `entry_of`: a directory the kernel keeps a listing of is not listed again
                # for this (`ls -l` of 10,000 repositories after a `find`); its attributes go
                # with the mtime last seen, and the kernel asks again 0.1 s later.
                entry = listed[0] if listed is not None else await self.attributes.entry_of(child)
            except CorruptEntry as exc:
                # Listed, so the user sees it; uncached, so the next lookup reports EIO.
                log.error("readdir: %s: %s", name, exc)
                entry = self.attributes.entry(child, Attr(False, 0, self.tree.started_ns), 0)
            except LookupError:
                continue  # gone since the snapshot
            if not pyfuse3.readdir_reply(token, name.encode(), entry, base | index):
                self.inodes.unhanded([entry.st_ino])
                break
            self.inodes.ref(entry.st_ino)
            with_attributes = True
        else:
            self._ended(snapshot, start, token)
        if with_attributes:
            self.entries_used(node)

    def _reply_dots(self, node: Node, base: int, at: int, token: ReaddirToken) -> bool:
        """Hands the dots a listing begins with from at (0, or after its "."); whether all
        went out. The last one's offset is `_AFTER_DOTS`, where its entries begin."""
        front = self._snapshots[base >> _INDEX_BITS].front
        for index in range(0 if at == 0 else 1, front):
            after = _AFTER_DOTS if index == front - 1 else _AFTER_DOT
            if not self._reply_dot(token, index, node, base | after):
                return False
        return True

    def _reply_dot(self, token: ReaddirToken, index: int, node: Node, next_id: int) -> bool:
        """Hands "." (index 0: node) or ".." (1: its parent). The kernel takes neither as a
        lookup (fs/fuse/readdir.c), so none is counted."""
        dot = EntryAttributes()
        dot.st_ino = self.inodes.peek(_parent(node) if index else node)
        dot.st_mode = stat.S_IFDIR
        more = {"lookup": False} if fusefeatures.PATCHED else {}
        return bool(pyfuse3.readdir_reply(token, _DOTS[index], dot, next_id, **more))

    async def _reply_plain(
        self,
        entries: list[tuple[str, Node]],
        start: int,
        base: int,
        token: ReaddirToken,
        ahead: statahead.StatAhead | None,
    ) -> bool:
        """A READDIR, not a READDIRPLUS (the kernel asks one past a listing's first chunk
        when nothing in the directory was looked up since: a plain `ls`, `find`): every
        entry from start on by name, inode number (`InodeTable.peek`: nothing kept, nothing
        counted) and type, in runs of one type, each in one call (`readdir_reply_names`; an
        image's in `readdir_reply_many`, each its type). Digests as `_present` lists them:
        those read ahead once read (`StatAhead`), one whose stat failed asked alone. Returns
        whether all went out."""
        index = start
        while index < len(entries):
            stop = min(index + _run(self._plain_fit, index - start), len(entries))
            if ahead is not None:
                stop = min(stop, max(await ahead.ready(index), index + 1))
            nodes = list(map(_NODE, entries[index:stop]))
            if isinstance(entries, Listing):  # each its own type, in its packed row
                inodes = self.inodes.peek_all(nodes)
                handed = pyfuse3.readdir_reply_many(
                    token, entries.encoded[index:stop], inodes,
                    entries.rows[index * PACKED : stop * PACKED], self.attributes.fixed_template,
                    base | index, 0, stop - index, lookup=False,
                )  # fmt: skip
            else:
                kinds = set(map(type, nodes))
                directories = kinds <= _DIRECTORY_KINDS
                if not (directories or kinds <= _FILE_KINDS) or (
                    not kinds.isdisjoint(_DIGEST_KINDS) and None in map(self.tree.held_attr, nodes)
                ):  # a view's, a mix, or a digest whose stat failed
                    handed = await self._reply_each_plain(entries, index, stop, base, token)
                else:
                    inodes = self.inodes.peek_all(nodes)
                    names = list(map(_NAME, entries[index:stop]))
                    handed = pyfuse3.readdir_reply_names(
                        token, names, inodes, self._plain[directories], base | index, 0,
                        stop - index,
                    )  # fmt: skip
            index += handed
            if index < stop:
                self._plain_fit = index - start
                return False
        return True

    async def _reply_each_plain(
        self, entries: list[tuple[str, Node]], start: int, stop: int, base: int,
        token: ReaddirToken,
    ) -> int:  # fmt: skip
        """`_reply_plain` of entries start to stop - 1 one at a time, the type of a kind that
        is not the registry's from its attributes, a digest the daemon holds none of asked
        alone (absent: not listed; damaged: listed, its lookup reports EIO). Returns how
        many of them went out (or were left out)."""
        for index in range(start, stop):
            name, child = entries[index]
            kind = type(child)
            if kind in _DIRECTORY_KINDS or (
                kind in _FILE_KINDS
                and (kind not in _DIGEST_KINDS or self.tree.held_attr(child) is not None)
            ):
                mode = stat.S_IFDIR if kind in _DIRECTORY_KINDS else stat.S_IFREG
            else:
                try:
                    attr = await self.tree.attr(child)
                except CorruptEntry:
                    attr = Attr(False, 0, 0)
                except LookupError:
                    continue  # gone
                mode = stat.S_IFMT(attr.mode) if attr.mode is not None else stat.S_IFREG
                if attr.is_dir and attr.mode is None:
                    mode = stat.S_IFDIR
            entry = EntryAttributes()
            entry.st_ino, entry.st_mode = self.inodes.peek(child), mode
            if not pyfuse3.readdir_reply(token, name.encode(), entry, base | (index + 1)):
                return index - start
        return stop - start

    def _reply_named(
        self, entries: list[tuple[str, Node]], index: int, start: int, base: int,
        token: ReaddirToken, runs: tuple[Callable[[list[Node]], int], EntryAttributes],
    ) -> tuple[int, bool]:  # fmt: skip
        """Hands in one `readdir_reply_names` the entries from index on that go by name
        (`Attributes.by_name_run`: tags the daemon holds nothing of, a namespace's
        directories), as many as the rest of what the last full READDIRPLUS of them (from
        `start`) took, then more (`_run`), at most FIRST_PLACEHOLDERS in a listing's first reply:
        what `read` would hand one `readdir_reply(lookup=False)` at a time, numbered as
        `peek` numbers them (nothing kept, nothing counted). Returns the index after the last
        one handed (index if entries[index] goes otherwise: `read` hands it) and whether the
        reply is full. What a run numbers for entries that do not fit is numbered again, the
        same, for the next READDIR."""
        goes, template = runs
        stop = min(index + _run(self._named_fits, index - start), len(entries))
        if start == 0:  # past them, `read` ends the reply at the next entry by name
            stop = min(stop, FIRST_PLACEHOLDERS)
            if index >= stop:
                return index, False
        nodes = list(map(_NODE, entries[index:stop]))
        named = goes(nodes)
        if named == 0:
            return index, False
        names = list(map(_NAME, entries[index : index + named]))
        inodes = self.inodes.peek_all(nodes[:named] if named < len(nodes) else nodes)
        handed = pyfuse3.readdir_reply_names(token, names, inodes, template, base | index, 0, named)
        if handed < named:
            self._named_fits = index + handed - start
        return index + handed, handed < named

    def _reply_held(
        self, entries: list[tuple[str, Node]], index: int, start: int, base: int,
        token: ReaddirToken,
    ) -> tuple[int, bool]:  # fmt: skip
        """Hands in one `readdir_reply_many` the entries from index on whose attributes the
        daemon holds, of one kind (`Attributes.held`: tags, layers, manifests), as many as
        the rest of what the last full READDIR (from `start`) took, at least RUN, as `read`
        would one by one: each with a lookup (counted here). Returns the index
        after the last one handed (index if entries[index] is none such: `read` hands it)
        and whether the reply is full. What a run makes for entries that do not fit is made
        again for the next READDIR, their numbers dropped meanwhile (`InodeTable.unhanded`)."""
        if not self.attributes.held([entries[index][1]]):  # a tag read ahead, an upload...
            return index, False
        run = max(RUN, self._held_fits - (index - start))
        nodes = [child for _, child in islice(entries, index, index + run)]
        attrs = self.attributes.held(nodes)
        if not attrs:  # expired since the first was asked
            return index, False
        del nodes[len(attrs) :]
        names = [name.encode() for name, _ in islice(entries, index, index + len(nodes))]
        inodes = self.inodes.inode_all(nodes)
        template = self.attributes.entry(nodes[0], attrs[0])  # the timeouts of all of them
        handed = pyfuse3.readdir_reply_many(
            token, names, inodes, self.attributes.rows(attrs), template, base | index, 0,
            len(names),
        )  # fmt: skip
        self.inodes.ref_all(inodes[:handed])
        self.inodes.unhanded(inodes[handed:])
        if handed < len(names):
            self._held_fits = index + handed - start
        return index + handed, handed < len(names)

    def _reply_listed(self, entries: Listing, start: int, base: int, token: ReaddirToken) -> None:
        """readdir of a listing that came with its entries' attributes (an image's
        directory): no call per entry to the tree, nothing that can fail on the way."""
        if fusefeatures.REPLY_MANY:
            if not self._reply_packed(entries, start, base, token):
                return
        elif not self._reply_each(entries, start, base, token):
            return
        end = self._ended(base >> _INDEX_BITS, start, token)
        if end and fusefeatures.READDIR_ENDED:
            # Its entries never change: the READDIR that only learns that nothing
            # follows is answered in pyfuse3's C callback (one per directory a cold
            # `find` of an image lists, as many as those with entries).
            pyfuse3.readdir_ended(token, base | end)

    def _reply_packed(self, entries: Listing, start: int, base: int, token: ReaddirToken) -> bool:
        """Hands a packed listing's entries from start on in runs of RUN, each in one
        `readdir_reply_many`, as `_reply_each` would one by one: each with a lookup (counted
        here), a directory's entry kept for its GETATTRs (`InodeTable.keep_fixed`). Returns
        whether all went out. What a run numbers for entries that do not fit is dropped,
        and numbered again, the same, for the next READDIR."""
        names, rows = entries.encoded, entries.rows
        template, fixed = self.attributes.fixed_template, self.attributes.fixed_entry
        index = start
        while index < len(names):
            stop = min(index + RUN, len(names))
            inodes = self.inodes.inode_all(list(map(_NODE, entries[index:stop])))
            run = rows[index * PACKED : stop * PACKED]
            handed = pyfuse3.readdir_reply_many(
                token, names[index:stop], inodes, run, template, base | index, 0, stop - index
            )
            self.inodes.ref_all(inodes[:handed])
            modes = run[_MODE : handed * PACKED : PACKED]
            for i in compress(count(), map(stat.S_ISDIR, modes)):  # asked after each READDIR
                self.inodes.keep_fixed(fixed(inodes[i], run[i * PACKED : (i + 1) * PACKED]))
            index += handed
            if index < stop:
                self.inodes.unhanded(inodes[handed:])
                return False
        return True

    def _reply_each(self, entries: Listing, start: int, base: int, token: ReaddirToken) -> bool:
        """`_reply_listed` one entry at a time (on a pyfuse3 without readdir_reply_many):
        whether all went out."""
        rows = entries.rows
        handed: list[int] = []  # their lookups, counted at once
        try:
            for index in range(start, len(entries)):
                name, child = entries[index]
                row = rows[index * PACKED : (index + 1) * PACKED]
                made = self.attributes.fixed_entry(self.inodes.inode(child), row)
                if stat.S_ISDIR(made.st_mode):  # as `entry` keeps it
                    self.inodes.keep_fixed(made)
                if not pyfuse3.readdir_reply(token, name.encode(), made, base | (index + 1)):
                    self.inodes.unhanded([made.st_ino])
                    return False
                handed.append(made.st_ino)
            return True
        finally:
            self.inodes.ref_all(handed)

    def _ended(self, snapshot: int, start: int, token: ReaddirToken) -> int:
        """Every entry went out: only the end is asked for next, and after the last entry
        the "." of a listing that could not begin with it (`_dots`). Returns the index
        the reader asks for next, if this reply handed the listing's last entry (or the
        "."), else 0."""
        ended = self._snapshots.get(snapshot)
        if ended is None:
            return 0
        length = ended.length
        if not ended.whole and ended.entries is not None:
            ended.whole = True
            self._read_whole.append((time.monotonic(), ended))
        if ended.dot and start <= length:
            if not self._reply_dot(token, 0, ended.node, snapshot << _INDEX_BITS | (length + 1)):
                return 0  # no room: the next READDIR asks for it
            return length + 1
        return length if start < length else 0

    def _snapshot(self, node: Node, entries: list[tuple[str, Node]]) -> int:
        snapshot = self._next_snapshot
        self._next_snapshot = snapshot % (_SNAPSHOT_IDS - 1) + 1
        front, dot = _dots(entries)
        self._snapshots[snapshot] = _Snapshot(node, entries, len(entries), self._uses, front, dot)
        self._entries_kept += len(entries)
        snapshots = self._snapshots
        while len(snapshots) > SNAPSHOTS_KEPT or (
            self._entries_kept > SNAPSHOT_ENTRIES and len(snapshots) > 1
        ):
            self._drop(snapshots.popitem(last=False)[1])
        return snapshot

    def _let_go(self) -> None:
        """The entries of snapshots whose end went out more than ENDED_KEPT ago: done before
        a listing is made, so that it is never held beside a stale copy of itself."""
        whole = self._read_whole
        if whole:
            now = time.monotonic()
            while whole and now - whole[0][0] > ENDED_KEPT:
                self._drop(whole.popleft()[1])

    def _drop(self, snapshot: _Snapshot) -> None:
        if snapshot.entries is not None:
            self._entries_kept -= len(snapshot.entries)
            snapshot.entries = None
        if snapshot.ahead is not None:  # no READDIR asks further: it reads on for nobody
            snapshot.ahead.stop()
            snapshot.ahead = None

    async def entry_of(self, node: Node) -> EntryAttributes:
        """What a GETATTR or a lookup hands the kernel (`Attributes`), with, for a directory
        whose listing the kernel keeps, an mtime checked first: each renews the kernel's
        attributes, so each must say whether the listing moved."""
        if self.tree.kept.get(node) is not None:
            await self._revalidate(node)
        return await self.attributes.entry_of(node)

    async def _revalidate(self, node: Node) -> None:
        """The mtime of a directory whose listing the kernel keeps moves if the names the
        daemon has now (read again once --tag-ttl passed) differ from those the kernel was
        handed, or if its entries are in use (`KeptListings.entries_used`). A directory
        the kernel never read costs nothing here (`ls -l` of 10,000 repositories lists none
        of them)."""
        kept = self.tree.kept
        if kept.relists(node):
            kept.move(node)
            return
        self._let_go()
        try:
            entries = await self._present(node)
        except LookupError:
            kept.move(node)  # gone: the kernel's lookup or listing finds out
            return
        kept.listed(node, names_of(entries))

    async def _listing(
        self, node: Node
    ) -> tuple[list[tuple[str, Node]], statahead.StatAhead | None]:
        """A new snapshot's entries: `_present`'s, or, for a listing of layers/ or manifests/
        whose attributes the daemon does not hold, all its names and the reading of those
        attributes begun (`StatAhead`): each READDIR hands what is read by then, and a
        digest whose stat fails is left out when its turn comes, asked alone as `_present`
        would (absent: not listed; damaged: listed, EIO on lookup)."""
        if isinstance(node, SectionNode) and node.section in ("layers", "manifests"):
            entries = await self.tree.children(node)
            held = self.tree.held_attr
            if len(entries) > statahead.FIRST_CHUNK and not any(held(n) for _, n in entries[:8]):
                return entries, statahead.StatAhead(self.tree, list(map(_NODE, entries)))
        return await self._present(node), None

    async def _present(self, node: Node) -> list[tuple[str, Node]]:
        """node's listing as readdir hands it: without the digests whose stat
        fails (a manifest the registry deleted leaves its empty directory, so the names
        alone would not show it went). Their attributes are read in bulk where the source
        can (`Tree.read_attrs`) and cached for --tag-ttl, as the listing is, so readdir's
        stat of each costs nothing more."""
        entries = await self.tree.children(node)
        if not isinstance(node, SectionNode) or node.section not in ("layers", "manifests"):
            return entries
        attrs = await self.tree.read_attrs([child for _, child in entries])
        if None not in attrs:  # all read in bulk (the usual case): no copy of 10,000 pairs
            return entries
        present = []
        for (name, child), attr in zip(entries, attrs, strict=True):
            if attr is None:  # not read in bulk: absent or damaged, asked alone says which
                try:
                    await self.tree.attr(child)
                except LookupError:
                    continue
                except CorruptEntry:
                    pass  # listed, and its lookup reports EIO
            present.append((name, child))
        return present

    async def forget_moving(self) -> None:
        """SIGHUP: the daemon forgets what moves, and every listing the kernel keeps has its
        mtime moved; returns once the kernel's attributes of those directories, handed
        before, expired (LISTED_ENTRY_TIMEOUT), so the next `ls` of any of them asks."""
        self.tree.forget_moving()
        if fusefeatures.PATCHED:
            ttl = self.attributes.options.tag_ttl
            await trio.sleep(min(ttl, LISTED_ENTRY_TIMEOUT) + TICK)

    def entries_used(self, parent: Node) -> None:
        """A name in parent was looked up, or listed with its attributes: see
        `KeptListings.entries_used` for the registry's sections, whose entries the kernel
        keeps for 0.1 s or not at all; a namespace's or repository's listing begun before
        hands the rest with their attributes (`_used`)."""
        if isinstance(parent, SectionNode) and parent.section in SECTIONS:
            self.tree.kept.entries_used(parent, self.attributes.options.tag_ttl)
        elif isinstance(parent, DirNode):
            self._uses += 1
            self._used[parent] = self._uses

    def forgotten(self, node: Node) -> None:
        """The kernel forgot node's inode: whatever listing of it it kept went with it."""
        self.tree.kept.drop(node)
        self._used.pop(node, None)

    async def make(self, parent: DirNode, name: str) -> EntryAttributes:
        """mkdir: a new repository (or namespace) beneath parent."""
        node = await self.tree.mkdir(parent, name)
        entry = self.attributes.entry(node, await self.tree.attr(node))
        self.inodes.ref(entry.st_ino)
        log.info("mkdir: created repository %s", node.path)
        return entry

    async def remove(self, parent: DirNode, name: str) -> None:
        """rmdir of an empty repository or namespace, or of an empty section.

        `rm -r` of a repository empties each section, removes it, then removes the
        repository. A section has nothing of its own to remove and is part of its repository
        as long as that exists, so an empty one "goes" as a no-op (what readdir would show of
        it decides: a digest the registry deleted is not there); one with anything listed is
        ENOTEMPTY, as a local directory would be."""
        try:
            node = await self.tree.lookup(parent, name)
        except NotFound:
            # The kernel held the name (else rmdir never arrives), yet the directory went
            # with its last entry (S3 keeps no empty one: a namespace goes with its last
            # repository's key): what rmdir wants is done.
            self.tree.changed(parent)
            log.info("rmdir: %s/%s is gone already", parent.path, name)
            return
        if isinstance(node, SectionNode):
            if await self._present(node):
                raise FUSEError(errno.ENOTEMPTY)
            log.info(
                "rmdir: %s/%s is empty; it stays while its repository does", node.repo, node.section
            )
            return
        assert isinstance(node, DirNode)  # a directory's children: directories, sections
        if await self.tree.rmdir(parent, node):
            log.info("rmdir: removed repository %s", node.path)
        else:
            log.info(
                "rmdir: hidden repository %s, removed once its uploads' writers close", node.path
            )


def _run(fits: int, done: int) -> int:
    """How many entries a reply's next run hands, `done` of them handed already: the rest of
    what the last full reply took (`fits`), then PLAIN_MORE (most often none fit: the
    reply ends there), then twice what went past `fits`, as the reader's buffer may be
    bigger (a directory's st_blksize: `attributes.LISTING_BLOCK_SIZE`)."""
    return max(fits - done, PLAIN_MORE, 2 * (done - fits))


def _lengths(entries: list[tuple[str, Node]]) -> list[int]:
    """The bytes of each entry's name."""
    if isinstance(entries, Listing):
        return list(map(len, entries.encoded))
    names = list(map(_NAME, entries))
    if "".join(names).isascii():  # tags always, and most names: a length each in C
        return list(map(len, names))
    return [len(name.encode()) for name in names]


def _dots(entries: list[tuple[str, Node]]) -> tuple[int, bool]:
    """How many of "." and ".." a listing begins with, and whether it ends with ".": both
    first, unless the kernel's copy would then fill its last page to the end (a reader of
    an earlier snapshot would be told it ended there: `_PAGE`); then "." alone first, or,
    if that fills it too, no dot first and one "." last unless that fills it (a "." last
    only where the entries alone fill it left listings with no dot at all, where it fits:
    tests/test_listing_dots_findings.py). Both dots first fill no page of an empty one."""
    lengths = _lengths(entries)
    for front in (2, 1):
        if not _fills_pages([*_DOT_LENGTHS[:front], *lengths]):
            return front, False
    return 0, not _fills_pages([*lengths, _DOT_LENGTHS[0]])


def _parent(node: Node) -> Node:
    """The directory node is in, for its ".." (a view's directory: itself, as the root's
    ".." is on a local filesystem: the kernel never looks ".." up through a listing)."""
    if isinstance(node, SectionNode):
        return DirNode(node.repo)
    if isinstance(node, DirNode):
        return DirNode(node.path.rpartition("/")[0])
    return node


def _fills_pages(lengths: list[int]) -> bool:
    """Whether the kernel's copy of a listing of names of these lengths ends on a page's end."""
    if sum(lengths) + len(lengths) * (_DIRENT + 7) < _PAGE:  # short of one page (most are:
        return False  # an image's directories, ~1,700 a `find`; each dirent is at most this)
    smallest, largest = ((_DIRENT + 7 + length) & ~7 for length in (min(lengths), max(lengths)))
    if smallest == largest:  # one dirent size (a listing of tags, most often): each page
        per_page = _PAGE // largest  # holds as many, the last what is left
        return ((len(lengths) - 1) % per_page + 1) * largest == _PAGE
    used = 0
    for length in lengths:
        size = (_DIRENT + 7 + length) & ~7
        used = size if used + size > _PAGE else used + size
    return used == _PAGE


def _kept_by_kernel(node: Node) -> bool:
    """Whether the kernel keeps node's listing and its names can change: every directory
    outside an image, with regfs's pyfuse3 build (opendir answers ENOSYS)."""
    return fusefeatures.PATCHED and not isinstance(node, FixedNode)
