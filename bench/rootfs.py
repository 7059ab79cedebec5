"""`python -m bench.rootfs`: the `rootfs/` view (issue 16) against unpacking, in one run.

Four measures, each side by side with what a user would do without regfs:
1. the first `cat` of one file in a fresh image (no layer index yet, a fresh cache dir
   through XDG_CACHE_HOME) vs `tar -xzf` of its layer;
2. with the index kept, `cat` of ~100 KB files on a fresh mount: the first one (index load
   and merge) and the others, median and max ms and blob bytes read per file, locally (the
   daemon's /proc/<pid>/io rchar) and over HTTP (the registry's access log);
3. `find | wc -l` and `ls -lR` of the image vs the same on its `umoci unpack` output, cold
   (fresh mount; page cache dropped) and warm (again at once);
4. the daemon's peak RSS while indexing a big layer, and its RSS after.

The images are made of local files (/usr/bin, /usr/include, /usr/share, /usr/lib) and kept
between runs under bench/results/rootfs-images/, with the `umoci unpack` of the first, so a
rerun only measures. Every mount and registry is stopped and the work directory removed,
even on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO

import trio

from storage.digests import Digest
from storage.drivers import FilesystemDriver
from storage.manifest_format import OCI_MANIFEST
from storage.paths import BlobData
from storage.registry import Registry
from storage.rootfs.cache import IndexCache
from storage.rootfs.merge import merge
from storage.rootfs.reader import IDLE

from .__main__ import say, workspace
from .caches import can_drop_all, drop_all
from .config import GiB, MiB, format_size, parse_size
from .measure import MB, BenchError, Row, median, run, sides, timed, timed_run
from .mount import Mount
from .registry import RegistryProcess
from .report import host_info, summary, table, write_json
from .root import Root

RESULTS = Path(__file__).resolve().parent / "results"
IMAGES = RESULTS / "rootfs-images"
SOURCES = ("/usr/bin", "/usr/include", "/usr/share/doc", "/usr/share", "/usr/lib")
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
TAG = "latest"
SMALL_FILE = 100_000  # the "100 KB file" of issue 16
CAT_MS, CAT_BYTES, WALK_RATIO, RSS_MB = 20.0, MB, 2.0, 400.0  # the targets
STEPS = ("first_cat", "profile", "kept_index_cat", "walk", "rss")  # the measures, in order
TOOLS = ("cat", "tar", "gzip", "find", "ls", "umoci", "docker-registry", "fusermount3")


@dataclass(frozen=True)
class Scale:
    """How big the images are and how often each side runs."""

    tar_bytes: int  # the walk image: uncompressed tar at most this big …
    members: int  # … and at most this many members
    big_bytes: int  # the RSS image: uncompressed tar of about this size
    reps: int  # fresh mounts per measure
    reads: int  # ~100 KB files read per fresh mount
    idle_rss: bool = True  # wait for the idle drop of the RSS image's seek points (~40 s)

    @classmethod
    def quick(cls) -> Scale:
        return cls(
            tar_bytes=4 * MiB, members=300, big_bytes=16 * MiB, reps=1, reads=4, idle_rss=False
        )


FULL = Scale(tar_bytes=600 * MiB, members=15_000, big_bytes=GiB, reps=3, reads=40)


# --------------------------------------------------------------------------- the images


@dataclass(frozen=True)
class Image:
    """One single-layer gzip image, in a storage root (repository `name`, tag `latest`) and
    as an OCI layout for umoci; `files` are ~100 KB members to read, in tar order."""

    home: Path
    name: str
    layer: Digest
    layer_size: int
    tar_size: int
    members: int
    files: tuple[str, ...]

    @property
    def root(self) -> Path:
        return self.home / "root"

    @property
    def layout(self) -> Path:
        return self.home / "layout"

    @property
    def blob(self) -> Path:
        return self.layout / "blobs" / "sha256" / self.layer.hex

    @property
    def unpacked(self) -> Path:
        return self.home / "bundle" / "rootfs"

    def in_mount(self, mountpoint: Path, *parts: str) -> Path:
        return mountpoint.joinpath(self.name, "rootfs", TAG, *parts)


class _Hashing:
    """A write-only file that hashes what passes through it (the layer's diff_id)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)


def _local_files(tar_bytes: int, members: int) -> Iterator[Path]:
    """Directories, files and symlinks under SOURCES, parents first, until either bound."""
    seen: set[Path] = set()
    total = count = 0
    for source in SOURCES:
        for top, dirs, names in os.walk(source):
            dirs.sort()
            links = [d for d in dirs if Path(top, d).is_symlink()]  # walk() lists them here
            for path in [Path(top), *(Path(top, n) for n in sorted([*names, *links]))]:
                if path in seen:
                    continue
                info = path.lstat()
                if not (
                    stat.S_ISREG(mode := info.st_mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)
                ):
                    continue
                seen.add(path)
                size = info.st_size if stat.S_ISREG(info.st_mode) else 0
                if count >= members or total + size + 1024 > tar_bytes:
                    return
                total += size + 512
                count += 1
                yield path


def _write_layer(
    path: Path, tar_bytes: int, members: int
) -> tuple[str, int, int, list[tuple[str, int]]]:
    """A gzip -6 tar of local files: (diff_id hex, tar size, members, [(name, size)] of files)."""
    files: list[tuple[str, int]] = []
    with path.open("wb") as out:
        gz = subprocess.Popen(["gzip", "-6", "-n"], stdin=subprocess.PIPE, stdout=out)
        assert gz.stdin is not None
        sink = _Hashing(gz.stdin)
        count = 0
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for local in _local_files(tar_bytes, members):
                info = tar.gettarinfo(str(local), arcname=str(local).lstrip("/"))
                if info.isreg():
                    with local.open("rb") as f:
                        tar.addfile(info, f)
                    files.append((info.name, info.size))
                else:
                    tar.addfile(info)
                count += 1
        gz.stdin.close()
        if gz.wait() != 0:
            raise BenchError("gzip failed")
    return sink.sha.hexdigest(), sink.size, count, files


def _pick(files: list[tuple[str, int]], n: int) -> tuple[str, ...]:
    """n files of 80-120 KB spread over the layer (the nearest to 100 KB if too few)."""
    near = [name for name, size in files if 80_000 <= size <= 120_000]
    if len(near) < n:
        near = [name for name, _ in sorted(files, key=lambda f: abs(f[1] - SMALL_FILE))[:n]]
        order = {name: i for i, (name, _) in enumerate(files)}
        near.sort(key=order.__getitem__)
    step = max(1, len(near) // n)
    return tuple(near[::step][:n])


def build_image(home: Path, name: str, tar_bytes: int, members: int, reads: int) -> Image:
    """Build (or find from an earlier run) the image in `home`: layer, OCI layout, storage root."""
    meta = home / "image.json"
    if meta.exists():
        found = json.loads(meta.read_text())
        found["layer"] = Digest.parse(found["layer"])
        found["files"] = tuple(found["files"])
        image = Image(home=home, **found)
        if len(image.files) >= reads:
            return image
    shutil.rmtree(home, ignore_errors=True)
    building = home.with_name(home.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    blobs = building / "layout" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    say(f"    building {name}: ≤ {format_size(tar_bytes)} of tar, ≤ {members} members …")
    layer_tmp = blobs / "layer.tmp"
    diff_id, tar_size, count, files = _write_layer(layer_tmp, tar_bytes, members)
    with layer_tmp.open("rb") as f:
        layer = Digest("sha256", hashlib.file_digest(f, "sha256").hexdigest())
    layer_tmp.rename(blobs / layer.hex)
    layer_size = (blobs / layer.hex).stat().st_size
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        }
    ).encode()

    def put(data: bytes) -> dict[str, object]:
        hexdigest = hashlib.sha256(data).hexdigest()
        (blobs / hexdigest).write_bytes(data)
        return {"digest": f"sha256:{hexdigest}", "size": len(data)}

    layer_descriptor = {"mediaType": GZIP_LAYER, "digest": str(layer), "size": layer_size}
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, **put(config)},
            "layers": [layer_descriptor],
        }
    ).encode()
    manifest_descriptor = {"mediaType": OCI_MANIFEST, **put(manifest)}
    manifest_descriptor["annotations"] = {"org.opencontainers.image.ref.name": TAG}
    layout = building / "layout"
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [manifest_descriptor]})
    )
    store = Root(building / "root", building / "scratch")
    for blob in (config, None):
        digest = Digest("sha256", hashlib.sha256(blob).hexdigest()) if blob else layer
        data = store.path(BlobData(digest))
        data.parent.mkdir(parents=True, exist_ok=True)
        os.link(blobs / digest.hex, data)  # one copy on disk for both
        store.link(name, digest)
    trio.run(_tag, store.root, name, manifest)
    run(["umoci", "unpack", "--image", f"{layout}:{TAG}", building / "bundle"])
    picked = _pick(files, reads)
    found = {
        "name": name,
        "layer": str(layer),
        "layer_size": layer_size,
        "tar_size": tar_size,
        "members": count,
        "files": list(picked),
    }
    (building / "image.json").write_text(json.dumps(found, indent=1))
    os.sync()
    building.rename(home)
    return build_image(home, name, tar_bytes, members, reads)


