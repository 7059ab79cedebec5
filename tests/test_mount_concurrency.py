"""Many clients at once through real mounts: nothing wrong, nothing stalls, one writer each.

- 16 reader and 4 writer processes share one mount for REGFS_SOAK_SECONDS (20 s by default):
  every byte read is compared, every upload is finished and read back, every syscall (and
  every `dd`, `cat`, `cp`, `mv` run) is timed; the worst latency is printed.
- Two daemons on one root upload into one repository at once, the same blob too; a second
  writer of an upload through the other mount is refused (EBUSY: the driver's flock), and
  once the first writer has closed, the other mount resumes at once (its open waits for the
  first mount's release) and finishes the upload.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from support.mounts import Mount, wait_until
from support.tools import C_LOCALE, MIB, digest_of, open_errno

from storage.check import Severity, check
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.registry import Registry

pytestmark = pytest.mark.mount

REPO = "soak/app"
READERS, WRITERS = 16, 4
SOAK_SECONDS = float(os.environ.get("REGFS_SOAK_SECONDS", "20"))
# No single syscall or tool run may take longer. Typical worst cases here are ~0.1-0.5 s
# (two cores shared by 20 clients, the daemon and fsyncs); 5 s means a stall, not a busy box.
STALL_BOUND = 5.0

# Run by each client process (stdlib only: 20 interpreters importing pytest cost seconds).
# It prints one JSON line: counts and worst latency per kind of operation, and every error.
WORKER = r"""
import hashlib, json, os, random, subprocess, sys, time
from pathlib import Path

role, seed, deadline, repo, src, tmp = sys.argv[1:]
rng, deadline = random.Random(int(seed)), float(deadline)
worst, count, errors = {}, {}, []


def timed(kind, what, fn, *args, **kw):
    start = time.monotonic()
    try:
        return fn(*args, **kw)
    finally:
        took = time.monotonic() - start
        count[kind] = count.get(kind, 0) + 1
        if took > worst.get(kind, (0.0,))[0]:
            worst[kind] = (took, str(what).rpartition("/")[2][:40])


def tool(what, *args):
    result = timed(args[0], what, subprocess.run, [str(a) for a in args], capture_output=True)
    if result.returncode:
        raise OSError(f"{args[0]} exited {result.returncode}: {result.stderr.decode()[:300]}")
    return result.stdout


