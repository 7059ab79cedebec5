"""Stable inode numbers for tree nodes, kept while the kernel holds a lookup count on them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from itertools import compress, repeat
from operator import add, attrgetter, eq, is_, is_not, itemgetter, ne
from pathlib import Path
from typing import cast

import platformdirs
import pyfuse3
import siphashc
from pyfuse3 import EntryAttributes

from storage.privatedir import UnsafeDirectory, open_private

from .nodes import ROOT, DigestNode, Node, TagNode

log = logging.getLogger(__name__)

_DERIVED = 1 << 62  # numbers derived from nodes; counted ones are below
_HASH_BITS = _DERIVED - 1
KEY_FILE = "inode-key"
KEY_SIZE = 16  # SipHash-2-4's key
# SipHash-2-4 (a keyed PRF, in C): what a name's number is, under the user's key
_siphash: Callable[[bytes, bytes | str], int] = siphashc.siphash  # str: as UTF-8
# A `_counted` node's last field, and the rest (a tuple)
_LAST = cast("Callable[[Node], int]", itemgetter(-1))
_BUT_LAST = cast("Callable[[Node], tuple[object, ...]]", itemgetter(slice(None, -1)))
_REPO, _DIGEST = attrgetter("repo"), attrgetter("digest")  # of a DigestNode
_TAG_REPO = itemgetter(1)  # of a TagNode (a tuple: kind, repo, tag)
_ALGORITHM, _HEX = attrgetter("algorithm"), attrgetter("hex")  # of a Digest


def inode_key(base: Path | None = None) -> bytes | None:
    """The user's key for inode numbers, made once (random, 0600) in their state directory
    (`~/.local/state/regfs/inode-key`), so every mount of theirs numbers a file alike: a
    backup tool's or git's cache keys unchanged files on st_ino. A SipHash key, so the
    numbers are this user's own and names cannot be made to clash without it. Where it
    cannot be kept, None (logged): numbers then hold until the unmount."""
    base = platformdirs.user_state_path() if base is None else base
    try:
        directory = open_private(base, ["regfs"])
    except (OSError, UnsafeDirectory) as exc:
        log.warning("inode numbers: no state directory (%s): they last this mount only", exc)
        return None
    try:
        key = _read_key(directory)
        if key is None or len(key) < KEY_SIZE:  # none yet, or left short by a failed write
            key = _make_key(directory, replace=key is not None)
    except OSError as exc:
        log.warning(
            "inode numbers: %s/regfs/%s: %s: they last this mount only", base, KEY_FILE, exc
        )
        return None
    finally:
        os.close(directory)
    if len(key) != KEY_SIZE:  # longer: damaged
        log.warning(
            "inode numbers: %s/regfs/%s is not a key: they last this mount only", base, KEY_FILE
        )
        return None
    return key


def _read_key(directory: int) -> bytes | None:
    """The key file's bytes (at most one more than a key's), or None if there is none."""
    try:
        kept = os.open(KEY_FILE, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    except FileNotFoundError:
        return None
    try:
        return os.read(kept, KEY_SIZE + 1)
    finally:
        os.close(kept)


def _make_key(directory: int, replace: bool) -> bytes:
    """A new key, written to a temporary file beside the key file and fsynced before it
    takes that name, so a daemon killed or out of space meanwhile leaves no short key file.
    A new name is linked (the first daemon wins: the others read its key); a short file is
    renamed over. The key is what the file holds then."""
    temp = f".{KEY_FILE}-{os.urandom(8).hex()}"
    made = os.open(
        temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory
    )
    try:
        try:
            if os.write(made, os.urandom(KEY_SIZE)) != KEY_SIZE:
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(made)
        finally:
            os.close(made)
        if replace:
            os.rename(temp, KEY_FILE, src_dir_fd=directory, dst_dir_fd=directory)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(
                    temp,
                    KEY_FILE,
                    src_dir_fd=directory,
                    dst_dir_fd=directory,
                    follow_symlinks=False,
                )
        os.fsync(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=directory)
    return _read_key(directory) or b""


def _named(node: Node) -> str:
    """What a node names (but a tag or a `_counted` one: `InodeTable._derived`): its kind
    and repr (the same in every process, where hash() of a str is not)."""
    return f"{type(node).__name__}{node!r}"


def _digests_named(nodes: list[Node], kinds: set[type]) -> Iterable[str] | None:
    """`_named` of each node of a listing of layers/ or manifests/ (one kind of DigestNode,
    one repository, one algorithm: their reprs differ in the hex alone), made in C from the
    first's (a dataclass repr of each costs ~0.8 us: 12 vs 5 ms per 10,000 nodes numbered);
    None for any other list."""
    if len(kinds) != 1 or not issubclass(next(iter(kinds)), DigestNode):
        return None
    digest_nodes = cast("list[DigestNode]", nodes)
    first = digest_nodes[0]
    if any(map(ne, map(_REPO, digest_nodes), repeat(first.repo))):
        return None
    digests = list(map(_DIGEST, digest_nodes))
    if any(map(ne, map(_ALGORITHM, digests), repeat(first.digest.algorithm))):
        return None
    full, hexed = _named(first), repr(first.digest.hex)
    at = full.rindex(hexed)
    head, tail = full[:at], full[at + len(hexed) :]
    hexes = map(repr, map(_HEX, digests))
    return map(str.__add__, repeat(head), map(str.__add__, hexes, repeat(tail)))


def _tags_numbered(key: bytes, nodes: list[TagNode]) -> list[int]:
    """`InodeTable._derived` of each tag: SipHash of its fields joined by NULs. For a
    listing's (one repository) its tag appended to the fields before it, in one list
    comprehension: ~0.1 us a tag, where a `map` pipeline of C calls (a join of the three
    fields, the hash, the two bit operations) took ~0.27."""
    first = nodes[0]
    if any(map(ne, map(_TAG_REPO, nodes), repeat(first[1]))):
        return [_DERIVED | (_siphash(key, named) & _HASH_BITS) for named in map("\0".join, nodes)]
    head = f"{first[0]}\0{first[1]}\0"
    return [_DERIVED | (_siphash(key, head + node[2]) & _HASH_BITS) for node in nodes]


def _counted(node: Node) -> bool:
    """Whether a node is a tuple whose last field is an int (an image's inode: the nodes of
    one image differ in it alone): its number is the keyed number of the rest plus that."""
    return isinstance(node, tuple) and type(node[-1]) is int


@lru_cache(maxsize=64)
def _counted_base(key: bytes, kind: str, rest: tuple[object, ...]) -> int:
    """The keyed number of what a `_counted` node names but its last field: one for all of
    an image's entries (a `find` of one lists ~1,700 directories of ~9 entries each)."""
    return _siphash(key, f"{kind}{rest!r}")


