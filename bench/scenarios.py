"""Each measurement, regfs and its peer in the same run, on the same bytes.

Every repetition that reads through regfs gets a fresh mount (single runs vary a lot,
docs/performance.md; and a live mount keeps a layer's pages), and the two sides swap which
goes first on every other repetition, so drift in the machine's load falls on both. Figures
are medians over the repetitions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import httpx

from storage.digests import Digest

from .caches import can_drop_all, drop_all, drop_fd, drop_file, warm
from .config import Config, GiB, format_size
from .measure import (
    MB,
    BenchError,
    Row,
    mb_per_s,
    median,
    percentile,
    run,
    sides,
    throughput_row,
    timed,
    timed_busy,
    timed_run,
)
from .mount import Mount
from .root import Blob, Root, data_chunks, write_file

PAGE = 4096
SLOT = 256 << 10  # one random read per slot: read-ahead around one never serves another
RSS_LIMIT_MB = 100.0
TAGS_RSS_LIMIT_MB = 150.0  # issue 18: listing 100,000 tags
FLAT = 0.9  # peak RSS at the small size / at the large size, at least


@dataclass
class Env:
    """What the scenarios share: the root, the registry's URL, fresh mounts, found problems."""

    config: Config
    store: Root
    mountpoint: Path
    logdir: Path
    registry_url: str = ""
    problems: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def mount(self, source: str | None = None) -> Iterator[Mount]:
        """A fresh mount of the root (or of `source`, e.g. the registry's URL); a traceback
        in its log is kept as a problem to report."""
        mount = Mount(source or self.store.root, self.mountpoint, self.logdir)
        with mount:
            yield mount
        if text := mount.tracebacks():
            self.problems.append(f"{mount.log.name}:\n{text}")

    @cached_property
    def layer(self) -> Blob:
        """The layer that cold, warm and random reads share."""
        blob = self.store.add_blob("bench/layers", self.config.size, seed=1)
        os.sync()
        return blob

    def url(self, path: str) -> str:
        return self.registry_url + path

    def drop_cold(self, *files: Path) -> None:
        """Cold for both sides: drop_caches as root, else fadvise on the files involved."""
        if can_drop_all():
            drop_all()
        else:
            for path in files:
                drop_file(path)


def curl(url: str, *args: str) -> bytes:
    return run(["curl", "-sS", "-f", *args, url], stdout=subprocess.PIPE)


# --------------------------------------------------------------------------- reads


def cold_read(env: Env) -> list[Row]:
    """`cat` of a layer through a fresh mount vs `curl` GET of the blob, page cache dropped
    before each side (so both read the backing file from disk)."""
    mine, theirs = _cold_reads(env, None)
    metric = f"cold sequential read, {format_size(env.layer.size)}"
    return [throughput_row("cold_read", metric, mine, "registry GET (curl)", theirs, 1.2)]


def remote_cold_read(env: Env) -> list[Row]:
    """cold_read through a remote mount of the registry itself (`regfs mount http://…`):
    what the HTTP client, the Range read-ahead and FUSE cost on top of the registry's GET."""
    mine, theirs = _cold_reads(env, env.registry_url)
    metric = f"remote mount: cold sequential read, {format_size(env.layer.size)}"
    return [throughput_row("remote_cold_read", metric, mine, "registry GET (curl)", theirs, 0.9)]


def _cold_reads(env: Env, source: str | None) -> tuple[list[float], list[float]]:
    """MB/s of `cat` through fresh mounts of `source` and of `curl` GETs, cold each time.

    The path is looked up once first, as curl is handed the blob's URL: what is timed is the
    read. (On a remote mount the first lookup lists `_catalog`, which on the bench's root of
    10 000 repositories is a listing of its own; `ls` measures that.)"""
    blob, mine, theirs = env.layer, [], []
    for rep in range(env.config.reps):
        with env.mount(source) as m:
            path = blob.in_mount(m.mountpoint)
            path.stat()
            for side in sides(rep):
                if side == "regfs":
                    env.drop_cold(blob.data, path)
                    mine.append(mb_per_s(blob.size, timed_run(["cat", path])))
                    continue
                env.drop_cold(blob.data)
                url = env.url(blob.url_path)
                t, got = timed(
                    lambda url=url: curl(url, "-o", "/dev/null", "-w", "%{size_download}")
                )
                if int(got) != blob.size:
                    raise BenchError(f"registry sent {got!r} bytes, not {blob.size}")
                theirs.append(mb_per_s(blob.size, t))
    return mine, theirs