async def _tag(root: Path, name: str, manifest: bytes) -> None:
    repo = Registry(FilesystemDriver(root)).repository(name)
    await repo.tags.put(TAG, await repo.manifests.put(manifest))


# --------------------------------------------------------------------------- helpers


@dataclass(eq=False)
class LoggingRegistry(RegistryProcess):
    """The bench's registry with its access log on: bytes sent per request, for counting."""

    def _config(self) -> str:
        return super()._config().replace("disabled: true", "disabled: false")

    def layer_bytes(self, layer: Digest) -> Callable[[], int]:
        """A counter of the bytes of `layer` the registry has sent so far, by its log."""
        return lambda: sum(int(n) for n in _sent(layer).findall(self._settled_log()))

    def _settled_log(self) -> str:
        """The log once it stopped growing (a request just answered is logged late)."""
        size, deadline = -1, time.monotonic() + 2
        while (now := self.log_path.stat().st_size) != size and time.monotonic() < deadline:
            size = now
            time.sleep(0.05)
        return self.log_path.read_text(errors="replace")


def _sent(layer: Digest) -> re.Pattern[str]:
    """Access log lines of a GET of `layer` (combined log format): the bytes sent."""
    return re.compile(rf'"GET /v2/\S+/blobs/{layer} HTTP/[\d.]+" \d{{3}} (\d+)')


