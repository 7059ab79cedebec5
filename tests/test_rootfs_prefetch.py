"""A random read of a gzip layer fetches the blob bytes it needs in one read
(`SeekPoints.span` + `BlobFile.prefetch`, storage/rootfs): the span at its edges (first and
last seek point, the blob's end), the prefetch's bound and its errors, every read of a real
gzip blob as one `read_at` with exact content, a cancelled read, and, through a remote mount
of the real docker-registry counted by its access log, one range GET per small file with the
content of `umoci unpack`. Why: docker-registry 2.8 costs about the same per range GET
whatever its size, so a small file's time is mostly its number of GETs
(docs/performance.md)."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import threading
from dataclasses import dataclass, field

import pytest
import trio
from support.images import Entry, build_layered_image, umoci_unpack
from support.layers import compress, entry, half_random, tar_of
from support.mounts import Mount
from support.oci import read_oci_layout, skopeo_push
from support.registry import RegistryServer
from support.tools import MIB, sha256_file, sha256sum

from storage.api import Buffer
from storage.digests import digest_bytes
from storage.rootfs.blobfile import BlobFile, Stopped
from storage.rootfs.errors import CorruptLayer
from storage.rootfs.gzipseek import RANDOM_READBUF, GzipPass, GzipReader, SeekPoints
from storage.rootfs.members import Kind

pytestmark = pytest.mark.storage

WINDOW = 64 << 10  # as storage/rootfs/reader.py's BlobFile for random gzip reads
WINDOWS = 16
CAP = WINDOW * (WINDOWS - 1)


@dataclass
class Recording:
    """A blob in memory that records every read of it; `fail` makes the next read raise
    it, `short` makes the next read return that many bytes fewer, `block` makes reads
    wait for `gate`."""

    data: bytes
    reads: list[tuple[int, int]] = field(default_factory=list)
    fail: BaseException | None = None
    short: int = 0
    gate: trio.Event | None = None

    async def read_at(self, offset: int, size: int) -> Buffer:
        self.reads.append((offset, size))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail
        short, self.short = self.short, 0
        return self.data[offset : offset + size - short]

    async def aclose(self) -> None:
        pass


def blob_file(source: Recording, stop: threading.Event | None = None) -> BlobFile:
    """A BlobFile as the rootfs reader makes one for random gzip reads."""
    token = trio.lowlevel.current_trio_token()
    size = len(source.data)
    return BlobFile(
        source,
        digest_bytes(source.data),
        size,
        token,
        window=WINDOW,
        windows=WINDOWS,
        stop=stop,
        verify=False,
    )


# -- the span ------------------------------------------------------------------------------

POINTS = SeekPoints([0, 1000, 2000, 3000], [20, 400, 900, 1500])
BIG = SeekPoints([0, 1 << 20, 2 << 20, 3 << 20], [20, 400_000, 800_000, 1_200_000])


def test_span_from_the_first_point_starts_at_the_blob_start():
    """Before the second point zran reads the header too: from byte 0."""
    assert BIG.span(0, 100, 2_000_000)[0] == 0
    assert BIG.span((1 << 20) - 1, 1, 2_000_000)[0] == 0


def test_span_starts_a_byte_before_the_point_at_or_before_the_read():
    """The byte before a point's compressed offset holds its first bits; a read that
    starts exactly at a point starts there."""
    assert BIG.span(1 << 20, 10, 2_000_000)[0] == 400_000 - 1
    assert BIG.span((2 << 20) + 5, 10, 2_000_000)[0] == 800_000 - 1


def test_span_ends_a_readbuf_past_the_point_after_the_read_and_its_buffer():
    """zran decompresses the read and up to a buffer more; the input for that lies before
    the next point, and comes in RANDOM_READBUF reads."""
    end = (1 << 20) - RANDOM_READBUF - 10  # the read and its buffer end before point 1
    assert BIG.span(100, end - 100, 2_000_000) == (0, 400_000 + RANDOM_READBUF)
    # one byte more and the buffer reaches point 1 exactly: still before it
    assert BIG.span(100, end - 100 + 10, 2_000_000) == (0, 400_000 + RANDOM_READBUF)
    # past it: up to point 2
    assert BIG.span(100, end - 100 + 11, 2_000_000) == (0, 800_000 + RANDOM_READBUF)


def test_span_after_the_last_point_runs_to_the_blob_end():
    """Past the last point zran decompresses on to the stream's end (and looks for another
    member after it): the span is the blob's end, never past it."""
    assert BIG.span(3 << 20, 10, 1_300_000) == (1_200_000 - 1, 1_300_000)
    assert BIG.span((3 << 20) - RANDOM_READBUF, 1, 1_300_000) == (800_000 - 1, 1_300_000)
    # the point after exists, but its readbuf would pass the blob's end
    assert POINTS.span(1000, 10, 1550) == (399, 1550)