def warm_read(env: Env) -> list[Row]:
    """A second `cat` on the same mount (the kernel kept the pages: keep_cache) vs `cat` of
    the backing blob file, which sits in the page cache."""
    blob, mine, theirs = env.layer, [], []
    warm(blob.data)
    for rep in range(env.config.reps):
        with env.mount() as m:
            path = blob.in_mount(m.mountpoint)
            run(["cat", path])  # the first read fills the mount's page cache
            for side in sides(rep):
                target, found = (path, mine) if side == "regfs" else (blob.data, theirs)
                found.append(mb_per_s(blob.size, timed_run(["cat", target])))
    metric = f"warm re-read, {format_size(blob.size)}"
    return [throughput_row("warm_read", metric, mine, "cat of the backing file", theirs, 0.8)]


def random_offsets(size: int, count: int, seed: int) -> list[int]:
    """Page-aligned offsets, one per distinct 256 KiB slot, so every read misses the cache."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // SLOT), min(count, size // SLOT))
    return [slot * SLOT + rng.randrange(SLOT // PAGE) * PAGE for slot in slots]


def random_read(env: Env) -> list[Row]:
    """4 KiB `os.pread`s at random offsets on an fd opened on the mount (its pages dropped
    with fadvise first, so each read reaches the daemon) vs HTTP Range GETs of the same
    offsets over one keep-alive httpx client. The backing file is warm for both."""
    mine, theirs = _random_reads(env, None)
    reads = f"{sum(map(len, mine))} reads over {len(mine)} fresh mount(s)"
    rows = []
    for name, stat, target in (("median", median, 0.2), ("p99", _p99, None)):
        row = _latency_row("random_read", name, stat, mine, theirs)
        if target is not None:
            row.target, row.passed, row.note = f"≤ {target} ms", row.regfs <= target, reads
        rows.append(row)
    return rows


def remote_random_read(env: Env) -> list[Row]:
    """random_read through a remote mount of the registry: each 4 KiB read that misses
    becomes one Range GET from the daemon, so it should cost about one round trip more
    than the peer's (FUSE and the daemon), at most 1.5x."""
    mine, theirs = _random_reads(env, env.registry_url)
    reads = f"{sum(map(len, mine))} reads over {len(mine)} fresh mount(s)"
    rows = []
    for name, stat, limit in (("median", median, 1.5), ("p99", _p99, None)):
        row = _latency_row("remote_random_read", f"remote mount: {name}", stat, mine, theirs)
        if limit is not None:
            assert row.peer is not None
            row.target, row.note = f"≤ {limit:g}x peer", reads
            row.passed = row.regfs <= limit * row.peer
        rows.append(row)
    return rows


def _latency_row(
    measure: str,
    name: str,
    stat: Callable[[list[float]], float],
    mine: list[list[float]],
    theirs: list[list[float]],
) -> Row:
    ours_ms, peer_ms = stat(_flat(mine)), stat(_flat(theirs))
    return Row(
        measure,
        f"random 4 KiB read latency, {name}",
        "ms",
        ours_ms,
        "registry Range GET (httpx)",
        peer_ms,
        peer_ms / ours_ms,
        samples={"regfs": [stat(r) for r in mine], "peer": [stat(r) for r in theirs]},
    )


