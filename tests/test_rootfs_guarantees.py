"""What issue 16 promises of the `rootfs/` view that no other test held it to.

- The indexer (in process): one build at a time, never in the trio thread whatever the
  layer's compression, and an index kept on disk compressed.
- Through a mount of images pushed with skopeo to the real registry: a directory replaced by
  a file and a directory re-declared with new attributes, as `umoci unpack` makes them; bad
  layers (a bare `.wh.`, a symlink loop in a parent path) that fail their own image only;
  member names that climb out (`../../`, absolute) kept inside the image.
- Through a remote (`https://`) mount: a listing of an indexed image reads no layer byte,
  and a pass reads its layer in a few GETs (counted through a proxy).

The tests need different parts (in process, a mount, the registry, https), so each one
carries its own layer markers instead of one `pytestmark` for the module.
"""

from __future__ import annotations

import io
import random
import time

import pytest
import trio
import zstandard
from support.layers import compress, entry, half_random, many_members_tar, tar_of
from support.passes import Openings, loop_lag, timed_layer
from support.tools import MIB

from storage.rootfs.cache import IndexCache
from storage.rootfs.index import Format, Indexer, LayerIndex

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
IN_PROCESS = [pytest.mark.storage]


@pytest.fixture
def cache(tmp_path):
    index_cache = IndexCache(tmp_path / "index")
    yield index_cache
    index_cache.close()


def one_big_file(size: int, seed: int) -> bytes:
    """A tar of one file that compresses to about half (seek points every ~0.5 MB)."""
    return tar_of([(entry("f"), half_random(size, random.Random(seed)))])


# --------------------------------------------------------------------------- the indexer


@pytest.mark.parametrize("child", [True, False], ids=["subprocess", "in process"])
@pytest.mark.storage
async def test_two_layers_asked_at_once_are_indexed_one_after_the_other(cache, child):
    """Two images' builds ask for two different gzip layers at the same moment: the second
    pass opens its blob only once the first has closed its own, and meanwhile shows as
    waiting for another layer's index."""
    openings = Openings()
    layers = [
        timed_layer(compress(one_big_file(8 * MIB, s), "gzip"), "gzip", openings) for s in (1, 2)
    ]
    indexer = Indexer(cache, subprocess=child)
    waiting: set[str] = set()
    results: list[LayerIndex] = []

    async def index(ref) -> None:
        results.append(await indexer.index(ref))

    async with trio.open_nursery() as nursery:
        for ref in layers:
            nursery.start_soon(index, ref)
        while len(results) < 2:
            waiting |= {p.describe() for p in indexer.progress.values() if p.started is None}
            await trio.sleep(0.005)
    assert indexer.passes == 2 and {r.format for r in results} == {Format.GZIP}
    assert len(openings.seen) == 2 and all(o.closed is not None for o in openings.seen)
    assert openings.overlaps() == [], openings.seen
    assert any("waiting for another layer's index" in text for text in waiting), waiting


@pytest.mark.parametrize("how", ["zstd", "tar", "gzip"])
@pytest.mark.storage
async def test_the_loop_keeps_running_during_every_threaded_pass(cache, how):
    """The passes that run in a worker thread of the daemon (zstd, plain tar, gzip in
    process: the forms the child declines) leave the loop free. 12,000 members and a big
    file make each pass a second or so of Python and of decompression: run in the trio
    thread, it would stall the loop that long (the child-process gzip pass is
    test_rootfs_index's)."""
    files = [(entry(f"d{i % 50}/f{i}"), b"") for i in range(12_000)]
    raw = tar_of([*files, (entry("big"), half_random(8 * MIB, random.Random(3)))])
    ref = timed_layer(compress(raw, how), how, Openings())
    async with loop_lag() as lags:
        started = time.monotonic()
        index = await Indexer(cache, subprocess=False).index(ref)
        took = time.monotonic() - started
    assert index.format is Format(how) and len(index.members) == 12_001
    assert len(lags) > 20
    assert max(lags) < min(0.5, took / 2), (took, sorted(lags)[-5:])


@pytest.mark.storage
async def test_the_kept_index_is_compressed(cache, tmp_path):
    """`<hex>.idx` (and a gzip layer's `<hex>.gzi`) is one zstd frame, far smaller than the
    member table it holds."""
    ref = timed_layer(compress(many_members_tar(20_000), "gzip"), "gzip", Openings())
    index = await Indexer(cache).index(ref)
    assert len(index.members) == 20_000
    hexdigest = str(ref.digest).split(":", 1)[1]
    for suffix in (".idx", ".gzi"):
        kept = (tmp_path / "index" / f"{hexdigest}{suffix}").read_bytes()
        assert kept.startswith(ZSTD_MAGIC), suffix
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(kept))
        decoded = reader.read()
        while chunk := reader.read():
            decoded += chunk
        assert len(kept) < len(decoded) / 2, (suffix, len(kept), len(decoded))
        if suffix == ".idx":
            assert decoded.startswith(b"regfs-layer-index ")
            assert decoded.count(b"d7/f") >= 200  # the member names are in it