def cpu_seconds(pid: int) -> float:
    """The daemon's user + system CPU time so far (/proc/<pid>/stat): on a shared machine
    steadier than the wall time a walk takes, which waits for every round trip."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rchar(pid: int) -> int:
    """Bytes the process has read through read(2)/pread(2) so far: blob reads, the index
    file, and FUSE request headers (a few dozen bytes each)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise BenchError(f"no rchar in /proc/{pid}/io")


def cold() -> None:
    if can_drop_all():
        drop_all()


def cat_ms(path: Path) -> float:
    return timed_run(["cat", path]) * 1000


def timed_output(args: list[str | Path]) -> tuple[float, bytes]:
    """Seconds a tool took, and its output."""
    return timed(lambda: run(args, stdout=subprocess.PIPE))


def log_seconds(log: Path, pattern: str) -> list[float]:
    """Figures `… in N s` of the daemon log's lines matching pattern."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [float(m) for m in re.findall(pattern + r".* in ([\d.]+) s", text)]


def log_times(log: Path) -> dict[str, float]:
    """Seconds from the daemon's first rootfs request to the index pass, its end and the
    merge, from the log's timestamps (ms resolution)."""
    stamps: dict[str, float] = {}
    marks = {"indexing layer": "pass start", "indexed layer": "pass end", "merged": "merged"}
    for line in (log.read_text(errors="replace") if log.exists() else "").splitlines():
        for needle, key in marks.items():
            if needle in line and key not in stamps:
                when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                stamps[key] = when.timestamp()
    return stamps