def _random_reads(env: Env, source: str | None) -> tuple[list[list[float]], list[list[float]]]:
    """Latencies (ms) per repetition: preads through a fresh mount of `source`, and Range
    GETs of the same offsets."""
    blob = env.layer
    warm(blob.data)
    url = env.url(blob.url_path)
    mine: list[list[float]] = []
    theirs: list[list[float]] = []
    with open(blob.data, "rb") as backing, httpx.Client(timeout=30) as client:
        client.get(url, headers={"Range": "bytes=0-0"})  # connect outside the timing
        for rep in range(env.config.reps):
            offsets = random_offsets(blob.size, env.config.random_reads, seed=rep)
            expected = {o: os.pread(backing.fileno(), PAGE, o) for o in offsets[:50]}
            with env.mount(source) as m:
                fd = os.open(blob.in_mount(m.mountpoint), os.O_RDONLY)
                try:
                    drop_fd(fd)
                    for side in sides(rep):
                        if side == "regfs":
                            mine.append(_pread_latencies(fd, offsets, expected))
                        else:
                            theirs.append(_range_latencies(client, url, offsets, expected))
                finally:
                    os.close(fd)
    return mine, theirs


def _p99(values: list[float]) -> float:
    return percentile(values, 99)


def _flat(runs: list[list[float]]) -> list[float]:
    return [v for r in runs for v in r]


def _pread_latencies(fd: int, offsets: list[int], expected: dict[int, bytes]) -> list[float]:
    latencies = []
    for offset in offsets:
        start = time.perf_counter()
        data = os.pread(fd, PAGE, offset)
        latencies.append((time.perf_counter() - start) * 1000)
        if len(data) != PAGE or expected.get(offset, data) != data:
            raise BenchError(f"pread at {offset} through the mount returned wrong bytes")
    return latencies


def _range_latencies(
    client: httpx.Client, url: str, offsets: list[int], expected: dict[int, bytes]
) -> list[float]:
    latencies = []
    for offset in offsets:
        headers = {"Range": f"bytes={offset}-{offset + PAGE - 1}"}
        start = time.perf_counter()
        response = client.get(url, headers=headers)
        latencies.append((time.perf_counter() - start) * 1000)
        data = response.content
        if response.status_code != 206 or len(data) != PAGE or expected.get(offset, data) != data:
            raise BenchError(f"Range GET at {offset}: {response.status_code}, {len(data)} bytes")
    return latencies


# --------------------------------------------------------------------------- push


def push(env: Env) -> list[Row]:
    """`cp FILE uploads/NAME` + `mv uploads/NAME layers/<digest>` (regfs verifies the digest)
    vs `curl` POST + monolithic PUT `?digest=` of the same file to the registry, and
    `openssl dgst -sha256` of the file as the hashing limit, and `dd conv=fdatasync` of it as
    the disk's limit for a durable write (regfs syncs a layer's data before it links it; the
    registry does not). The file is warm; the pushed blob is checked, deleted and the disk
    synced after each side, outside the timing."""
    name, size, store = "bench/push", env.config.size, env.store
    source = store.scratch / "push-source"
    digest = write_file(source, size, seed=2)
    store.add_repository(name)
    os.sync()
    warm(source)
    mine, theirs, limit, disk = [], [], [], []

    def settle() -> None:
        if not store.has_blob(name, digest, size):
            raise BenchError(f"the push of {digest} left no complete blob in the root")
        store.remove_blob(name, digest)
        os.sync()

    try:
        for rep in range(env.config.reps):
            with env.mount() as m:
                upload = m.path(name, "uploads", f"push-{rep}")
                layer = m.path(name, "layers", str(digest))
                for side in sides(rep):
                    if side == "regfs":
                        t = timed_run(["cp", source, upload]) + timed_run(["mv", upload, layer])
                        if layer.stat().st_size != size:
                            raise BenchError(f"{layer} has the wrong size after the push")
                        mine.append(mb_per_s(size, t))
                    else:
                        theirs.append(mb_per_s(size, _curl_push(env, name, source, digest)))
                    settle()
            t, out = timed(lambda: run(["openssl", "dgst", "-sha256", source], stdout=-1))
            if digest.hex not in out.decode():
                raise BenchError(f"openssl disagrees on the digest: {out!r}")
            limit.append(mb_per_s(size, t))
            copy = store.scratch / "push-dd"
            disk.append(mb_per_s(size, timed_run(_dd_durable(source, copy))))
            copy.unlink()
            os.sync()
    finally:
        source.unlink(missing_ok=True)
    metric = f"push (cp + mv), {format_size(size)}"
    return [
        throughput_row("push", metric, mine, "registry POST+PUT (curl)", theirs, 2.0),
        throughput_row("push", metric, mine, "openssl dgst -sha256", limit, 0.5),
        throughput_row("push", metric, mine, "durable copy: dd conv=fdatasync", disk, None),
    ]


