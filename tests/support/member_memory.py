"""What a layer of many tiny members costs the daemon: the pass over a gzip layer of `count`
empty files (the daemon's `Indexer`, its gzip child included) and the merge of the table it
gives, in a process of their own so that the peak RSS measured is theirs.

`python -m support.member_memory COUNT LIMIT` (run from tests/, the project root on
PYTHONPATH) prints one JSON `Measured`; `measured(count, limit)` runs it.
"""

from __future__ import annotations

import dataclasses
import gc
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from storage.rootfs.cache import IndexCache
from storage.rootfs.errors import LayerTooLarge
from storage.rootfs.index import Indexer
from storage.rootfs.merge import merge
from storage.rootfs.tarscan import Limits
from support.layers import entry
from support.passes import Openings, timed_layer

TESTS = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measured:
    """Members indexed and nodes merged (0 when refused, with the reason), the peak RSS
    above the start at the end of the pass and at the end of the merge, the RSS kept after
    (the table and the tree, bytes), and the seconds of the pass and of the merge."""

    members: int
    nodes: int
    pass_peak: int
    peak: int
    after: int
    pass_seconds: float
    merge_seconds: float
    refused: str = ""


def many_members_gzip(count: int) -> bytes:
    """A gzip layer of `count` empty files, `d<i % 100>/f<i>`, written as a stream: neither
    the tar (512 bytes a member) nor its TarInfos are ever held whole."""
    out = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.GNU_FORMAT) as tar,
    ):
        for i in range(count):
            tar.addfile(entry(f"d{i % 100}/f{i}"))
    return out.getvalue()


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


async def _measure(count: int, limit: int) -> Measured:
    layer = timed_layer(many_members_gzip(count), "gzip", Openings())
    with tempfile.TemporaryDirectory() as where:
        cache = IndexCache(Path(where))
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM: the peak below is the pass's and the merge's
        base = _rss("VmRSS")
        started = time.perf_counter()
        try:
            index = await Indexer(cache, Limits(members=limit)).index(layer)
        except LayerTooLarge as error:
            peak = _rss("VmHWM") - base
            return Measured(0, 0, peak, peak, 0, 0.0, 0.0, str(error))
        finally:
            cache.close()
        passed = time.perf_counter()
        pass_peak = _rss("VmHWM") - base
        tree = merge([index.members])
        merged = time.perf_counter()
        return Measured(
            len(index.members),
            len(tree),
            pass_peak,
            _rss("VmHWM") - base,
            _rss("VmRSS") - base,
            passed - started,
            merged - passed,
        )


def measured(count: int, limit: int, timeout: float = 600) -> Measured:
    """`_measure` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "support.member_memory", str(count), str(limit)],
        cwd=TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return Measured(**json.loads(done.stdout))


if __name__ == "__main__":
    result = trio.run(_measure, int(sys.argv[1]), int(sys.argv[2]))
    print(json.dumps(dataclasses.asdict(result)))
