"""What one FUSE request costs through pyfuse3 + trio, without regfs (issues 16 and 18).

Every cold walk is bounded by the daemon's time per request (GETATTR, LOOKUP, READDIR). This mounts
a filesystem that answers from memory (a file, a directory of `--entries` names, every timeout 0, so
the kernel asks each time) and times the calls that make one request each: fstat of an O_PATH
descriptor (GETATTR; of `kept`, a GETATTR answered by `getattr_kept`, without a coroutine, on
regfs's pyfuse3 build: third_party/pyfuse3), access(F_OK) by path (LOOKUP; of `thread`, a LOOKUP
whose handler waits for a worker thread, as regfs's do that read storage), a listing of the
directory (READDIRPLUS). Each `--python` is a virtualenv's interpreter with its own pyfuse3 (e.g. a
stock 3.5.0 against regfs's build); they take turns for `--rounds`, and the medians are shown: wall
time per call, and the daemon's CPU per request (its main thread's run time, /proc/<pid>/schedstat),
the request counts read back from the daemon itself.

    python -m bench.requests --python /stock/bin/python --python .venv/bin/python

The daemon half (`serve`) needs only pyfuse3 and trio, so any such interpreter runs it.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
KEPT_INODE = FILE_INODE + 1  # `kept`, a file whose GETATTR `getattr_kept` answers
DIR_INODE = KEPT_INODE + 1
KINDS = ("getattr", "kept", "lookup", "thread", "readdir")  # what measure_all measures
COUNTS = b"user.counts"  # getxattr of this on the root answers the daemon's request counts


class Memory(pyfuse3.Operations):
    """A root holding `f`, `kept`, `thread` and `big/` (`entries` empty files); nothing is
    cached by the kernel (every timeout 0) and every request is counted by its name (a GETATTR
    of `kept` as "kept", whichever method answers it; a LOOKUP of `thread` as "thread")."""

    def __init__(self, entries: int) -> None:
        super().__init__()
        self.entries = entries
        self.counts: collections.Counter[str] = collections.Counter()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        directory = inode in (pyfuse3.ROOT_INODE, DIR_INODE)
        attr.st_mode = (stat.S_IFDIR | 0o755) if directory else (stat.S_IFREG | 0o644)
        attr.st_ino = inode
        attr.st_nlink = 2 if directory else 1
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        return attr

    def _child(self, parent: int, name: bytes) -> int:
        if parent == pyfuse3.ROOT_INODE:
            found = {b"f": FILE_INODE, b"kept": KEPT_INODE, b"big": DIR_INODE}.get(name)
            if found is not None:
                return found
        elif parent == DIR_INODE and name.isdigit() and int(name) < self.entries:
            return DIR_INODE + 1 + int(name)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def getattr_kept(self, inode: int) -> pyfuse3.EntryAttributes | None:
        if inode != KEPT_INODE:
            return None
        self.counts["kept"] += 1
        return self._attr(inode)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counts["kept" if inode == KEPT_INODE else "getattr"] += 1
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == b"thread":
            self.counts["thread"] += 1
            return await trio.to_thread.run_sync(self._attr, FILE_INODE)
        self.counts["lookup"] += 1
        return self._attr(self._child(parent_inode, name))

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # the kernel stops asking

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.counts["opendir"] += 1
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.counts["readdir"] += 1
        if fh != DIR_INODE:
            return
        for i in range(start_id, self.entries):
            if not pyfuse3.readdir_reply(token, b"%d" % i, self._attr(DIR_INODE + 1 + i), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self.counts["releasedir"] += 1

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.counts["forget"] += 1

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode != pyfuse3.ROOT_INODE or name != COUNTS:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return json.dumps(self.counts).encode()


def serve(mountpoint: str, entries: int) -> None:
    """The daemon: serve until unmounted."""
    pyfuse3.init(Memory(entries), mountpoint, {"fsname=bench-requests"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


def run_ns(pid: int) -> int:
    """The CPU time the daemon's main thread (where trio runs every handler) has used, ns."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


@dataclass(frozen=True)
class Sample:
    """One kind of call, measured once on one interpreter."""

    calls: int
    wall_s: float
    cpu_s: float
    requests: int  # of the kind the call is for, as the daemon counted them

    @property
    def us_per_call(self) -> float:
        return self.wall_s / self.calls * 1e6

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6


class Daemon:
    """One `serve` process under `python`, mounted on a fresh directory; always unmounted."""

    def __init__(self, python: str, base: Path, entries: int) -> None:
        self.mountpoint = Path(tempfile.mkdtemp(dir=base))
        self.process = subprocess.Popen(
            [python, __file__, "serve", str(self.mountpoint), str(entries)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{python}: the bench filesystem did not mount")
            time.sleep(0.01)

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(json.loads(os.getxattr(self.mountpoint, COUNTS)))

    def measure(self, kind: str, calls: int, call: Callable[[], object]) -> Sample:
        before, cpu = self.counts(), run_ns(self.process.pid)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - start
        cpu = run_ns(self.process.pid) - cpu
        requests = (self.counts() - before)[kind]
        return Sample(calls, wall, cpu / 1e9, requests)

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.mountpoint.rmdir()


def measure_all(daemon: Daemon, calls: int, listings: int) -> dict[str, Sample]:
    path = daemon.mountpoint / "f"
    fd = os.open(path, os.O_PATH)
    kept = os.open(daemon.mountpoint / "kept", os.O_PATH)
    thread = daemon.mountpoint / "thread"
    try:
        os.access(path, os.F_OK)  # the kernel learns that ACCESS is not implemented
        return {
            "getattr": daemon.measure("getattr", calls, lambda: os.stat(fd)),
            "kept": daemon.measure("kept", calls, lambda: os.stat(kept)),
            "lookup": daemon.measure("lookup", calls, lambda: os.access(path, os.F_OK)),
            "thread": daemon.measure("thread", calls, lambda: os.access(thread, os.F_OK)),
            "readdir": daemon.measure(
                "readdir", listings, lambda: os.listdir(daemon.mountpoint / "big")
            ),
        }
    finally:
        os.close(kept)
        os.close(fd)


def _version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import pyfuse3; print(pyfuse3.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        serve(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.requests", description=__doc__)
    parser.add_argument("--python", action="append", help="an interpreter (default: this one)")
    parser.add_argument("--calls", type=int, default=20_000, help="fstat and access calls")
    parser.add_argument("--entries", type=int, default=10_000, help="names in the directory")
    parser.add_argument("--listings", type=int, default=5, help="listings of the directory")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each interpreter")
    args = parser.parse_args(argv)
    pythons: list[str] = args.python or [sys.executable]
    samples: dict[str, list[dict[str, Sample]]] = {p: [] for p in pythons}
    with tempfile.TemporaryDirectory(prefix="bench-requests-") as base:
        for _ in range(args.rounds):
            for python in pythons:
                daemon = Daemon(python, Path(base), args.entries)
                try:
                    samples[python].append(measure_all(daemon, args.calls, args.listings))
                finally:
                    daemon.stop()
    print(f"load {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds")
    for python in pythons:
        print(f"{python} (pyfuse3 {_version(python)})")
        for kind in KINDS:
            runs = [run[kind] for run in samples[python]]
            per_call = statistics.median(s.us_per_call for s in runs)
            cpu = statistics.median(s.cpu_us_per_request for s in runs)
            requests = statistics.median(s.requests / s.calls for s in runs)
            print(
                f"  {kind:8} {per_call:9.1f} us per call, {requests:5.1f} requests per call,"
                f" daemon CPU {cpu:5.1f} us per request"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
