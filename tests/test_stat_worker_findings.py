"""Review (stop 26, e): the stat worker started at mount (c1bb558, 55074d3), the tags' links
read in it and read one batch ahead (53e5a5a, 2c919b4), a digest listing numbered from its
first node's repr (4f62bb1), a finished upload's name opened for writing (2c3bb4c), read
as an adversary.

Each `xfail(strict=True)` test is a finding: it fails today for the reason it names, and
passes once regfs answers as the reason says it should (then drop its mark). Worst first.
The tests without a mark pin what was tried and held.
"""

from __future__ import annotations

import errno
import marshal
import mmap
import os
import select
import signal
import socket
import subprocess
import threading
from array import array
from contextlib import suppress
from pathlib import Path

import pytest
import trio
from support.mounts import wait_until
from support.roots import build_root, write_tags
from support.statworkers import put_layers, stat_workers
from support.tools import digest_of, errno_of, run

from regfs.inodes import KEY_SIZE, InodeTable, _digests_named, _named
from regfs.nodes import LayerNode, ManifestNode, Node
from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver, bulkstat, statworker
from storage.paths import TagsDir, path_for
from storage.registry import Registry

NAME = "library/demo"
COUNT = 300  # past INLINE_ENTRIES (64): a bulk call goes to the stat worker
LS_WAIT = 30.0  # what the test waits for one ls before it calls the listing hung


def finding(reason: str) -> pytest.MarkDecorator:
    """A finding of this review: a strict xfail whose reason says what happens and what
    should."""
    return pytest.mark.xfail(strict=True, reason=reason)


def _ls_stopped(worker: int, *lists: tuple[str | Path, ...]) -> list[tuple[int, str] | None]:
    """For each of lists, in turn, (exit status, stdout) of `ls *args`, run while the stat
    worker is stopped (SIGSTOP), or None if it had not ended after LS_WAIT. The worker goes
    on (SIGCONT) at the end either way: an ls whose FUSE request was sent cannot be killed
    (kill -9 leaves it in D, `request_wait_answer`) until the daemon answers it."""
    os.kill(worker, signal.SIGSTOP)
    started: list[subprocess.Popen[bytes]] = []
    got: list[tuple[int, str] | None] = []
    try:
        for args in lists:
            ls = subprocess.Popen(["ls", *map(str, args)], stdout=subprocess.PIPE)
            started.append(ls)
            try:
                out, _ = ls.communicate(timeout=LS_WAIT)
                got.append((ls.returncode, out.decode()))
            except subprocess.TimeoutExpired:
                got.append(None)
    finally:
        with suppress(ProcessLookupError):  # killed, once given up
            os.kill(worker, signal.SIGCONT)
        for ls in started:
            ls.kill()
            ls.communicate(timeout=60)
    return got


def _ready_worker(m) -> int:  # type: ignore[no-untyped-def]
    (pid,) = m.pids()
    wait_until(lambda: "stat worker (pid" in m.log_text(), 10, "the stat worker at mount")
    (worker,) = stat_workers(pid)
    return worker


# ------------------------------------------ a worker that never answers (c1bb558, 53e5a5a)

# Fixed (statworker.ANSWER_DEADLINE, 10 s): the reasons say what happened before.
STOPPED = (
    "A stat worker that stops answering (SIGSTOP here; a worker stuck in the kernel, or "
    "starved) is waited for for ever: _Channel.call has no deadline, so `ls -l layers/` of "
    "300 layers never ends (each READDIR waits for the statahead's bulk stat), and every "
    "later listing queues behind it on the one socket. Should: a request not answered "
    "within a deadline (seconds) gives the worker up (killed, logged) and the listing is "
    "stated in a thread, as when no worker is ready"
)


@pytest.mark.mount
def test_a_stopped_worker_does_not_hang_a_layers_listing(tmp_path, mount):
    root = tmp_path / "root"
    put_layers(root, "r/one", COUNT)
    m = mount(root)
    worker = _ready_worker(m)
    (got,) = _ls_stopped(worker, ("-l", m.path("r/one/layers")))
    assert got is not None, f"ls -l layers/ had not ended after {LS_WAIT} s"
    assert got[0] == 0 and len(got[1].splitlines()) == COUNT + 1
    assert f"the stat worker (pid {worker}) did not answer within" in m.log_text()
    wait_until(lambda: worker not in stat_workers(m.pids()[0]), 10, "the stopped worker killed")
    # Storage that slow is as slow in a thread: no worker spawned and killed per listing.
    assert stat_workers(m.pids()[0]) == []