def _dd_durable(source: Path, dest: Path) -> list[str]:
    return ["dd", f"if={source}", f"of={dest}", "bs=1M", "conv=fdatasync", "status=none"]


def _curl_push(env: Env, name: str, source: Path, digest: Digest) -> float:
    """Seconds for the monolithic upload: POST for a location, one PUT of the body with the
    digest. `-T` streams the file (`--data-binary @file` would load it whole into memory)."""
    start = time.perf_counter()
    post = env.url(f"/v2/{name}/blobs/uploads/")
    headers = curl(post, "-X", "POST", "-D", "-", "-o", "/dev/null").decode()
    location = next(
        line.split(":", 1)[1].strip()
        for line in headers.splitlines()
        if line.lower().startswith("location:")
    )
    if location.startswith("/"):
        location = env.url(location)
    put = f"{location}{'&' if '?' in location else '?'}digest={digest}"
    octets = "Content-Type: application/octet-stream"
    curl(put, "-X", "PUT", "-T", str(source), "-H", octets, "-H", "Expect:", "-o", "/dev/null")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- memory


def rss(env: Env) -> list[Row]:
    """Peak RSS (VmHWM) of the daemon after streaming a blob in (1 MiB writes from this
    process into uploads/, then `mv` to layers/) and out (`cat`), once per size."""
    name, store = "bench/rss", env.store
    store.add_repository(name)
    peaks: dict[int, float] = {}
    notes: dict[int, str] = {}
    for index, size in enumerate(sorted(env.config.rss_sizes)):
        with env.mount() as m:
            after_mount = m.status("VmHWM") / MB
            upload = m.path(name, "uploads", f"rss-{index}")
            t_in, digest = timed(lambda upload=upload, size=size: _stream_in(upload, size))
            layer = m.path(name, "layers", str(digest))
            os.rename(upload, layer)
            t_out = timed_run(["cat", layer])
            peaks[size] = m.status("VmHWM") / MB
        store.remove_blob(name, digest)
        os.sync()
        notes[size] = (
            f"in {mb_per_s(size, t_in):.0f} MB/s, out {mb_per_s(size, t_out):.0f} MB/s, "
            f"{after_mount:.0f} MB after mount"
        )
    rows = [
        Row(
            "rss",
            f"daemon peak RSS, {format_size(size)} in + out",
            "MB",
            peak,
            target=f"< {RSS_LIMIT_MB:.0f} MB",
            passed=peak < RSS_LIMIT_MB,
            samples={"regfs": [peak]},
            note=notes[size],
        )
        for size, peak in peaks.items()
    ]
    small, big = min(peaks), max(peaks)
    if big != small:
        last = rows[-1]
        last.peer_name, last.peer = f"regfs at {format_size(small)}", peaks[small]
        last.ratio = peaks[small] / peaks[big]
        last.target = f"< {RSS_LIMIT_MB:.0f} MB, flat (≥ {FLAT}x)"
        last.passed = peaks[big] < RSS_LIMIT_MB and last.ratio >= FLAT
    return rows


def _stream_in(path: Path, size: int) -> Digest:
    digest = hashlib.sha256()
    with open(path, "wb", buffering=0) as f:
        for piece in data_chunks(size, seed=10 + size):
            f.write(piece)
            digest.update(piece)
    return Digest("sha256", digest.hexdigest())


# --------------------------------------------------------------------------- listings


