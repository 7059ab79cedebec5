"""The in-memory driver: a tree of dicts, for tests and for `regfs mount inmemory:`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import Busy, InvalidOffset
from .base import FileInfo, FileReader, FileWriter, PathNotFound, StorageDriver


@dataclass
class _File:
    data: bytearray = field(default_factory=bytearray)
    mtime_ns: int = field(default_factory=time.time_ns)
    writing: bool = False


@dataclass
class _Dir:
    children: dict[str, _File | _Dir] = field(default_factory=dict)
    mtime_ns: int = field(default_factory=time.time_ns)


class _Reader(FileReader):
    def __init__(self, node: _File) -> None:
        self._data = bytes(node.data)  # a snapshot, as an open file descriptor would keep
        self.size = len(self._data)

    async def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0:
            raise InvalidOffset(f"negative offset {offset}")
        return self._data[offset : offset + length]

    async def aclose(self) -> None:
        pass


class _Writer(FileWriter):
    def __init__(self, node: _File) -> None:
        self._node = node

    @property
    def size(self) -> int:  # type: ignore[override]  # FileWriter's attribute; the node's live length
        return len(self._node.data)

    def write_at_blocking(self, offset: int, data: bytes) -> None:
        if not 0 <= offset <= self.size:
            raise InvalidOffset(f"write at {offset} would leave a gap after {self.size}")
        self._node.data[offset : offset + len(data)] = data
        self._node.mtime_ns = time.time_ns()

    async def truncate(self, size: int) -> None:
        del self._node.data[size:]
        self._node.mtime_ns = time.time_ns()

    def sync_blocking(self) -> None:
        pass

    async def aclose(self) -> None:
        self._node.writing = False


class InMemoryDriver(StorageDriver):
    name = "inmemory"

    def __init__(self) -> None:
        self._root = _Dir()

    def __repr__(self) -> str:
        return "InMemoryDriver()"

    def _find(self, path: str) -> _File | _Dir:
        node: _File | _Dir = self._root
        for part in path.strip("/").split("/") if path != "/" else ():
            if not isinstance(node, _Dir) or part not in node.children:
                raise PathNotFound(path)
            node = node.children[part]
        return node

    def _file(self, path: str) -> _File:
        node = self._find(path)
        if not isinstance(node, _File):
            raise PathNotFound(path)
        return node

    def _parent(self, path: str, create: bool) -> tuple[_Dir, str]:
        *dirs, leaf = path.strip("/").split("/")
        node = self._root
        for part in dirs:
            child = node.children.get(part)
            if child is None and create:
                child = node.children[part] = _Dir()
            if not isinstance(child, _Dir):
                raise PathNotFound(path)
            node = child
        return node, leaf

    async def _get_content(self, path: str, limit: int) -> bytes:
        return bytes(self._file(path).data[:limit])

    async def _put_content(self, path: str, data: bytes) -> None:
        parent, leaf = self._parent(path, create=True)
        if isinstance(parent.children.get(leaf), _Dir):
            raise PathNotFound(path)
        parent.children[leaf] = _File(bytearray(data))

    async def _reader(self, path: str) -> FileReader:
        return _Reader(self._file(path))

    async def _writer(self, path: str) -> FileWriter:
        parent, leaf = self._parent(path, create=True)
        node = parent.children.setdefault(leaf, _File())
        if not isinstance(node, _File):
            raise PathNotFound(path)
        if node.writing:
            raise Busy(f"{path} is being written by another writer")
        node.writing = True
        return _Writer(node)

    async def _being_written(self, path: str) -> bool:
        try:
            return self._file(path).writing
        except PathNotFound:
            return False

    async def _stat(self, path: str) -> FileInfo:
        node = self._find(path)
        if isinstance(node, _Dir):
            return FileInfo(path, 0, node.mtime_ns, True)
        return FileInfo(path, len(node.data), node.mtime_ns, False)

    async def _present(self, directory: str, names: list[str]) -> list[bool]:
        found = []
        for name in names:
            try:
                self._find(f"{directory.rstrip('/')}/{name}")
                found.append(True)
            except PathNotFound:
                found.append(False)
        return found

    async def _empty(self, directory: str, names: list[str]) -> list[bool]:
        found = []
        for name in names:
            try:
                node = self._find(f"{directory.rstrip('/')}/{name}")
                found.append(isinstance(node, _Dir) and not node.children)
            except PathNotFound:
                found.append(False)
        return found

    async def _list(self, path: str) -> list[str]:
        node = self._find(path)
        if not isinstance(node, _Dir):
            raise PathNotFound(path)
        return sorted(node.children)

    async def _move(self, source: str, dest: str) -> None:
        node = self._find(source)
        src_parent, src_leaf = self._parent(source, create=False)
        dst_parent, dst_leaf = self._parent(dest, create=True)
        del src_parent.children[src_leaf]
        dst_parent.children[dst_leaf] = node

    async def _remove_empty(self, path: str) -> bool:
        try:
            node = self._find(path)
        except PathNotFound:
            return False
        if not isinstance(node, _Dir) or node.children:
            return False
        parent, leaf = self._parent(path, create=False)
        del parent.children[leaf]
        return True

    async def _delete(self, path: str) -> None:
        self._find(path)
        parent, leaf = self._parent(path, create=False)
        del parent.children[leaf]