@dataclass
class Bench:
    """What the measures share: the work directory, scale, rows and notes."""

    work: Path
    scale: Scale
    rows: list[Row] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    profile: dict[str, float] = field(default_factory=dict)
    kept: Path | None = None  # the XDG_CACHE_HOME whose index cache measure 1 filled
    _caches: int = 0

    @property
    def mountpoint(self) -> Path:
        return self.work / "mnt"

    def fresh_index_cache(self) -> Path:
        """A new XDG_CACHE_HOME for the mounts started from now on (0700, as the daemon
        wants its cache directory)."""
        self._caches += 1
        path = self.work / f"xdg-{self._caches}"
        path.mkdir(mode=0o700)
        os.environ["XDG_CACHE_HOME"] = str(path)
        return path

    @contextlib.contextmanager
    def mount(self, source: Path | str) -> Iterator[Mount]:
        with Mount(source, self.mountpoint, self.work / "logs") as mount:
            yield mount
        if text := mount.tracebacks():
            self.tracebacks.append(text)


# --------------------------------------------------------------------------- the measures


def first_cat(b: Bench, image: Image) -> None:
    """Measure 1; the first fresh index cache is kept (`b.kept`) for the next measures.
    The daemon log's timestamps split regfs's time: up to the pass, the pass, the merge,
    and what follows (FUSE lookups, the read)."""
    target = image.files[len(image.files) // 2]
    times: dict[str, list[float]] = {"regfs": [], "peer": []}
    phases: dict[str, list[float]] = {"before pass": [], "pass": [], "merge": [], "after": []}
    for rep in range(b.scale.reps):
        for side in sides(rep):
            if side == "peer":
                out = b.work / "untar"
                out.mkdir()
                cold()
                times["peer"].append(timed_run(["tar", "-xzf", image.blob, "-C", out]) * 1000)
                shutil.rmtree(out)
                continue
            xdg = b.fresh_index_cache()
            b.kept = b.kept or xdg
            with b.mount(image.root) as m:
                cold()
                begun = time.time()
                times["regfs"].append(cat_ms(image.in_mount(m.mountpoint, target)))
                stamps = log_times(m.log)
            if len(stamps) == 3:
                finished = begun + times["regfs"][-1] / 1000
                ends = (begun, stamps["pass start"], stamps["pass end"], stamps["merged"], finished)
                for key, start, end in zip(phases, ends, ends[1:], strict=False):
                    phases[key].append(end - start)
    mine, theirs = median(times["regfs"]), median(times["peer"])
    split = ", ".join(f"{k} {median(v):.2f} s" for k, v in phases.items() if v)
    b.rows.append(
        Row(
            "first_cat",
            f"first cat, fresh image ({image.layer_size / MB:.0f} MB gzip layer, no index)",
            "ms",
            mine,
            "tar -xzf of the layer",
            theirs,
            theirs / mine,
            "≤ 0.5x tar's time",
            mine <= 0.5 * theirs,
            {**times, **phases},
            f"regfs's time (daemon log, medians): {split}",
        )
    )
    os.environ["XDG_CACHE_HOME"] = str(b.kept)


@dataclass
class Reads:
    """One side's ~100 KB reads on fresh mounts: the first per mount, then the others."""

    first_ms: list[float] = field(default_factory=list)
    first_bytes: list[int] = field(default_factory=list)
    first_merged: list[float] = field(default_factory=list)  # ms until the log's "merged"
    ms: list[float] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)


def kept_index_reads(
    b: Bench, image: Image, source: Path | str, counter: Callable[[Mount], Callable[[], int]]
) -> Reads:
    """Measure 2 on one source: fresh mounts, the page cache dropped first; every file's
    time and the blob bytes `counter` saw while it was read. The files go in a shuffled
    order (the same on both sources): in tar order, read-ahead for one serves the next."""
    found = Reads()
    for rep in range(b.scale.reps):
        files = list(image.files)
        random.Random(rep).shuffle(files)
        with b.mount(source) as m:
            cold()
            count = counter(m)
            for number, name in enumerate(files):
                before, begun = count(), time.time()
                ms = cat_ms(image.in_mount(m.mountpoint, name))
                nbytes = count() - before
                if number == 0:
                    found.first_ms.append(ms)
                    found.first_bytes.append(nbytes)
                    if merged := log_times(m.log).get("merged"):
                        found.first_merged.append((merged - begun) * 1000)
                else:
                    found.ms.append(ms)
                    found.nbytes.append(nbytes)
    return found