def ls(env: Env) -> list[Row]:
    """The first `ls` on a fresh mount of a namespace of N repositories and of N tags vs
    the registry's `_catalog?n=2N` and `tags/list` with curl; counts checked on both sides."""
    n = env.config.entries
    env.store.add_repositories("many", n)
    env.store.add_tags("bench/tagged", n)
    catalog = f"/v2/_catalog?n={2 * n}"
    times: dict[str, list[float]] = {"repos": [], "tags": [], "repos_peer": [], "tags_peer": []}
    for rep in range(env.config.reps):
        with env.mount() as m:
            for side in sides(rep):
                if side == "regfs":
                    times["repos"].append(_ls_ms(m.path("many"), n))
                    times["tags"].append(_ls_ms(m.path("bench/tagged/tags"), n))
                else:
                    times["repos_peer"].append(_get_ms(env.url(catalog), "repositories", n))
                    times["tags_peer"].append(
                        _get_ms(env.url("/v2/bench/tagged/tags/list"), "tags", n)
                    )
    rows = []
    for key, what, peer_name in (
        ("repos", f"ls of a namespace of {n} repositories", f"registry {catalog[4:]} (curl)"),
        ("tags", f"ls of {n} tags", "registry tags/list (curl)"),
    ):
        mine, theirs = median(times[key]), median(times[key + "_peer"])
        samples = {"regfs": times[key], "peer": times[key + "_peer"]}
        passed = mine < theirs and mine < 1000
        target = "faster than peer, < 1 s"
        rows.append(Row("ls", what, "ms", mine, peer_name, theirs, theirs / mine, target,
                        passed, samples))  # fmt: skip
    return rows


def ls_long(env: Env) -> list[Row]:
    """`ls -l` of N tags, N layers and N manifests on a fresh mount (cold) and at once again
    (warm, within the tag TTL) vs native `ls -l` of a local directory of N files. Every entry
    costs FUSE round trips (docs/concurrency.md: what the kernel may keep), so this is
    latency, not throughput."""
    n = env.config.entries
    env.store.add_tags("bench/tagged", n)
    env.store.add_digests("bench/digests", n)
    native = env.store.scratch / "ls-native"
    native.mkdir(exist_ok=True)
    for i in range(n):
        (native / f"t{i:05d}").write_bytes(b"{}")
    listed = {s: f"bench/digests/{s}" for s in ("layers", "manifests")}
    listed["tags"] = "bench/tagged/tags"
    times: dict[str, list[float]] = {"peer": []}
    for rep in range(env.config.reps):
        for side in sides(rep):
            if side != "regfs":
                times["peer"].append(_ls_ms(native, n, "-l"))
                continue
            for what, path in listed.items():
                with env.mount() as m:
                    for key in ("cold", "warm"):
                        ms = _ls_ms(m.path(path), n, "-l")
                        times.setdefault(f"{what} {key}", []).append(ms)
    theirs = median(times["peer"])
    rows = []
    for what in listed:
        for key in ("cold", "warm"):
            mine = median(times[f"{what} {key}"])
            samples = {"regfs": times[f"{what} {key}"], "peer": times["peer"]}
            rows.append(Row("ls_long", f"ls -l of {n} {what}, {key}", "ms", mine,
                            f"native ls -l of {n} files", theirs, theirs / mine,
                            "at most 3x native", mine <= 3 * theirs, samples))  # fmt: skip
    return rows


def tags_rss(env: Env) -> list[Row]:
    """Peak RSS of the daemon while it lists 10N tags of one repository (`ls`, then `ls -l`
    twice) on a fresh mount: what it keeps per tag stays bounded (docs/concurrency.md)."""
    n = 10 * env.config.entries
    env.store.add_tags("bench/many-tags", n)
    with env.mount() as m:
        after_mount = m.status("VmHWM") / MB
        path = m.path("bench/many-tags/tags")
        times = [_ls_ms(path, n), _ls_ms(path, n, "-l"), _ls_ms(path, n, "-l")]
        peak = m.status("VmHWM") / MB
    note = (
        f"ls {times[0] / 1000:.1f} s, ls -l {times[1] / 1000:.1f} s then"
        f" {times[2] / 1000:.1f} s; {after_mount:.0f} MB after mount"
    )
    return [Row("tags_rss", f"daemon peak RSS, ls and ls -l of {n} tags", "MB", peak,
                target=f"< {TAGS_RSS_LIMIT_MB:.0f} MB", passed=peak < TAGS_RSS_LIMIT_MB,
                samples={"regfs": [peak]}, note=note)]  # fmt: skip


