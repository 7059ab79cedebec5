"""A remote layer read in runs (storage/remote/reader.py), against the real docker-registry
and counted by its access log: once a reader has seen a few runs, a jump fetches what such a
run reads in one range GET, so a ~100 KB file inside an indexed gzip layer of a remote mount
costs about one GET; a caller that reads exactly what it needs (one read per jump: zstd
frames, eStargz chunks) is sent exactly that; the widening is bounded, and none without
read-ahead budget. Why it matters: docker-registry 2.8 reads 4 MiB of the blob file for every
range GET whatever its size, so a small file's time is mostly its number of GETs
(docs/performance.md)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from support.layers import MEDIA_TYPES, compress, entry, half_random, tar_of
from support.mounts import Mount
from support.oci import image_manifest
from support.registry import RegistryServer
from support.roots import CONFIG, link_blobs
from support.tools import MIB

from storage.api import BlobInfo
from storage.digests import Digest, digest_bytes
from storage.drivers import FilesystemDriver
from storage.registry import Registry
from storage.remote.client import RemoteClient
from storage.remote.reader import WIDEN_MAX, InOrderDigest, ReadAheadBudget, RemoteLayerReader

pytestmark = [pytest.mark.remote, pytest.mark.registry]

NAME = "library/runs"
READ = 64 << 10  # what the rootfs reader asks of a gzip layer at a time
FILES = 24  # ~100 KB files, each after 600 KB of filler: ~8 MB of gzip, a seek point every ~0.5 MB
TAR_ORDER = [f"f{i:02}" for i in range(FILES)]


@dataclass
class Served:
    """The registry, the image's one gzip layer and the files in it."""

    server: RegistryServer
    layer: bytes
    digest: Digest
    files: dict[str, bytes]

    def sent(self, at_least: int = 0) -> list[int]:
        """Body sizes of the registry's 206 answers for the layer so far."""
        return self.server.range_gets(NAME, str(self.digest), at_least)

    def reader(self, client: RemoteClient, budget: ReadAheadBudget) -> RemoteLayerReader:
        info = BlobInfo(self.digest, len(self.layer), 0)
        return RemoteLayerReader(client, f"/v2/{NAME}/blobs/{self.digest}", info, budget)


async def _store(root: Path, layer: bytes) -> None:
    await link_blobs(root, NAME, [CONFIG, layer])
    repo = Registry(FilesystemDriver(root)).repository(NAME)
    manifest = image_manifest(CONFIG, [layer], layer_type=MEDIA_TYPES["gzip"])
    await repo.tags.put("latest", await repo.manifests.put(manifest))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    rng = random.Random(16)
    files = {name: half_random(90_000 + 1_000 * i, rng) for i, name in enumerate(TAR_ORDER)}
    entries = []
    for name, data in files.items():
        entries += [(entry(f"fill-{name}"), half_random(600_000, rng)), (entry(name), data)]
    layer = compress(tar_of(entries), "gzip")
    base = tmp_path_factory.mktemp("runs")
    trio.run(_store, base / "root", layer)
    with RegistryServer(base / "root", workdir=base / "registry") as server:
        yield Served(server, layer, digest_bytes(layer), files)


async def _run(reader: RemoteLayerReader, layer: bytes, start: int, reads: int) -> None:
    for offset in range(start, start + reads * READ, READ):
        assert await reader.read_at(offset, READ) == layer[offset : offset + READ]


async def _settle(reader: RemoteLayerReader) -> None:
    for window in reader._windows:
        await window.done.wait()  # the read-ahead too