def read_slice(path, expected):
    offset = rng.randrange(len(expected))
    length = rng.randint(1, 1 << 20)
    want = expected[offset : offset + length]
    how = rng.random()
    if how < 0.7:
        direct = rng.random() < 0.5  # O_DIRECT always asks the daemon; else the page cache
        fd = timed("open", path, os.open, path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            if not direct and rng.random() < 0.3:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop the cached pages
            got = timed("pread", path, os.pread, fd, length, offset)
        finally:
            timed("close", path, os.close, fd)
    elif how < 0.9:
        got = tool(path, "dd", f"if={path}", "bs=64k", f"skip={offset}", f"count={length}",
                   "iflag=skip_bytes,count_bytes", "status=none")
    else:
        got, want = tool(path, "cat", path), expected
    if got != want:
        raise AssertionError(f"{path}: wrong bytes at {offset} (+{len(want)})")


def reader():
    layers = {name: (Path(src) / name).read_bytes() for name in os.listdir(src)}
    while time.monotonic() < deadline:
        name = rng.choice(sorted(layers))
        read_slice(f"{repo}/layers/sha256:{name}", layers[name])


def write_all(path, data, start, flags):
    fd = timed("open-write", path, os.open, path, flags)
    try:
        for offset in range(start, len(data), 128 << 10):
            timed("write", path, os.pwrite, fd, data[offset : offset + (128 << 10)], offset)
    finally:
        timed("close-write", path, os.close, fd)  # a digest-named upload finishes here


def writer():
    n = 0
    while time.monotonic() < deadline:
        n += 1
        data = rng.randbytes(rng.randint(1, 4 * (1 << 20)))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        mode = rng.choice(["mv", "by-digest", "resume", "cp"])
        name = digest if mode == "by-digest" else f"w{seed}-{n}"
        upload, layer = f"{repo}/uploads/{name}", f"{repo}/layers/{digest}"
        if mode == "cp":
            local = Path(tmp) / f"w{seed}"
            local.write_bytes(data)
            tool(upload, "cp", local, upload)
        else:
            half = len(data) // 2 if mode == "resume" else len(data)
            write_all(upload, data[:half], 0, os.O_CREAT | os.O_WRONLY)
            if mode == "resume":  # reopen and go on from the end
                size = os.stat(upload).st_size
                if size != half:
                    raise AssertionError(f"{upload}: size {size} after writing {half}")
                write_all(upload, data, half, os.O_WRONLY)
        if mode != "by-digest":
            timed("rename", upload, os.rename, upload, layer)
        if name in os.listdir(f"{repo}/uploads"):  # its name resolves a while (the layer)
            raise AssertionError(f"{upload} is still an upload once finished")
        with open(layer, "rb") as f:
            got = timed("read-back", layer, f.read)
        if got != data:
            raise AssertionError(f"{layer} does not hold what was uploaded")


try:
    reader() if role == "reader" else writer()
except Exception as exc:
    errors.append(f"{role} {seed}: {type(exc).__name__}: {exc}")
print(json.dumps({"count": count, "worst": worst, "errors": errors}))
"""


def make_layers(root: Path, src: Path, sizes: list[int], seed: int) -> list[str]:
    """Layers linked in REPO (through storage/), their bytes also in src/<hex>."""
    rng = random.Random(seed)
    src.mkdir()
    blobs = [rng.randbytes(size) for size in sizes]

    async def upload_all() -> list[str]:
        repo = Registry(FilesystemDriver(root)).repository(REPO)
        for data in blobs:
            upload = await repo.layers.upload()
            await upload.write(data)
            await upload.finish(digest_bytes(data))
        return [str(digest_bytes(data)) for data in blobs]

    digests = trio.run(upload_all)
    for digest, data in zip(digests, blobs, strict=True):
        (src / digest.split(":")[1]).write_bytes(data)
    return digests


def assert_no_damage(root: Path) -> None:
    findings = trio.run(partial(check, FilesystemDriver(root), verify=True))
    assert [f for f in findings if f.severity == Severity.DAMAGE] == []


# --------------------------------------------------------------------------- (a) the soak


def test_soak_readers_and_writers(
    tmp_path: Path, mount: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    root, src = tmp_path / "root", tmp_path / "src"
    make_layers(root, src, [MIB // 3, MIB, 3 * MIB, 5 * MIB, 8 * MIB], seed=7)
    m: Mount = mount(root)
    deadline = time.monotonic() + SOAK_SECONDS  # CLOCK_MONOTONIC: the same in every process
    roles = ["reader"] * READERS + ["writer"] * WRITERS
    paths = [str(m.path(REPO)), str(src), str(tmp_path)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, role, str(seed), str(deadline), *paths],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for seed, role in enumerate(roles)
    ]
    reports = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=SOAK_SECONDS + 60)
            assert worker.returncode == 0, err.decode()
            reports.append(json.loads(out))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    counts: dict[str, int] = {}
    worst: dict[str, tuple[float, str]] = {}
    for report in reports:
        for kind, n in report["count"].items():
            counts[kind] = counts.get(kind, 0) + n
        for kind, (took, what) in report["worst"].items():
            if took > worst.get(kind, (0.0, ""))[0]:
                worst[kind] = (took, what)
    slowest = max(worst.items(), key=lambda item: item[1][0], default=("nothing", (0.0, "")))
    with capsys.disabled():
        print(f"\nsoak: {SOAK_SECONDS:.0f} s, {READERS} readers, {WRITERS} writers")
        for kind in sorted(counts):
            took, what = worst[kind]
            print(f"  {kind:12s} {counts[kind]:7d} ops, worst {took * 1000:7.1f} ms  {what}")
        print(f"  worst latency: {slowest[1][0] * 1000:.1f} ms ({slowest[0]})")
    assert [e for report in reports for e in report["errors"]] == []
    assert counts.get("pread", 0) > READERS and counts.get("rename", 0) >= WRITERS
    assert slowest[1][0] < STALL_BOUND, f"{slowest[0]} stalled {slowest[1][0]:.1f} s"

    assert os.listdir(m.path(REPO, "uploads")) == []
    m.stop()
    assert_no_damage(root)


# --------------------------------------------------------------------------- (b) two daemons


def test_two_mounts_upload_into_one_repository(tmp_path: Path, mount: Callable) -> None:
    root = tmp_path / "root"
    a: Mount = mount(root, "--tag-ttl", "0")
    b: Mount = mount(root, "-o", "tag_ttl=0")
    os.makedirs(a.path(REPO))
    rng = random.Random(3)
    blobs = {}
    for round_ in range(4):
        same = rng.randbytes(rng.randint(MIB, 2 * MIB))  # both mounts upload it, at once
        own_a, own_b = rng.randbytes(2 * MIB + round_), rng.randbytes(MIB + round_)
        scripts = []
        jobs = [(a, own_a, False), (b, own_b, True), (a, same, False), (b, same, True)]
        for m, data, by_digest in jobs:
            digest = digest_of(data)
            local = tmp_path / f"blob-{len(scripts)}"
            local.write_bytes(data)
            blobs[digest] = data
            if by_digest:
                script = f"cp {local} {m.path(REPO, 'uploads', digest)}"
            else:
                upload = m.path(REPO, "uploads", f"r{round_}-{len(scripts)}")
                script = f"dd if={local} of={upload} bs=64k status=none && mv {upload} "
                script += str(m.path(REPO, "layers", digest))
            scripts.append(subprocess.Popen(["bash", "-c", script], stderr=subprocess.PIPE))
        for script in scripts:
            _, err = script.communicate(timeout=60)
            assert script.returncode == 0, err.decode()
    for m in (a, b):
        assert os.listdir(m.path(REPO, "uploads")) == []
        for digest, data in blobs.items():
            assert m.path(REPO, "layers", digest).read_bytes() == data

    # One writer per upload across the two daemons.
    data = rng.randbytes(3 * MIB + 5)
    digest = digest_of(data)
    on_a, on_b = a.path(REPO, "uploads", "held"), b.path(REPO, "uploads", "held")
    fd = os.open(on_a, os.O_CREAT | os.O_WRONLY)
    try:
        os.write(fd, data[:MIB])
        assert open_errno(on_b, os.O_WRONLY) == errno.EBUSY
        for command in (["rm", on_b], ["mv", on_b, b.path(REPO, "layers", digest)]):
            result = subprocess.run(command, capture_output=True, env=C_LOCALE)
            assert result.returncode != 0 and b"busy" in result.stderr, result.stderr
        assert on_b.read_bytes() == data[:MIB]  # reading while the other mount writes is fine
        os.write(fd, data[MIB : 2 * MIB])
    finally:
        os.close(fd)
    # a's release (hash state, fsync, unlock) runs after close() returned: b's open waits
    # for it (the driver's LOCK_WAIT) instead of being refused.
    assert open_errno(on_b, os.O_WRONLY) is None
    source = tmp_path / "held"
    source.write_bytes(data)
    size = os.stat(on_b).st_size
    assert size == 2 * MIB
    dd = ["dd", f"if={source}", f"of={on_b}", "bs=64k", f"skip={size}", f"seek={size}"]
    dd += ["iflag=skip_bytes", "oflag=seek_bytes", "conv=notrunc", "status=none"]
    subprocess.run(dd, check=True, timeout=60)
    assert os.stat(on_b).st_size == len(data)
    os.rename(on_b, b.path(REPO, "layers", digest))
    assert a.path(REPO, "layers", digest).read_bytes() == data
    assert os.listdir(a.path(REPO, "uploads")) == []

    # A mount with a long tag_ttl sees another's new upload only after SIGHUP.
    c: Mount = mount(root, "--tag-ttl", "300")
    assert os.listdir(c.path(REPO, "uploads")) == []
    os.close(os.open(a.path(REPO, "uploads", "later"), os.O_CREAT | os.O_WRONLY))
    assert os.listdir(c.path(REPO, "uploads")) == []
    (pid,) = c.pids()
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: os.listdir(c.path(REPO, "uploads")) == ["later"], 10, "SIGHUP")
    for m in (a, b, c):
        m.stop()
    assert_no_damage(root)