def _ls_ms(path: Path, n: int, *options: str) -> float:
    t, out = timed(lambda: run(["ls", *options, path], stdout=subprocess.PIPE))
    if len(out.splitlines()) != n + bool(options):  # `ls -l` begins with a `total` line
        raise BenchError(f"ls {path}: {len(out.splitlines())} entries, not {n}")
    return t * 1000


def _get_ms(url: str, key: str, n: int) -> float:
    """Time a GET; the registry's catalog lists every repository, so count ours only."""
    t, out = timed(lambda: curl(url))
    found = [x for x in json.loads(out)[key] if key == "tags" or x.startswith("many/")]
    if len(found) != n:
        raise BenchError(f"GET {url}: {len(found)} entries, not {n}")
    return t * 1000


# --------------------------------------------------------------------------- concurrency


def parallel(env: Env) -> list[Row]:
    """Aggregate throughput of N `cat`s at once, each on its own layer, vs one `cat` of the
    same N layers in turn; backing files warm, each side on a fresh mount (cold mount cache)."""
    cfg = env.config
    blobs = [
        env.store.add_blob("bench/parallel", cfg.reader_size, seed=100 + i)
        for i in range(cfg.readers)
    ]
    total = cfg.readers * cfg.reader_size
    os.sync()
    many, one = [], []
    busy: dict[str, list[float]] = {"regfs": [], "peer": []}
    try:
        for rep in range(cfg.reps):
            warm(*(b.data for b in blobs))
            for side in sides(rep):
                with env.mount() as m:
                    paths = [b.in_mount(m.mountpoint) for b in blobs]
                    if side == "regfs":
                        t, share, _ = timed_busy(lambda paths=paths: _cat_all(paths))
                        many.append(mb_per_s(total, t))
                    else:
                        t, share, _ = timed_busy(lambda paths=paths: run(["cat", *paths]))
                        one.append(mb_per_s(total, t))
                    busy[side].append(share)
    finally:
        for b in blobs:
            env.store.remove_blob(b.name, b.digest)
    metric = f"{cfg.readers} parallel readers, {format_size(cfg.reader_size)} each"
    row = throughput_row("parallel", metric, many, "one reader (regfs)", one, 1.5)
    # What bounds it on a small machine: whether one reader already keeps every CPU busy.
    row.note = (
        f"CPUs busy ({os.cpu_count()}): {median(busy['regfs']):.0%} with "
        f"{cfg.readers} readers, {median(busy['peer']):.0%} with one"
    )
    return [row]


def _cat_all(paths: list[Path]) -> None:
    procs = [
        subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for p in paths
    ]
    errors = [p.communicate()[1] for p in procs if p.wait() != 0]
    if errors:
        raise BenchError(f"parallel cat failed: {errors[0].decode(errors='replace')}")


# --------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Env], list[Row]]
    needs_registry: bool
    disk: Callable[[Config], int]  # bytes it may add to the work directory, at most


SCENARIOS = (
    Scenario("ls", ls, True, lambda c: c.entries * 64 * 1024),
    Scenario("ls_long", ls_long, False, lambda c: c.entries * 96 * 1024),
    Scenario("tags_rss", tags_rss, False, lambda c: c.entries * 10 * 32 * 1024),
    Scenario("random_read", random_read, True, lambda c: 0),
    Scenario("warm_read", warm_read, False, lambda c: 0),
    Scenario("cold_read", cold_read, True, lambda c: 0),
    Scenario("parallel", parallel, False, lambda c: c.readers * c.reader_size),
    Scenario("push", push, True, lambda c: 2 * c.size),
    Scenario("rss", rss, False, lambda c: max(c.rss_sizes)),
    Scenario("remote_cold_read", remote_cold_read, True, lambda c: 0),
    Scenario("remote_random_read", remote_random_read, True, lambda c: 0),
)
NAMES = tuple(s.name for s in SCENARIOS)
# env.layer: config.size, once
SHARED_LAYER = {"cold_read", "warm_read", "random_read", "remote_cold_read", "remote_random_read"}
MARGIN = GiB // 4