def report_reads(b: Bench, where: str, reads: Reads, unit: str) -> None:
    b.rows.append(
        Row(
            "kept_index_cat",
            f"{where}: first cat on a fresh mount (index load + merge)",
            "ms",
            median(reads.first_ms),
            note=f"max {max(reads.first_ms):.0f} ms; {unit}: {max(reads.first_bytes) / MB:.2f} MB; "
            f"merged {median(reads.first_merged or [math.nan]):.0f} ms in (daemon log)",
            samples={"regfs": reads.first_ms, "bytes": [float(n) for n in reads.first_bytes]},
        )
    )
    if not reads.ms:
        return
    mean = sum(reads.nbytes) / len(reads.nbytes)
    b.rows.append(
        Row(
            "kept_index_cat",
            f"{where}: cat of a ~100 KB file, median (then max)",
            "ms",
            median(reads.ms),
            target=f"median ≤ {CAT_MS:g} ms",
            passed=median(reads.ms) <= CAT_MS,
            note=f"max {max(reads.ms):.1f} ms over {len(reads.ms)} files",
            samples={"regfs": reads.ms},
        )
    )
    b.rows.append(
        Row(
            "kept_index_cat",
            f"{where}: blob bytes read per ~100 KB cat, mean (then max)",
            "MB",
            mean / MB,
            target=f"≤ {CAT_BYTES / MB:g} MB",
            passed=mean <= CAT_BYTES,
            note=f"max {max(reads.nbytes) / MB:.2f} MB ({unit})",
            samples={"regfs": [float(n) for n in reads.nbytes]},
        )
    )


def profile_load(b: Bench, image: Image) -> None:
    """What a fresh mount's first request costs before any FUSE work, in this process: the
    kept index's load (decompress, JSON, checks) and the merge."""
    assert b.kept is not None
    cache = IndexCache(b.kept / "regfs" / "index")
    try:
        load, index = timed(lambda: cache.load(image.layer))
    finally:
        cache.close()
    if index is None:
        raise BenchError(f"no kept index of {image.layer} in {b.kept}")
    merging, tree = timed(lambda: merge([index.members]))
    b.profile.update(
        index_load_ms=load * 1000, merge_ms=merging * 1000, inodes=len(tree), members=image.members
    )


def kept_index(b: Bench, image: Image) -> None:
    """Measure 2, locally and over HTTP."""
    local = kept_index_reads(b, image, image.root, lambda m: lambda: rchar(m.pid))
    report_reads(b, "local", local, "daemon rchar")
    with LoggingRegistry(image.root, b.work / "registry") as registry:
        remote = kept_index_reads(
            b, image, registry.url, lambda m: registry.layer_bytes(image.layer)
        )
    # A response is logged when it ends: a stream the daemon closes, at a later file's read.
    # The mean is exact; a file's own figure may be an earlier file's.
    report_reads(b, "HTTP", remote, "registry access log, counted when a response ends")


