"""Apply an image's layers, base first, into one tree, exactly as `umoci unpack` (as root) does.

Pure and synchronous: member tables in, a `MergedTree` out, no I/O. Every rule follows
umoci 0.4.7's `oci/layer/tar_extract.go` step for step, because users compare the view with
what they would get by unpacking (docs/rootfs.md lists the rules and the few deliberate
refusals):

- Members apply in tar order. The directory part of a path is resolved like
  filepath-securejoin: a symlink met on the way is followed inside the image (`..` stops at
  the image root, an absolute target restarts there), at most 255 times; missing
  directories are created with mode 0755, owner 0:0. The last component is never followed.
- Directory over directory replaces the attributes (xattrs too) and keeps the children;
  anything else over an existing name removes it, a directory with its subtree, first.
- `.wh.<name>` and `.wh..wh..opq` remove what is not *upper*: upper are the names this layer
  has already placed and their ancestors, so a whiteout touches lower layers only wherever it
  sits in the tar, and an opaque directory keeps the directory itself.
- A hard link names the target's node: both names share one inode, and that node keeps the
  (layer, member) whose bytes it shows even when a later member replaces the target's name.

Memory: the merge builds one small object per directory and per non-directory of a layer
above the base (the base layer's are their bare `Member`, see `_Entry`), then `MergedTree`
keeps flat arrays (docs/rootfs.md has the measured bytes per member) and drops the objects.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from operator import sub as _sub

from storage.errors import StorageError

from ..gcpause import gc_paused
from .members import Kind, Member

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_NODES = 4_000_000
"""Default bound on the nodes one merge may create (members plus implicit directories)."""
NAME_MAX = 255
MAX_SYMLINKS = 255
"""Symlinks followed while resolving one path: filepath-securejoin's limit (ELOOP beyond)."""
MAX_STEPS = 65_536
"""Components walked while resolving one path: a long symlink target followed 255 times
would otherwise be quadratic work. Far above PATH_MAX's 2,048 components."""

DEFAULT_DIR = Member("", Kind.DIR, 0o755, 0, 0, 0)
"""The image root before any `./` member, and every directory created implicitly: umoci makes
the root 0755 0:0 at the epoch, and missing parents with MkdirAll(0777) under umask 022."""
NO_LAYER = -1
"""The layer of the default root: no layer placed it."""
_ENCODING, _ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
_FIRST = itemgetter(0)


class MergeError(StorageError):
    """A layer that cannot be applied: the whole image is refused, other images are not."""

    def __init__(self, layer: int, path: str, reason: str) -> None:
        super().__init__(f"layer {layer}: {path!r}: {reason}")
        self.layer = layer
        self.path = path
        self.reason = reason


class _Refused(Exception):
    """A member's refusal before the layer and path are attached (see `merge`)."""


class _Node:
    """One non-directory inode while merging; `_Dir` is a directory's.

    Its layer is its mark (see `_Dir`): only directories are marked again. The base
    layer's non-directories are their bare `Member` in their directory until a hard link
    names one (`_Entry`): layer 0, one name, no node. Three slots and no int above 256.
    """

    __slots__ = ("layer", "member", "nlink")

    def __init__(self, member: Member, layer: int) -> None:
        self.member = member
        self.layer = layer
        self.nlink = 1


class _Dir(_Node):
    """One directory while merging. `mark` is the last layer in which it was placed or was
    the ancestor of a placed name (umoci's upperPaths); hard links placed in a layer are in
    `_Merger.linked` instead, because the node they share may be lower under its other
    names."""

    __slots__ = ("children", "mark")
    children: dict[str, _Entry]

    def __init__(self, member: Member, layer: int) -> None:  # no super() call: one per node
        self.member = member
        self.layer = self.mark = layer
        self.nlink = 1
        self.children = {}


_Entry = _Node | Member
"""A name's inode while merging: a bare member is a base layer's non-directory with one
name, 56 bytes a member less at the merge's peak than a `_Node` each."""
_Chain = list[tuple[str, _Entry | None]]