class InodeTable:
    """node ↔ inode. Every entry the kernel learns (lookup, readdirplus) adds one to its count;
    forget subtracts; at zero the number is dropped (the root never is).

    A node's number is derived from the node itself (a keyed hash of what it names, the
    same in every mount with the same key: `inode_key`), so an entry listed without a lookup
    shows the number (d_ino) its later lookup gives it, nothing is kept for it meanwhile,
    and a remount numbers it alike. Without a key, from its hash() (this process's: the
    numbers last until the unmount). Two live nodes never share one: a node whose derived
    number is taken gets the next of a counter below the derived range (that node's number
    then lasts while the kernel holds it), and `peek` hands it what `inode` will.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key
        self._inodes: dict[Node, int] = {ROOT: pyfuse3.ROOT_INODE}
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: ROOT}
        self._lookups: Counter[int] = Counter()
        # What GETATTR answers for a directory inside an image (its attributes never change),
        # made once, when a listing or lookup first hands it: the kernel asks again after
        # every READDIR of it (its atime; not on a read-only mount), so each `find` of an
        # image asks it of every directory. Dropped with the number at forget.
        self._fixed: dict[int, EntryAttributes] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def __len__(self) -> int:
        return len(self._nodes)

    def inode(self, node: Node) -> int:
        ino = self._inodes.get(node)
        if ino is None:
            ino = self._derived(node)
            if ino in self._nodes:
                ino = self._next
                self._next += 1
            self._inodes[node] = ino
            self._nodes[ino] = node
        return ino

    def inode_all(self, nodes: list[Node]) -> array[int]:
        """`inode` of each, as readdir_reply_many takes them: looked up, and the new ones
        numbered, a step per node in C (a call each only where derived numbers clash)."""
        found = list(map(self._inodes.get, nodes))
        if None not in found:
            return array("q", cast("list[int]", found))
        # The new ones (a listing's) numbered at once, as `inode` would one by one when no
        # two of them, or one and a number in use, share a derived number (else: `inode`).
        derived = self._derived_all(nodes)
        numbers = dict(zip(nodes, derived, strict=True))  # a hard link's names: one
        fresh = found.count(None) == len(found)  # a listing's first READDIR
        if not fresh:
            for known in compress(nodes, map(is_not, found, repeat(None))):
                numbers.pop(known, None)
        taken = dict(zip(numbers.values(), numbers, strict=True))
        if len(taken) == len(numbers) and self._nodes.keys().isdisjoint(taken):
            self._inodes.update(numbers)
            self._nodes.update(taken)
            if fresh:
                return array("q", derived)
            return array("q", map(self._inodes.__getitem__, nodes))
        return array("q", [self.inode(node) for node in nodes])

    def peek(self, node: Node) -> int:
        """The number of a node listed without a lookup: its own if the kernel holds it, else
        the one its first lookup will most likely give it (the counter's next where another
        node holds its derived number: after an exchange, or a clash). Nothing is kept."""
        ino = self._inodes.get(node)
        if ino is None:
            ino = self._derived(node)
            if ino in self._nodes:
                return self._next
        return ino

    def peek_all(self, nodes: list[Node]) -> array[int]:
        """`peek` of each (a listing's run handed by name), numbered in one pass where no
        derived number is held or repeated (else as `inode` would number them in turn), so a
        listing never shows two nodes with one number."""
        if self._inodes.keys().isdisjoint(nodes):  # none held: a listing's, most often
            found: list[int | None] = [None] * len(nodes)
            derived = self._derived_all(nodes)
        else:
            found = list(map(self._inodes.get, nodes))
            if None not in found:
                return array("q", cast("list[int]", found))
            derived = self._derived_all(compress(nodes, map(is_, found, repeat(None))))
        if len(set(derived)) < len(derived) or not self._nodes.keys().isdisjoint(derived):
            return array("q", self._peek_each(nodes, found, derived))
        if len(derived) == len(nodes):  # a listing's first READDIR
            return array("q", derived)
        fresh = iter(derived)
        return array("q", [next(fresh) if f is None else f for f in found])

    def _peek_each(
        self, nodes: list[Node], found: list[int | None], derived: list[int]
    ) -> list[int]:
        """`peek_all` where derived numbers clash: what `inode` of each in turn would give
        (the same node twice, a hard link, one number), nothing kept."""
        given: dict[Node, int] = {}
        taken: set[int] = set()
        counter, fresh, numbers = self._next, iter(derived), []
        for node, ino in zip(nodes, found, strict=True):
            if ino is None:
                ino = given.get(node, next(fresh))  # each unfound one has its derived
                if node not in given:
                    if ino in self._nodes or ino in taken:
                        ino, counter = counter, counter + 1
                    given[node] = ino
                    taken.add(ino)
            numbers.append(ino)
        return numbers

    def _derived(self, node: Node) -> int:
        """`_derived_all` of one node (a lookup's, a READDIRPLUS entry's by name)."""
        key = self._key
        if key is None:
            return _DERIVED | (hash(node) & _HASH_BITS)
        if type(node) is TagNode:  # its fields (a name as decoded, strictly, or checked: no
            # lone surrogate, so UTF-8); the most of them (READDIRPLUS by name): no call
            return _DERIVED | (_siphash(key, "\0".join(node)) & _HASH_BITS)
        if _counted(node):
            base = _counted_base(key, type(node).__name__, _BUT_LAST(node))
            return _DERIVED | ((base + _LAST(node)) & _HASH_BITS)
        return _DERIVED | (_siphash(key, _named(node)) & _HASH_BITS)

    def _derived_all(self, nodes: Iterable[Node]) -> list[int]:
        """The numbers the nodes' names give them: SipHash-2-4 under the user's key of what
        each names, 62 of its bits; a PRF, so without the key names cannot be made to clash.
        In one list comprehension for a listing of tags (~0.1 us a tag: `_tags_numbered`; a
        keyed blake2b in Python cost ~1), of a section's digests, or of one image's directory
        (one hash: `_counted`), else `_derived` of each."""
        key = self._key
        if key is None:
            return [_DERIVED | (h & _HASH_BITS) for h in map(hash, nodes)]
        nodes = list(nodes)
        kinds = set(map(type, nodes))
        rest = _BUT_LAST(nodes[0]) if len(kinds) == 1 and _counted(nodes[0]) else None
        if kinds == {TagNode}:
            return _tags_numbered(key, cast("list[TagNode]", nodes))
        if rest is not None and all(map(eq, map(_BUT_LAST, nodes), repeat(rest))):  # alike
            base = _counted_base(key, kinds.pop().__name__, rest)
            hashed = map(add, repeat(base), map(_LAST, nodes))
        elif (named := _digests_named(nodes, kinds)) is not None:
            hashed = map(_siphash, repeat(key), named)
        else:
            return list(map(self._derived, nodes))
        return [_DERIVED | (h & _HASH_BITS) for h in hashed]

    def node(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def holds_none_of(self, nodes: set[Node]) -> bool:
        """Whether none of nodes has an inode here (`known` of a run, in one C call)."""
        return self._inodes.keys().isdisjoint(nodes)

    def known(self, node: Node) -> int | None:
        """The node's inode if the kernel may know it (for invalidations)."""
        return self._inodes.get(node)

    def fixed(self, ino: int) -> EntryAttributes | None:
        """What GETATTR answered for ino if it can never change (`keep_fixed`)."""
        return self._fixed.get(ino)

    def keep_fixed(self, entry: EntryAttributes) -> None:
        """Keep an immutable node's entry (made with its inode, st_ino) for each GETATTR of
        it. Whoever gets it hands it on unchanged, as pyfuse3 does (it copies it)."""
        self._fixed[entry.st_ino] = entry

    def rebind(self, ino: int, node: Node) -> None:
        """Make ino stand for another node (an upload renamed into the layer it became).

        The node may have an inode already; both numbers then name it until one is forgotten.
        """
        self._fixed.pop(ino, None)
        old = self._nodes.get(ino)
        if old is not None and self._inodes.get(old) == ino:
            del self._inodes[old]
        self._nodes[ino] = node
        self._inodes.setdefault(node, ino)

    def exchange(self, a: Node, b: Node) -> None:
        """Swap the numbers of two nodes (renameat2's RENAME_EXCHANGE: the kernel swaps their
        dentries); one the kernel does not hold is numbered afresh when next handed."""
        ino_a, ino_b = self._inodes.pop(a, None), self._inodes.pop(b, None)
        for ino, node in ((ino_a, b), (ino_b, a)):
            if ino is not None:
                self._fixed.pop(ino, None)
                self._nodes[ino] = node
                self._inodes[node] = ino

    def ref(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def ref_all(self, inos: Iterable[int]) -> None:
        """`ref` of each (a listing's entries, counted in C)."""
        self._lookups.update(inos)

    def unhanded(self, inos: Iterable[int]) -> None:
        """Numbers made for a reply that did not take them: those the kernel holds by no
        other lookup go, as at FORGET (a listing given up after this reply would keep them
        for good; the next READDIR numbers them again, the same unless taken meanwhile)."""
        for ino in inos:
            if ino not in self._lookups:
                self.forget(ino, 0)

    def forget(self, ino: int, count: int) -> None:
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._fixed.pop(ino, None)
        if ino != pyfuse3.ROOT_INODE:
            node = self._nodes.pop(ino, None)
            if node is not None and self._inodes.get(node) == ino:
                del self._inodes[node]