TAGS_STOPPED = (
    "The tags' read-ahead (Tree._read_tags, a system task) awaits the stopped worker for "
    "ever, and while it is under way every READDIR of tags/ waits for the tags it will "
    "read (Tree.ahead, read_ahead): `ls -l tags/` of 300 tags never ends, nor does a plain "
    "`ls tags/` after it, and no later read-ahead of that repository starts "
    "(_tags_reading keeps it). Should: the read-ahead gives up at a deadline (it is a head "
    "start only) and the lookups read each tag"
)


@pytest.mark.mount
async def test_a_stopped_worker_does_not_hang_a_tags_listing(tmp_path, mount):
    root = tmp_path / "root"
    image = await build_root(root, NAME, size=1000)
    write_tags(root, NAME, image["digest"], [f"t{i:03d}" for i in range(COUNT)])
    m = mount(root)
    worker = _ready_worker(m)
    long, plain = _ls_stopped(worker, ("-l", m.path(NAME, "tags")), (m.path(NAME, "tags"),))
    assert long is not None, f"ls -l tags/ had not ended after {LS_WAIT} s"
    assert plain is not None, f"ls tags/ had not ended after {LS_WAIT} s"
    assert long[0] == 0 and len(long[1].splitlines()) == COUNT + 2  # the total, latest


@pytest.mark.storage
async def test_every_caller_waiting_on_a_stopped_worker_reads_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    write_tags(root, NAME, "sha256:" + "0" * 64, [f"t{i:03d}" for i in range(COUNT)], index=False)
    # In process, the deadline shortened: two bulk calls wait on one stopped worker; the
    # first passes the deadline and gives it up (killed) while the second still waits, and
    # both answer what a thread reads, neither CorruptEntry (the second's channel closed
    # under it).
    monkeypatch.setattr(statworker, "ANSWER_DEADLINE", 0.5)
    directory = path_for(TagsDir(NAME))
    names = [f"t{i:03d}/current/link" for i in range(COUNT)]
    driver = FilesystemDriver(root)
    driver.start_workers()
    with trio.fail_after(10):
        while not driver._stat_worker.ready:
            await trio.sleep(0.01)
    # This driver's own worker: earlier in-process tests of the suite may leave theirs idle.
    channel = driver._stat_worker._channel
    assert channel is not None and channel.worker is not None
    worker = channel.worker.pid
    assert worker in stat_workers()
    os.kill(worker, signal.SIGSTOP)
    got: list[object] = []

    async def read() -> None:
        got.append(await driver.contents(directory, names))

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.sleep(0.3)  # the second waits when the first gives the worker up
                nursery.start_soon(read)
    finally:
        with suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        driver._stat_worker.close()
    assert len(got) == 2 and all(g is not None and len(g) == COUNT and all(g) for g in got)
    assert not driver._stat_worker.ready  # none started again for RETRY_START
    wait_until(lambda: worker not in stat_workers(), 10, "the stopped worker killed")


# ----------------------------------------- a finished upload's name written (2c3bb4c)

# Fixed meanwhile by 5649286 (FinishedWriter is direct_io): what happened before, at 270b9d5.
MAPPED = (
    "FinishedWriter (a just-finished upload's name opened for writing without O_TRUNC) goes "
    "through the page cache: a store through a shared writable mapping of it is refused at "
    "msync (EPERM, logged), but the page keeps the refused bytes, so another reader of "
    "uploads/<digest> that had it cached reads them (b'EVIL' for the layer's first bytes) "
    "until the page goes. Should: a refused write shows no byte of it to anyone (the handle "
    "direct_io, as a tag's or a manifest's writer: no page of it is written, a shared map "
    "refused)"
)