async def test_a_jump_fetches_a_whole_typical_run_once_runs_are_seen(served):
    """Runs of four 64 KiB reads: the first two ramp up as any sequential run (64 KiB, a
    window of 128 KiB and 256 KiB then 512 KiB ahead); from then on a jump fetches its
    64 KiB plus the 192 KiB such runs read on, in one GET, and nothing ahead."""
    before = len(served.sent())
    async with RemoteClient(served.server.url, timeout=5, retries=0) as client:
        reader = served.reader(client, ReadAheadBudget())
        for start in range(0, 6 * MIB, MIB):
            await _run(reader, served.layer, start, 4)
        await _settle(reader)
        await reader.aclose()
    ramp = [READ, 2 * READ, 4 * READ, 8 * READ]
    assert sorted(served.sent(before + 12)[before:]) == sorted(2 * ramp + 4 * [4 * READ])


async def test_exact_reads_stay_exact_and_widening_is_bounded(served):
    """One read per jump (a zstd frame, an eStargz chunk): each GET is that read. Then two
    runs longer than WIDEN_MAX (bounded windows, not yet streamed): the next jump's window
    is its read plus WIDEN_MAX. Without read-ahead budget, a jump fetches its read only."""
    sizes = [10_000 + 7_001 * i for i in range(6)]
    async with RemoteClient(served.server.url, timeout=5, retries=0) as client:
        before = len(served.sent())
        exact = served.reader(client, ReadAheadBudget())
        for i, size in enumerate(sizes):
            offset = (5 - i) * 500_000
            assert await exact.read_at(offset, size) == served.layer[offset : offset + size]
        await exact.aclose()
        assert served.sent(before + len(sizes))[before:] == sizes

        long = served.reader(client, ReadAheadBudget())
        for start in (2 * MIB, 5 * MIB):  # their windows and read-ahead all lie past 2 MiB
            await _run(long, served.layer, start, WIDEN_MAX // READ + 2)
        await _settle(long)
        before = len(served.sent())
        await _run(long, served.layer, 0, 1)
        await long.aclose()
        assert served.sent(before + 1)[-1] == READ + WIDEN_MAX  # the last, sent alone

        before = len(served.sent())
        spent = served.reader(client, ReadAheadBudget(total=0))
        for start in (0, MIB, 2 * MIB):
            await _run(spent, served.layer, start, 4)
        await spent.aclose()
        assert served.sent(before + 12)[before:] == 12 * [READ]


@pytest.mark.mount
def test_a_small_file_of_a_remote_gzip_layer_costs_about_one_get(served, tmp_path):
    """`cat` of ~100 KB files in rootfs/ of a remote mount, shuffled, each checked: after the
    first (the index pass, then a run with nothing seen yet) they cost 1-2 GETs each, not
    the 3-4 of the sequential ramp (85 GETs for these 23 files before), and < 1 MB each."""
    names = TAR_ORDER[1:]
    random.Random(3).shuffle(names)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a pass: no index yet
        with Mount(served.server.url, tmp_path / "mnt", tmp_path / "regfs.log") as mount:
            top = mount.path(NAME, "rootfs", "latest")

            def cat(name: str) -> bytes:
                return subprocess.run(["cat", top / name], check=True, capture_output=True).stdout

            assert cat(TAR_ORDER[0]) == served.files[TAR_ORDER[0]]
            before = len(served.sent())
            for name in names:
                assert cat(name) == served.files[name], name
            sent = served.sent()[before:]
    assert len(sent) <= 2 * len(names), sent
    assert sum(sent) / len(names) <= MIB, sent


def test_a_window_far_ahead_ends_the_in_order_check_at_once():
    """The digest check of a blob read in order parks windows that land ahead of the bytes
    hashed so far; one more than AHEAD_MAX ahead (a random reader: rootfs/ files) gives the
    check up at once instead of holding windows up to the bound."""
    near = InOrderDigest(64 << 20)
    assert near.claim(MIB, b"x" * 10) == ([], False)
    assert not near.done and near._ahead_size == 10  # parked: the gap may yet be filled
    far = InOrderDigest(64 << 20)
    assert far.claim(InOrderDigest.AHEAD_MAX + 1, b"x" * 10) == ([], False)
    assert far.done and not far._ahead