@dataclass(frozen=True, slots=True)
class Node:
    """One inode of the merged tree, as the view serves it.

    `member` holds the attributes and, for a file, where its bytes are in layer `layer`'s
    uncompressed tar; for the default root and implicit directories it is `DEFAULT_DIR`,
    from no layer (`NO_LAYER`).
    `nlink` counts names for non-directories, 2 + subdirectories for directories.
    """

    ino: int
    layer: int
    member: Member
    nlink: int

    @property
    def kind(self) -> Kind:
        return self.member.kind


class MergedTree:
    """The merged image, immutable: stable inode numbers (root 1, then breadth first in name
    order), attributes by reference to the layers' members, and per inode only flat arrays.

    Each directory's entries are a contiguous run of `_child` and of the names, sorted by
    their bytes (the order of `ls` in the C locale) and found by bisection. The names are
    one bytes buffer with offsets, not a str each: a third of the memory for tiny members.
    Each name is followed by a NUL (which no name holds), so a directory's names are
    decoded and split in two calls (`columns`), not one decode each.
    """

    ROOT = 1

    def __init__(
        self,
        member: list[Member],
        layer: array[int],
        nlink: array[int],
        parent: array[int],
        first: array[int],
        count: array[int],
        names: bytes,
        ends: array[int],
        child: array[int],
        utf8: bool = False,
    ) -> None:
        self._member = member
        self._layer = layer
        self._nlink = nlink
        self._parent = parent
        self._first = first
        self._count = count
        self._names = names
        self._ends = ends
        self._child = child
        self.utf8 = utf8
        """Whether every name is strict UTF-8 (`is_utf8`): a listing need not check its own."""

    def parts(self) -> tuple[list[Member], array[int], array[int], array[int], bytes]:
        """What `treefile` keeps of the tree: each inode's member, layer and entry count,
        each entry's inode, and the names; the rest follows from them."""
        return self._member, self._layer, self._count, self._child, self._names

    def __len__(self) -> int:
        """The number of inodes."""
        return len(self._member)

    def node(self, ino: int) -> Node:
        i = self._slot(ino)
        return Node(ino, self._layer[i], self._member[i], self._nlink[i])

    def parent(self, ino: int) -> int:
        """A directory's parent (the root's is itself); a non-directory's first parent."""
        return self._parent[self._slot(ino)]

    def lookup(self, parent: int, name: str) -> int | None:
        """The inode `name` names in directory `parent`; None if absent or not a directory."""
        i = self._slot(parent)
        key = os.fsencode(name)
        lo = self._first[i]
        hi = lo + self._count[i]
        while lo < hi:
            mid = (lo + hi) // 2
            if self._name(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self._first[i] + self._count[i] and self._name(lo) == key:
            return self._child[lo]
        return None

    def entries(self, ino: int) -> Iterator[tuple[str, int, Member, int]]:
        """A directory's entries in name order, each with what stat shows of it: (name,
        inode, member, nlink), as `node` gives them; nothing for a non-directory."""
        names, children, _ = self.names(ino)
        slots = list(map(_sub, children, repeat(1)))
        return zip(
            names.decode(_ENCODING, _ERRORS).split("\0") if children else [],
            children,
            map(self._member.__getitem__, slots),
            map(self._nlink.__getitem__, slots),
            strict=True,
        )

    def names(self, ino: int) -> tuple[bytes, list[int], int]:
        """A directory's entries for a listing made from `entry_columns`: their names as
        one bytes, NUL-separated (b"" for none: split in one call, not decoded each), their
        inodes, and where they start in those columns. A cold `find` of an image lists
        every directory once (1,686 of 15,000 entries in the bench's, most of them small,
        so the steps per directory count)."""
        i = self._slot(ino)
        first = self._first[i]
        last = first + self._count[i]
        if first == last:
            return b"", [], first
        start = self._ends[first - 1] if first else 0
        return (
            self._names[start : self._ends[last - 1] - 1],
            self._child[first:last].tolist(),
            first,
        )

    def entry_columns(
        self, start: int = 0, stop: int | None = None
    ) -> tuple[list[Member], list[int]]:
        """Every entry's member and link count, each directory's a run (`names`): what stat
        shows of all of them, for a view to make at once, not per listing; those from
        `start` to `stop` only (each call holds the GIL throughout: a caller beside an event
        loop takes them in parts)."""
        slots = list(map(_sub, self._child[start:stop], repeat(1)))
        return list(map(self._member.__getitem__, slots)), list(map(self._nlink.__getitem__, slots))

    def resolve(self, path: str) -> int | None:
        """The inode of a normalised path, following no symlink; None if absent."""
        ino: int | None = self.ROOT
        for part in path.split("/") if path else ():
            if ino is None:
                return None
            ino = self.lookup(ino, part)
        return ino

    def _name(self, at: int) -> bytes:
        return self._names[self._ends[at - 1] if at else 0 : self._ends[at] - 1]

    def _slot(self, ino: int) -> int:
        if not 1 <= ino <= len(self._member):
            raise KeyError(ino)
        return ino - 1


def merge(layers: Sequence[Sequence[Member]], max_nodes: int = MAX_NODES) -> MergedTree:
    """Apply `layers` (each a table in tar order, base first) as `umoci unpack` does.

    Raises `MergeError` naming the layer, the member and the reason; never follows a path
    outside the image, never loops: work is bounded by `max_nodes`, `MAX_SYMLINKS` and
    `MAX_STEPS`.
    """
    total = 0
    for number, members in enumerate(layers):
        total += len(members)
        if total > max_nodes:
            raise MergeError(number, "", f"more than {max_nodes} members in the image")
    with gc_paused():
        merger = _Merger(max_nodes)
        for number, members in enumerate(layers):
            merger.start_layer(number)
            for member in members:
                try:
                    merger.apply(member)
                except _Refused as refusal:
                    raise MergeError(number, member.path, str(refusal)) from None
        return _freeze(merger.root)


class _Merger:
    """The tree being built, and the current layer's upper names (see `_Node.mark`).

    `parents` remembers the directory each parent path of this layer resolved to: only a
    removal can change what a resolved path names (a new name never replaces one without
    removing it first), and the directories on its way were marked upper when it was
    resolved. All of them, not the last one's only: tar order puts a directory's files
    before or after its subdirectories' (a walk), so the last one missed for 14,470 of the
    bench image's 15,000 members, each then resolved again (~10 ms of a 35 ms merge).
    """

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.nodes = 0
        self.root = self._new_dir(NO_LAYER)
        self.layer = 0
        self.linked: set[tuple[_Dir, str]] = set()
        self.parents: dict[str, _Dir] = {}

    def start_layer(self, number: int) -> None:
        self.layer = number
        self.linked.clear()
        self.parents.clear()  # its marks are the last layer's

    def _new(self, member: Member, layer: int) -> _Node:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise self._too_many()
        if member.kind is Kind.DIR:
            return _Dir(member, layer)
        return _Node(member, layer)

    def _too_many(self) -> _Refused:
        return _Refused(f"more than {self.max_nodes} entries in the image")

    def _new_dir(self, layer: int) -> _Dir:
        """A directory made implicitly (`DEFAULT_DIR`)."""
        node = self._new(DEFAULT_DIR, layer)
        assert isinstance(node, _Dir)
        return node

    def apply(self, member: Member) -> None:
        """One member, as umoci's UnpackEntry."""
        if not member.path:
            if member.kind is not Kind.DIR:
                raise _Refused(f"a {member.kind.value} cannot replace the image root")
            self._update(self.root, member)
            return
        head, _, name = member.path.rpartition("/")
        if name.startswith(WHITEOUT):
            self._whiteout(head, name)
            return
        _check_creatable(name)  # no whiteout prefix: see above
        parent = self.parents.get(head)
        if parent is None:
            parent = self.parents[head] = self._make_parents(self._resolve(head))
        existing = parent.children.get(name)
        if existing is not None:
            if isinstance(existing, _Dir) and member.kind is Kind.DIR:
                self._update(existing, member)
                return
            self._unlink(parent, name)
        if member.kind is Kind.HARDLINK:
            target = self._link_target(member.linkname)
            target.nlink += 1
            parent.children[name] = target
            self.linked.add((parent, name))
        elif self.layer or member.kind is Kind.DIR:
            parent.children[name] = self._new(member, self.layer)
        else:
            self.nodes += 1  # an inode kept bare (see `_Entry`)
            if self.nodes > self.max_nodes:
                raise self._too_many()
            parent.children[name] = member

    def _update(self, node: _Dir, member: Member) -> None:
        """Directory over directory: the new member's attributes, the old children."""
        node.member = member
        node.layer = node.mark = self.layer

    def _resolve(self, path: str) -> _Chain:
        """filepath-securejoin's walk of a directory path: the chain of (name, node or None
        when missing) it ends at, every symlink on the way followed inside the image."""
        chain: _Chain = []
        pending = path.split("/")[::-1]
        followed = steps = 0
        while pending:
            if followed > MAX_SYMLINKS:
                raise _Refused("a symlink loop in a parent path")
            steps += 1
            if steps > MAX_STEPS:
                raise _Refused("a parent path too long to resolve")
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if chain:
                    chain.pop()
                continue
            parent = chain[-1][1] if chain else self.root
            node = parent.children.get(part) if isinstance(parent, _Dir) else None
            if node is not None and _member(node).kind is Kind.SYMLINK:
                followed += 1
                target = _member(node).linkname
                if target.startswith("/"):
                    chain.clear()
                pending.extend(reversed(target.split("/")))
                continue
            chain.append((part, node))
        return chain

    def _make_parents(self, chain: _Chain) -> _Dir:
        """MkdirAll of a resolved chain: missing directories made, each one marked upper."""
        node = self.root
        for name, _ in chain:
            child = node.children.get(name)
            if child is None:
                _check_name(name)
                child = self._new_dir(self.layer)
                node.children[name] = child
            elif not isinstance(child, _Dir):
                raise _Refused(f"parent {name!r} is a {_member(child).kind.value}, not a directory")
            child.mark = self.layer
            node = child
        return node

    def _whiteout(self, head: str, name: str) -> None:
        """umoci's ociWhiteout: remove every lower name under the target, keep upper ones."""
        if name == WHITEOUT:
            raise _Refused("a bare .wh. whiteout names nothing")
        chain = self._resolve(head)
        parent = chain[-1][1] if chain else self.root
        if not isinstance(parent, _Dir):
            return
        stack: list[_Entry]
        if name == OPAQUE:
            stack = [parent]
        else:
            target = name[len(WHITEOUT) :]
            node = parent.children.get(target)
            if node is None:
                return
            if not self._upper(parent, target, node):
                self._unlink(parent, target)
                return
            stack = [node]
        while stack:
            directory = stack.pop()
            if not isinstance(directory, _Dir):
                continue
            for child_name, child in list(directory.children.items()):
                if self._upper(directory, child_name, child):
                    stack.append(child)
                else:
                    self._unlink(directory, child_name)

    def _upper(self, parent: _Dir, name: str, node: _Entry) -> bool:
        if isinstance(node, _Dir):
            mark = node.mark
        else:
            mark = 0 if isinstance(node, Member) else node.layer
        return mark == self.layer or (parent, name) in self.linked

    def _unlink(self, parent: _Dir, name: str) -> None:
        """Remove a name and the subtree below it; inodes with other names live on."""
        self.parents.clear()
        stack = [parent.children.pop(name)]
        while stack:
            node = stack.pop()
            if isinstance(node, Member):
                continue  # one name: gone with it
            node.nlink -= 1
            if isinstance(node, _Dir) and node.children:
                stack.extend(node.children.values())
                node.children = {}  # freed one by one here, not by a deep recursion

    def _link_target(self, linkname: str) -> _Node:
        """A hard link's target: its directory resolved like a member's, the name itself not
        followed (link(2) links a symlink, not what it points at)."""
        head, _, name = linkname.rpartition("/")
        if not name:
            raise _Refused("a hard link to the image root, a directory")
        chain = self._resolve(head)
        parent = chain[-1][1] if chain else self.root
        target = parent.children.get(name) if isinstance(parent, _Dir) else None
        if target is None:
            raise _Refused(f"a hard link to {linkname!r}, which does not exist")
        if isinstance(target, _Dir):
            raise _Refused(f"a hard link to {linkname!r}, a directory")
        if isinstance(target, Member):
            assert isinstance(parent, _Dir)
            target = parent.children[name] = _Node(target, 0)  # a node for its names to share
        return target


def _member(entry: _Entry) -> Member:
    return entry if isinstance(entry, Member) else entry.member


def _check_name(name: str) -> None:
    """Names umoci could not create either: a whiteout prefix (a parent named `.wh.x` is a
    malformed layer, and no `.wh.` name may show), and `_check_creatable`'s."""
    if name.startswith(WHITEOUT):
        raise _Refused(f"a whiteout name {name!r} used as a directory")
    _check_creatable(name)


def _check_creatable(name: str) -> None:
    """A name longer than NAME_MAX (ENAMETOOLONG), or holding a NUL (a PAX path may: Go's
    system calls refuse it, EINVAL, and `MergedTree` keeps its names NUL-separated)."""
    if len(name) > NAME_MAX // 4 and len(name.encode(_ENCODING, _ERRORS)) > NAME_MAX:
        raise _Refused(f"a name longer than {NAME_MAX} bytes")
    if "\0" in name:
        raise _Refused(f"a name with a NUL byte: {name!r}")


def _by_bytes(children: dict[str, _Entry]) -> tuple[bool, Iterator[tuple[bytes, _Entry]]]:
    """Whether a directory's names are all strict UTF-8, and its entries as (encoded name,
    node), sorted by the encoded names.

    UTF-8 keeps the order of code points, so names that encode strictly sort as they are,
    and only a sorted list of them is held: a directory of a million names held their bytes
    and a tuple each at once too (~120 B a name at the merge's peak). Lone surrogates (bytes
    that were not UTF-8, escaped) sort otherwise, so those directories sort by the bytes."""
    joined = "".join(children)
    utf8 = is_utf8(joined)
    if _ENCODING == "utf-8" and utf8:
        names = sorted(children)
        return utf8, zip(map(str.encode, names), map(children.__getitem__, names), strict=True)
    keys = [name.encode(_ENCODING, _ERRORS) for name in children]  # os.fsencode
    return utf8, iter(sorted(zip(keys, children.values(), strict=True), key=_FIRST))


def is_utf8(text: str) -> bool:
    """Whether text encodes strictly as UTF-8: a name decoded from bytes that were not holds
    lone surrogates (surrogateescape). A string of many names joined is checked at once."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _freeze(root: _Dir) -> MergedTree:
    """Number the inodes breadth first in name order and flatten the tree into arrays.

    A node is numbered when first met; only a non-directory with several names can be met
    again, so only those are remembered (by identity) to give every name one inode. Each
    node leaves the queue, and each directory's dict is dropped, once flattened.
    """
    members: list[Member] = []
    layer, nlink, parent = array("i"), array("I"), array("I", [MergedTree.ROOT])
    first, count, child, ends = array("I"), array("I"), array("I"), array("Q")
    names = bytearray()
    shared: dict[int, int] = {}
    queue: deque[_Entry] = deque([root])
    queue_append, parent_append = queue.append, parent.append  # bound once: a call per name
    ends_append, child_append = ends.append, child.append
    numbered = 1
    ino = 0
    utf8 = True
    while queue:
        node = queue.popleft()
        ino += 1
        first.append(len(child))
        if isinstance(node, Member):
            members.append(node)
            layer.append(0)
            nlink.append(1)
            count.append(0)
            continue
        members.append(node.member)
        layer.append(NO_LAYER if node.member is DEFAULT_DIR else node.layer)
        if not isinstance(node, _Dir):
            nlink.append(node.nlink)
            count.append(0)
            continue
        children = node.children
        subdirs = 0
        plain, entries = _by_bytes(children)
        utf8 = utf8 and plain
        for key, entry in entries:
            if isinstance(entry, _Node) and entry.nlink > 1:
                number = shared.get(id(entry), 0)
                if not number:
                    number = shared[id(entry)] = numbered = numbered + 1
                    queue_append(entry)
                    parent_append(ino)
            else:
                number = numbered = numbered + 1
                queue_append(entry)
                parent_append(ino)
            subdirs += isinstance(entry, _Dir)
            names += key
            names.append(0)  # the separator (see MergedTree)
            ends_append(len(names))
            child_append(number)
        children.clear()
        nlink.append(2 + subdirs)
        count.append(len(child) - first[-1])
    return MergedTree(members, layer, nlink, parent, first, count, bytes(names), ends, child, utf8)