@pytest.mark.mount
async def test_a_refused_write_to_a_finished_uploads_name_shows_no_byte_of_it(tmp_path, mount):
    await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root")
    repo = m.path(*NAME.split("/"))
    data = os.urandom(3 * (1 << 20) + 5)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    name = repo / "uploads" / digest_of(data)
    run("cp", blob, name)
    fd = os.open(name, os.O_RDWR)
    other = os.open(name, os.O_RDONLY)
    try:
        assert os.pread(other, 8192, 0) == data[:8192]  # its pages cached
        assert errno_of(lambda: os.pwrite(fd, b"X" * 4096, 0)) == errno.EPERM
        assert errno_of(lambda: os.pwrite(fd, data[:8000] + b"Y", 0)) == errno.EPERM
        assert os.pread(other, 8192, 0) == data[:8192]
        try:
            mapped = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:  # a direct_io file: no shared map (no DIRECT_IO_ALLOW_MMAP)
            assert exc.errno == errno.ENODEV
        else:
            with mapped:
                mapped[0:4] = b"EVIL"
                assert errno_of(mapped.flush) == errno.EPERM
                assert os.pread(other, 8192, 0) == data[:8192]
        assert os.pread(fd, 8192, 0) == data[:8192]
        assert run("head", "-c", "8192", name).stdout == data[:8192]
    finally:
        os.close(other)
        os.close(fd)
    assert (repo / "layers" / digest_of(data)).read_bytes() == data


# ----------------------------------------- held: what was tried against 4f62bb1


@pytest.mark.storage
@pytest.mark.parametrize("kind", [LayerNode, ManifestNode])
def test_a_repository_named_as_a_listed_hex_numbers_its_listing_as_lookups_do(kind) -> None:
    # `_digests_named` cuts the first node's repr at the *last* quoted hex (rindex): a
    # repository named as that hex (or holding it) repeats it earlier in the repr. Held:
    # names, numbers and lookups agree, no two nodes share a number.
    digests = [digest_bytes(b"%d" % i) for i in range(50)]
    key = bytes(range(KEY_SIZE))
    hexed = digests[0].hex
    for repo in (hexed, f"{hexed}/{hexed}", f"a/{hexed}", digests[1].hex):
        nodes: list[Node] = [node for _, node in kind.listing(repo, digests)]
        assert list(_digests_named(nodes, {kind}) or []) == list(map(_named, nodes))
        numbers = list(InodeTable(key).inode_all(nodes))
        assert numbers == [InodeTable(key).inode(node) for node in nodes]
        assert len(set(numbers)) == len(nodes)


@pytest.mark.storage
def test_a_worker_whose_daemon_hung_up_with_a_reply_unread_ends_quietly(tmp_path: Path) -> None:
    # The daemon closes its end (unmount, or a worker given up) while a reply of the
    # worker's is unread: the worker's next recv is ECONNRESET, which is the end of its
    # daemon, not an error to print (a traceback in the daemon's log, seen in the suite).
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = marshal.dumps((False, ["a"], 96))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ours.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))])
    finally:
        os.close(fd)

    def hang_up() -> None:
        select.select([ours], [], [], 5)  # the reply is there: left unread, the end closed
        ours.close()

    thread = threading.Thread(target=hang_up)
    thread.start()
    try:
        bulkstat.serve(theirs)  # returns; raised ConnectionResetError before
    finally:
        thread.join(5)
        theirs.close()


@pytest.mark.storage
async def test_a_listing_of_many_invalid_tag_names_logs_a_bounded_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Reviewer e: every invalid name went into one warning, 100,000 names a line of MBs.
    root = tmp_path / "root"
    write_tags(root, NAME, "sha256:" + "0" * 64, ["ok", *(f"bad:{i:05d}" for i in range(5000))])
    tags = Registry(FilesystemDriver(root)).repository(NAME).tags
    with caplog.at_level("WARNING", logger="storage.tags"):
        assert await tags.list() == ["ok"]
    (record,) = [r for r in caplog.records if "invalid tag names" in r.getMessage()]
    message = record.getMessage()
    assert "ignoring 5000 invalid tag names" in message and "and more" in message
    assert len(message) < 1000