def walks(b: Bench, image: Image) -> None:
    """Measure 3: find | wc -l and ls -lR, cold and warm, regfs vs the unpacked tree; and
    the daemon's CPU time for each regfs walk."""
    commands = {"find | wc -l": ["find"], "ls -lR": ["ls", "-lR"]}
    for label, command in commands.items():
        times: dict[str, list[float]] = {"cold": [], "warm": [], "peer cold": [], "peer warm": []}
        cpu: dict[str, list[float]] = {"cold": [], "warm": []}
        counts: set[int] = set()
        for rep in range(b.scale.reps):
            for side in sides(rep):
                with contextlib.ExitStack() as stack:
                    pid = 0  # the daemon's, on the regfs side
                    if side == "regfs":
                        m = stack.enter_context(b.mount(image.root))
                        where, key, pid = image.in_mount(m.mountpoint), "", m.pid
                    else:
                        where, key = image.unpacked, "peer "
                    cold()
                    for state in ("cold", "warm"):
                        used = cpu_seconds(pid) if pid else 0.0
                        t, out = timed_output([*command, where])
                        times[key + state].append(t * 1000)
                        counts.add(len(out.splitlines()))
                        if pid:
                            cpu[state].append((cpu_seconds(pid) - used) * 1000)
        if label.startswith("find") and len(counts) != 1:
            raise BenchError(f"find counted {sorted(counts)} entries: the trees differ")
        for state in ("cold", "warm"):
            mine, theirs = median(times[state]), median(times["peer " + state])
            b.rows.append(
                Row(
                    "walk",
                    f"{label} of {image.members} members, {state}",
                    "ms",
                    mine,
                    f"the same on umoci unpack, {state}",
                    theirs,
                    theirs / mine,
                    f"≤ {WALK_RATIO:g}x",
                    mine <= WALK_RATIO * theirs,
                    {"regfs": times[state], "peer": times["peer " + state], "cpu": cpu[state]},
                    f"daemon CPU {median(cpu[state]):.0f} ms (median)",
                )
            )


def tree_rss(pid: int) -> tuple[int, int]:
    """(bytes resident, processes) of `pid` and its descendants: the daemon may index a
    layer in a child process (storage/rootfs/fastgzip.py), whose memory counts too."""
    total, count, todo = 0, 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):  # gone meanwhile
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return total, count


