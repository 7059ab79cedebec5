"""regfs/ reaches a registry source only through storage/api.py: no module of it but the
factory (regfs/sources.py) imports an implementation, so a new source needs no change there."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pyfuse3
import pytest

from storage.api import EmptyReader, local_fileno
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver

pytestmark = pytest.mark.storage

REGFS = Path(__file__).resolve().parent.parent / "regfs"
# Modules every source shares: the contract, and rules and types that belong to no source.
NEUTRAL = {
    "storage.api",
    "storage.cache",
    "storage.digests",
    "storage.errors",
    "storage.gcpause",
    "storage.manifest_format",
    "storage.names",
    "storage.nurseries",  # a nursery's error as itself: a rule of trio, not of a source
    "storage.privatedir",  # the user's private directories (the inode key): no source's
}
# `regfs check` and `purge-uploads` are tools over a storage root, not a registry source.
# The rootfs/ view uses storage/rootfs, which works on any source's BlobReaders.
ROOTFS = {
    "storage.rootfs.cache",
    "storage.rootfs.errors",
    "storage.rootfs.image",
    "storage.rootfs.index",
    "storage.rootfs.members",
    "storage.rootfs.merge",
    "storage.rootfs.reader",
}
TOOLS = {"maintenance.py": {"storage.check"}, "rootfs.py": ROOTFS}


def storage_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "storage" or name.startswith("storage.")}


def test_regfs_imports_only_the_contract_outside_the_factory():
    wrong = {
        path.name: sorted(storage_imports(path) - NEUTRAL - TOOLS.get(path.name, set()))
        for path in sorted(REGFS.glob("*.py"))
        if path.name != "sources.py"
    }
    assert {name: modules for name, modules in wrong.items() if modules} == {}


async def test_a_local_blob_reader_gives_its_blob_file(registry, tmp_path):
    """`local_fileno` of a layer reader: the blob's own file on a filesystem root (so the
    rootfs index reads it in place), None in memory; readers without `fileno` give None."""
    upload = await registry.repository("a/b").layers.upload()
    await upload.write_at(0, b"layer bytes")
    digest = digest_bytes(b"layer bytes")
    await upload.finish(digest)
    reader = await registry.repository("a/b").layers.fetch(digest)
    try:
        fd = local_fileno(reader)
        if isinstance(registry.driver, FilesystemDriver):
            assert fd is not None and os.pread(fd, 100, 0) == b"layer bytes"
            blob = next((tmp_path / "root").rglob(f"{digest.hex}/data"))
            assert os.path.samestat(os.fstat(fd), blob.stat())
        else:
            assert fd is None
    finally:
        await reader.aclose()
    assert local_fileno(reader) is None  # closed: the descriptor is no longer handed out
    assert local_fileno(EmptyReader()) is None


# pyfuse3's calls that make the daemon write a notification to the kernel (invalidate_entry,
# invalidate_entry_async, invalidate_inode, notify_store, and any it adds later).
NOTIFICATIONS = frozenset(
    name for name in dir(pyfuse3) if name.startswith(("invalidate_", "notify_"))
)


def notifications_named(source: str) -> list[str]:
    """Every name of NOTIFICATIONS that `source` uses: as an attribute
    (`pyfuse3.invalidate_entry`), a bare name or import alias, or a string (`getattr`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            found.append(node.attr)
        elif isinstance(node, ast.Name):
            found.append(node.id)
        elif isinstance(node, ast.alias):
            found.append(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
    return [name for name in found if name in NOTIFICATIONS]


def test_regfs_sends_the_kernel_no_invalidation_or_notification():
    """Issue 18 keeps this hazard closed (docs/concurrency.md, "Caching and timeouts"): an
    entry invalidation takes the parent directory's lock, which a client in `create()` holds
    while it waits for the daemon, so a daemon killed while one waited could never finish
    dying. Tags get short kernel timeouts instead; nothing in regfs/ may call pyfuse3's
    invalidate_* or notify_*."""
    assert {"invalidate_entry", "invalidate_inode", "notify_store"} <= NOTIFICATIONS
    sample = (
        "import pyfuse3\nfrom pyfuse3 import notify_store as store\n"
        "pyfuse3.invalidate_entry_async(1, b'x')\ngetattr(pyfuse3, 'invalidate_inode')(1)\n"
    )
    assert sorted(notifications_named(sample)) == [
        "invalidate_entry_async",
        "invalidate_inode",
        "notify_store",
    ]
    used = {
        str(path.relative_to(REGFS)): names
        for path in sorted(REGFS.rglob("*.py"))
        if (names := notifications_named(path.read_text()))
    }
    assert used == {}