def test_span_without_points_is_the_whole_blob():
    assert SeekPoints([], []).span(5000, 10, 777) == (0, 777)


# -- the prefetch --------------------------------------------------------------------------


async def _in_thread(call, *args):
    return await trio.to_thread.run_sync(call, *args)


async def test_a_prefetch_is_one_read_of_whole_windows_and_is_then_served_from_them():
    source = Recording(random.Random(1).randbytes(40 * WINDOW + 123))
    blob = blob_file(source)
    await _in_thread(blob.prefetch, WINDOW + 5, 3 * WINDOW + 1)
    assert source.reads == [(WINDOW, 3 * WINDOW)]
    blob.seek(WINDOW)
    assert await _in_thread(blob.read, 3 * WINDOW) == source.data[WINDOW : 4 * WINDOW]
    assert len(source.reads) == 1 and blob.bytes_read == 3 * WINDOW


async def test_a_prefetch_skips_cached_windows_at_either_end():
    source = Recording(random.Random(2).randbytes(40 * WINDOW))
    blob = blob_file(source)
    await _in_thread(blob.prefetch, 2 * WINDOW, 3 * WINDOW)
    await _in_thread(blob.prefetch, 5 * WINDOW, 6 * WINDOW)
    await _in_thread(blob.prefetch, 0, 6 * WINDOW)  # cached: [2, 3) and [5, 6)
    assert source.reads[2:] == [(0, 5 * WINDOW)]  # the middle one again: one read still
    await _in_thread(blob.prefetch, WINDOW, 6 * WINDOW)
    assert len(source.reads) == 3  # all cached: nothing read


async def test_a_prefetch_is_bounded_by_the_cache_and_the_blob():
    """Never more than the cache holds less one window, from the span's start (more would
    evict its own start); never past the blob's end (the last window short)."""
    source = Recording(random.Random(3).randbytes(40 * WINDOW + 123))
    blob = blob_file(source)
    await _in_thread(blob.prefetch, 10, 40 * WINDOW)
    assert source.reads == [(0, CAP)]
    await _in_thread(blob.prefetch, 38 * WINDOW + 7, 1 << 40)
    assert source.reads[1] == (38 * WINDOW, 2 * WINDOW + 123)
    await _in_thread(blob.prefetch, 40 * WINDOW + 123, 1 << 40)  # at the end: nothing
    await _in_thread(blob.prefetch, 500, 400)  # empty: nothing
    assert len(source.reads) == 2
    blob.seek(38 * WINDOW)
    assert await _in_thread(blob.read, 1 << 20) == source.data[38 * WINDOW :]
    assert len(source.reads) == 2


async def test_a_failed_prefetch_raises_keeps_its_error_and_caches_nothing():
    source = Recording(random.Random(4).randbytes(10 * WINDOW))
    blob = blob_file(source)
    source.fail = ConnectionResetError("gone")
    with pytest.raises(ConnectionResetError):
        await _in_thread(blob.prefetch, 0, 3 * WINDOW)
    assert blob.error is not None and isinstance(blob.error, ConnectionResetError)
    source.short = 1  # a server that sends less than asked
    with pytest.raises(CorruptLayer, match="shorter than its size"):
        await _in_thread(blob.prefetch, 0, 3 * WINDOW)
    assert isinstance(blob.error, CorruptLayer)
    blob.seek(0)
    assert await _in_thread(blob.read, WINDOW) == source.data[:WINDOW]
    assert source.reads == [(0, 3 * WINDOW)] * 2 + [(0, WINDOW)]  # nothing was kept