def rss(b: Bench, image: Image) -> None:
    """Measure 4: the daemon's RSS (with any child's) before, at its peak while indexing,
    and after; sampled every 50 ms, and the daemon's own VmHWM."""
    b.fresh_index_cache()
    with b.mount(image.root) as m:
        before = m.status("VmRSS") / MB
        samples: list[float] = []
        children = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal children
            while not done.wait(0.05):
                resident, processes = tree_rss(m.pid)
                samples.append(resident / MB)
                children = max(children, processes - 1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            seconds = cat_ms(image.in_mount(m.mountpoint, image.files[0])) / 1000
        finally:
            done.set()
            sampler.join()
        own, after = m.status("VmHWM") / MB, tree_rss(m.pid)[0] / MB
        passes = log_seconds(m.log, "indexed layer")
        idle = after
        if b.scale.idle_rss:  # an open layer's seek points leave memory after IDLE s unread
            deadline = time.monotonic() + IDLE + 10
            while time.monotonic() < deadline:
                time.sleep(1)
                idle = min(idle, tree_rss(m.pid)[0] / MB)
    peak = max([own, *samples])
    b.rows.append(
        Row(
            "rss",
            f"daemon peak RSS indexing a {format_size(image.tar_size)} tar "
            f"({image.layer_size / MB:.0f} MB gzip, {image.members} members)",
            "MB",
            peak,
            target=f"< {RSS_MB:g} MB",
            passed=peak < RSS_MB,
            samples={"rss": samples},
            note=f"daemon alone {own:.0f} MB (VmHWM), {children} child process(es) seen; "
            f"before {before:.0f} MB; first cat {seconds:.1f} s, "
            f"pass {passes[0] if passes else math.nan:.1f} s",
        )
    )
    b.rows.append(Row("rss", "daemon RSS after the index was built", "MB", after))
    if b.scale.idle_rss:
        what = f"daemon RSS after {IDLE + 10:.0f} s idle (seek points dropped at {IDLE:.0f} s)"
        b.rows.append(Row("rss", what, "MB", idle, note=f"before {before:.0f} MB"))


# --------------------------------------------------------------------------- main


def index_once(b: Bench, image: Image) -> None:
    """What measure 1 leaves when it does not run (--only): the image's index in a fresh
    cache, kept (`b.kept`) for the measures that follow."""
    b.kept = b.fresh_index_cache()
    with b.mount(image.root) as m:
        os.listdir(image.in_mount(m.mountpoint))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rootfs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny images, 1 repetition")
    parser.add_argument("--size", type=parse_size, help="walk image's tar, at most (600M)")
    parser.add_argument("--members", type=int, help="walk image's members, at most (15000)")
    parser.add_argument("--big-size", type=parse_size, help="RSS image's tar (1G)")
    parser.add_argument("--reps", type=int, help="fresh mounts per measure (3)")
    parser.add_argument("--reads", type=int, help="~100 KB files read per mount (40)")
    parser.add_argument(
        "--only", action="append", choices=STEPS, help="run this measure only (repeatable)"
    )
    parser.add_argument("--images", type=Path, default=IMAGES, help="where built images stay")
    parser.add_argument("--dir", type=Path, help="where the work directory goes ($TMPDIR)")
    parser.add_argument("--json", type=Path, help="write the JSON here (bench/results/…)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scale = Scale.quick() if args.quick else FULL
    for name in ("tar_bytes", "members", "big_bytes", "reps", "reads"):
        flag = {"tar_bytes": "size", "big_bytes": "big_size"}.get(name, name)
        if getattr(args, flag) is not None:
            scale = Scale(**{**vars(scale), name: getattr(args, flag)})
    if min(scale.reps, scale.reads, scale.members) < 1:
        raise SystemExit("bench.rootfs: --reps, --reads and --members ≥ 1")
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        say(f"bench.rootfs: missing tools {missing}: `make deb` installs them")
        return 2
    started, host = datetime.now(), host_info()
    say(f"regfs rootfs bench: {scale}; images kept in {args.images}")
    signal.signal(signal.SIGTERM, _interrupt)
    errors: dict[str, str] = {}
    try:
        args.images.mkdir(parents=True, exist_ok=True)
        walk_image = build_image(
            args.images / f"usr-{scale.tar_bytes}-{scale.members}",
            "bench/usr",
            scale.tar_bytes,
            scale.members,
            scale.reads,
        )
        only = args.only or STEPS
        big_image = (
            build_image(
                args.images / f"big-{scale.big_bytes}", "bench/big", scale.big_bytes, 10**6, 1
            )
            if "rss" in only
            else None
        )
        with workspace(args.dir or Path(tempfile.gettempdir())) as work:
            b = Bench(work, scale)
            steps: list[tuple[str, Callable[[], object]]] = [
                ("first_cat", lambda: first_cat(b, walk_image)),
                ("profile", lambda: profile_load(b, walk_image)),
                ("kept_index_cat", lambda: kept_index(b, walk_image)),
                ("walk", lambda: walks(b, walk_image)),
            ]
            if big_image is not None:
                steps.append(("rss", lambda: rss(b, big_image)))
            steps = [(name, step) for name, step in steps if name in only]
            if steps[0][0] != "first_cat":  # the others want an index kept
                index_once(b, walk_image)
            for index, (name, step) in enumerate(steps, 1):
                say(f"[{index}/{len(steps)}] {name} …")
                begun = time.monotonic()
                try:
                    step()
                except Exception as exc:  # one broken measure should not hide the others
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    say(f"    failed: {errors[name]}")
                    if name == "first_cat":  # the others need its kept index
                        break
                    continue
                say(f"    done in {time.monotonic() - begun:.1f} s")
    except KeyboardInterrupt:
        say("bench.rootfs: interrupted; everything was cleaned up")
        return 130
    document: dict[str, object] = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "host": host,
        "loadavg_after": os.getloadavg(),
        "scale": vars(scale),
        "cold_caches": "drop_caches before each side" if can_drop_all() else "not dropped",
        "errors": errors,
        "daemon_tracebacks": b.tracebacks,
        "profile": b.profile,
    }
    out = args.json or RESULTS / f"rootfs-{started:%Y%m%d-%H%M%S}-{os.getpid()}.json"
    write_json(out, document, b.rows)
    print(
        f"regfs rootfs bench, {document['started']}, {host['cpus']} CPUs, load average "
        f"{host['loadavg'][0]:.1f} → {os.getloadavg()[0]:.1f}; {scale.reps} fresh mount(s) "
        "per measure, medians\n"
    )
    print(table(b.rows))
    for name, error in errors.items():
        print(f"error in {name}: {error}")
    print(f"\n{summary(b.rows, errors)}; JSON: {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