async def test_a_stopped_pass_prefetches_nothing():
    source = Recording(random.Random(5).randbytes(10 * WINDOW))
    stop = threading.Event()
    stop.set()
    blob = blob_file(source, stop=stop)
    with pytest.raises(Stopped):
        await _in_thread(blob.prefetch, 0, 3 * WINDOW)
    assert source.reads == []


# -- reads of a real gzip layer ------------------------------------------------------------


@dataclass
class Layer:
    blob: bytes
    raw: bytes  # the tar
    points: bytes  # the exported seek points, as the index cache keeps them


async def _layer(raw: bytes, blob: bytes) -> Layer:
    source = Recording(blob)
    file = BlobFile(
        source, digest_bytes(blob), len(blob), trio.lowlevel.current_trio_token(), windows=64
    )
    out = io.BytesIO()

    def run() -> None:
        gzip = GzipPass(file, digest_bytes(blob))
        try:
            assert b"".join(gzip.chunks()) == raw
            gzip.export(out)
        finally:
            gzip.close()

    await trio.to_thread.run_sync(run)
    return Layer(blob, raw, out.getvalue())


def _reader(layer: Layer, source: Recording) -> GzipReader:
    fd = os.memfd_create("points")
    os.write(fd, layer.points)
    return GzipReader(blob_file(source), digest_bytes(layer.blob), fd)


def _reads(raw: bytes, rng: random.Random) -> list[tuple[int, int]]:
    """Reads of ~100 KB as `cat` makes them, and the edges: the tar's start and end."""
    reads = [(0, 100_000), (len(raw) - 70_000, 70_000), (len(raw) - 10, 10)]
    for _ in range(12):
        size = rng.randrange(1, 200_000)
        reads.append((rng.randrange(0, len(raw) - size), size))
    return reads


@pytest.mark.parametrize("members", [1, 3])
async def test_each_read_of_a_gzip_layer_is_one_read_with_exact_bytes(members):
    """A layer of half-random data (a seek point every ~0.5 MB of blob), in one gzip member
    or several: every read, at the first point, across points, after the last, costs one
    `read_at` (none when the windows are still cached) within the cap, and gives the tar's
    bytes."""
    rng = random.Random(members)
    raw = tar_of([(entry(f"f{i}"), half_random(900_000, rng)) for i in range(8)])
    cut = [len(raw) * k // members // 512 * 512 for k in range(members + 1)]
    blob = b"".join(compress(raw[a:b], "gzip") for a, b in itertools.pairwise(cut))
    layer = await _layer(raw, blob)
    source = Recording(blob)
    gzip = _reader(layer, source)
    try:
        for offset, size in _reads(raw, rng):
            before = len(source.reads)
            data = await trio.to_thread.run_sync(gzip.pread, offset, size)
            assert data == raw[offset : offset + size], (offset, size)
            assert len(source.reads) - before <= 1, (offset, size, source.reads[before:])
        assert max(size for _, size in source.reads) <= CAP
    finally:
        gzip.close()


async def test_a_file_read_on_is_one_sequential_run_after_its_first_read():
    """A big file read in 128 KiB pieces (FUSE requests): only its first read prefetches;
    zran goes on from where it stopped, so the rest is window after window, each where the
    last ended (one run, which an HTTP reader streams), never back to a seek point."""
    rng = random.Random(6)
    raw = tar_of([(entry("big"), half_random(6_000_000, rng))])
    blob = compress(raw, "gzip")
    layer = await _layer(raw, blob)
    source = Recording(blob)
    gzip = _reader(layer, source)
    try:
        start, piece = 512 + 1_000_000, 128 << 10  # the data begins after one header block
        for offset in range(start, 512 + 6_000_000, piece):
            data = await trio.to_thread.run_sync(gzip.pread, offset, piece)
            assert data == raw[offset : offset + piece]
        first, *rest = source.reads
        assert first[1] > WINDOW and all(size == WINDOW for _, size in rest[:-1]), source.reads
        ends = [offset + size for offset, size in source.reads]
        assert [offset for offset, _ in rest] == ends[:-1]
    finally:
        gzip.close()


async def test_a_span_over_the_cap_is_fetched_in_bounded_reads():
    """Incompressible data: a point's span (~1 MiB of blob) is more than the cap; the
    prefetch fetches the cap, the rest is read as it goes, all bounded, bytes exact."""
    rng = random.Random(7)
    raw = tar_of([(entry(f"r{i}"), rng.randbytes(1_500_000)) for i in range(3)])
    blob = compress(raw, "gzip")
    layer = await _layer(raw, blob)
    source = Recording(blob)
    gzip = _reader(layer, source)
    try:
        for offset, size in _reads(raw, rng):
            data = await trio.to_thread.run_sync(gzip.pread, offset, size)
            assert data == raw[offset : offset + size], (offset, size)
        assert max(size for _, size in source.reads) == CAP
    finally:
        gzip.close()


async def test_a_read_reports_the_source_error_and_the_next_read_works():
    rng = random.Random(8)
    raw = tar_of([(entry(f"f{i}"), half_random(600_000, rng)) for i in range(4)])
    blob = compress(raw, "gzip")
    layer = await _layer(raw, blob)
    source = Recording(blob)
    gzip = _reader(layer, source)
    try:
        source.fail = ConnectionResetError("reset by peer")
        with pytest.raises(ConnectionResetError, match="reset by peer"):
            await trio.to_thread.run_sync(gzip.pread, 1_000_000, 1000)
        source.short = 3
        with pytest.raises(CorruptLayer, match="shorter than its size"):
            await trio.to_thread.run_sync(gzip.pread, 1_000_000, 1000)
        data = await trio.to_thread.run_sync(gzip.pread, 1_000_000, 1000)
        assert data == raw[1_000_000:1_001_000]
    finally:
        gzip.close()


class Ended(BaseException):
    """What a source's read raises when the trio run ends under it (`trio.Cancelled` in a
    system task): no `Exception`, so nothing on the way may swallow it."""


async def test_a_read_cancelled_or_ended_under_its_prefetch_keeps_the_reader_whole():
    """The caller cancelled while the prefetch waits on the source: the thread is not
    abandoned, the fetch completes and is kept, the next read costs nothing. A source read
    that ends with a BaseException: it goes up unchanged, nothing half-fetched is kept,
    the next read is exact."""
    rng = random.Random(9)
    raw = tar_of([(entry(f"f{i}"), half_random(600_000, rng)) for i in range(4)])
    blob = compress(raw, "gzip")
    layer = await _layer(raw, blob)
    source = Recording(blob, gate=trio.Event())
    gzip = _reader(layer, source)
    try:
        scope, done = trio.CancelScope(), []

        async def read() -> None:
            with scope:
                done.append(await trio.to_thread.run_sync(gzip.pread, 1_500_000, 1000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            while not source.reads:
                await trio.sleep(0.01)
            scope.cancel()
            await trio.sleep(0.1)
            assert not done  # the read waits for its thread, which waits for the source
            assert source.gate is not None
            source.gate.set()
        source.gate = None
        data = await trio.to_thread.run_sync(gzip.pread, 1_500_000, 1000)
        assert data == raw[1_500_000:1_501_000]
        assert len(source.reads) == 1

        source.fail = Ended()
        with pytest.raises(Ended):
            await trio.to_thread.run_sync(gzip.pread, 100, 1000)
        assert await trio.to_thread.run_sync(gzip.pread, 100, 1000) == raw[100:1100]
        assert source.reads[1] == source.reads[2] and len(source.reads) == 3
    finally:
        gzip.close()


# -- through a remote mount ----------------------------------------------------------------

REPO = "library/prefetch"
SMALL = [f"etc/f{i:02}" for i in range(16)]  # ~100 KB each, after 600 KB of filler


@pytest.mark.mount
@pytest.mark.remote
@pytest.mark.registry
def test_a_small_file_of_a_remote_mount_costs_one_get_and_is_exact(tmp_path):
    """An image built with umoci, pushed with skopeo to docker-registry, mounted over HTTP:
    after the first `cat` (the index pass), each ~100 KB file, out of tar order, costs one
    range GET of the layer (none when an earlier file's span held it; the registry's access
    log; 1-2 before, 3-4 before that) of < 1 MiB, and its sha256 is that of `umoci
    unpack`'s file."""
    rng = random.Random(16)
    entries = [Entry("etc", Kind.DIR, mode=0o755)]
    for i, name in enumerate(SMALL):
        entries += [
            Entry(f"fill/{i:02}", Kind.FILE, half_random(600_000, rng)),
            Entry(name, Kind.FILE, half_random(90_000 + 1_000 * i, rng)),
        ]
    entries.insert(1, Entry("fill", Kind.DIR, mode=0o755))
    layout, root = tmp_path / "layout", tmp_path / "root"
    build_layered_image(layout, "latest", [entries])
    unpacked = umoci_unpack(layout, "latest", tmp_path / "bundle")
    layer = json.loads(read_oci_layout(layout, "latest").manifest)["layers"][0]["digest"]
    # four files apart in tar order: a span that starts where the previous file's ended would
    # be a sequential run to the remote reader, which reads a window ahead (a second GET)
    names = [SMALL[1 + (3 + k * 4) % (len(SMALL) - 1)] for k in range(len(SMALL) - 1)]
    with (
        RegistryServer(root, workdir=tmp_path / "registry") as server,
        pytest.MonkeyPatch.context() as patch,
    ):
        skopeo_push(layout, "latest", server.host, REPO)
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a pass: no index yet
        with Mount(server.url, tmp_path / "mnt", tmp_path / "regfs.log") as mount:
            top = mount.path(REPO, "rootfs", "latest")
            assert sha256sum(top / SMALL[0]) == sha256_file(unpacked / SMALL[0])
            sent = [server.range_gets(REPO, layer)]
            for name in names:
                assert sha256sum(top / name) == sha256_file(unpacked / name), name
                sent.append(server.range_gets(REPO, layer, len(sent[-1]) + 1))
    per_file = [after[len(before) :] for before, after in itertools.pairwise(sent)]
    assert all(len(gets) <= 1 for gets in per_file), per_file
    assert sum(map(len, per_file)) >= len(names) - 2, per_file  # none only when cached
    assert max(map(max, filter(None, per_file))) < MIB, per_file


@pytest.mark.mount
@pytest.mark.remote
@pytest.mark.registry
def test_a_fresh_mount_with_the_index_kept_reads_a_file_with_no_head_of_its_layer(tmp_path):
    """A fresh remote mount whose index cache holds the layer's index: its first `cat`
    asks the registry for the tag's manifest and the one range GET of the layer, and no
    HEAD of the layer (its size is the manifest's descriptor's; the HEAD was a round trip
    in turn before the GET, docs/performance.md "stop 27, i"); the bytes are those of
    `umoci unpack`. Counted in the registry's access log."""
    rng = random.Random(27)
    entries = [Entry("etc", Kind.DIR, mode=0o755), Entry("fill", Kind.DIR, mode=0o755)]
    for i, name in enumerate(SMALL[:4]):
        entries += [
            Entry(f"fill/{i:02}", Kind.FILE, half_random(600_000, rng)),
            Entry(name, Kind.FILE, half_random(90_000, rng)),
        ]
    layout, root = tmp_path / "layout", tmp_path / "root"
    build_layered_image(layout, "latest", [entries])
    unpacked = umoci_unpack(layout, "latest", tmp_path / "bundle")
    layer = json.loads(read_oci_layout(layout, "latest").manifest)["layers"][0]["digest"]
    with (
        RegistryServer(root, workdir=tmp_path / "registry") as server,
        pytest.MonkeyPatch.context() as patch,
    ):
        skopeo_push(layout, "latest", server.host, REPO)
        patch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        with Mount(server.url, tmp_path / "mnt", tmp_path / "regfs.log") as mount:
            top = mount.path(REPO, "rootfs", "latest")
            assert sha256sum(top / SMALL[0]) == sha256_file(unpacked / SMALL[0])  # the pass
        before = len(server.range_gets(REPO, layer))
        logged = len(server.log_path.read_text(errors="replace"))
        with Mount(server.url, tmp_path / "mnt", tmp_path / "regfs-2.log") as mount:
            top = mount.path(REPO, "rootfs", "latest")
            assert sha256sum(top / SMALL[2]) == sha256_file(unpacked / SMALL[2])
            gets = server.range_gets(REPO, layer, before + 1)[before:]
        fresh = server.log_path.read_text(errors="replace")[logged:]
    assert len(gets) == 1 and gets[0] < MIB, gets
    assert f"HEAD /v2/{REPO}/blobs/{layer} " not in fresh, fresh
