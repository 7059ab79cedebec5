"""The write side through a real mount: uploads/, tags/, rm and mkdir, driven by real tools.

`cp`, `cat >>`, `dd`, `mv`, `rm`, `mkdir`, `ls`, `getfattr` and `sha256sum` run as their own
processes against a `regfs mount` started by the real command line; Python os calls stand in
where a test needs the errno of one syscall. Results are checked through the mount and in the
storage root itself, and every failed operation is checked to leave the root as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from support.mounts import REGFS, Mount, parse_getfattr, wait_until
from support.registry import OCI_INDEX, blob_data_path, repo_path, upload_path
from support.roots import build_root
from support.snapshots import snapshot
from support.tools import (
    MIB,
    bash,
    digest_of,
    errno_of,
    ls,
    open_errno,
    run,
    sha256sum,
)
from support.uploads import new_repo, state_path, upload_uuids, uuid_of, write_file

pytestmark = pytest.mark.mount


# --------------------------------------------------------------------------- helpers


def wait_for_state(root: Path, name: str, uuid: str, offset: int) -> None:
    """Wait until the daemon saved the hash state at offset: the upload's release (which
    arrives after close() has returned) is done, so storage is settled for a snapshot."""
    path = state_path(root, name, uuid, offset)
    wait_until(path.exists, 10, f"hash state {path}")


def start_mount(root: Path, mountpoint: Path, log: Path, *args: str) -> Mount:
    return Mount(str(root), mountpoint, log, list(args)).start()


# --------------------------------------------------------------------------- resume


async def test_resume_after_remount_with_cat_and_dd(tmp_path, mount):
    """Half a blob, unmount, mount again, finish it with `cat >>` and with `dd seek=`.

    The hash is carried by the state saved at the first half, not recomputed from zero:
    while each upload is resumed, the first 4 KiB of its data file in the root are zeroed,
    and restored only before the `mv`. A resume that re-read the data from the start would
    save a wrong hash state at the end, and the `mv` to the original digest would fail.
    """
    root, name = tmp_path / "root", "myorg/app"
    data = os.urandom(5 * MIB + 12_345)
    half = 3 * MIB  # dd's skip=3 seek=3 with bs=1M
    blob = write_file(tmp_path / "blob", data)
    first = write_file(tmp_path / "first", data[:half])
    rest = write_file(tmp_path / "rest", data[half:])
    digest = digest_of(data)

    m1 = mount(root)
    uploads = new_repo(m1, name) / "uploads"
    run("cp", first, uploads / "viacat")
    run("dd", f"if={blob}", f"of={uploads / 'viadd'}", "bs=1M", "count=3", "status=none")
    uuids = {n: uuid_of(uploads / n) for n in ("viacat", "viadd")}
    m1.stop()

    for uuid in uuids.values():
        state = state_path(root, name, uuid, half)
        assert state.exists() and len(state.read_bytes()) == 108  # Go's MarshalBinary form
        assert (upload_path(root, name, uuid) / "data").stat().st_size == half
        with open(upload_path(root, name, uuid) / "data", "r+b") as f:
            f.write(bytes(4096))

    m2 = mount(root)
    uploads = m2.path(*name.split("/"), "uploads")
    assert ls(uploads) == ["viacat", "viadd"]
    assert {n: os.stat(uploads / n).st_size for n in uuids} == {"viacat": half, "viadd": half}
    assert {n: uuid_of(uploads / n) for n in uuids} == uuids
    bash(f"cat '{rest}' >> '{uploads / 'viacat'}'")
    run("dd", f"if={blob}", f"of={uploads / 'viadd'}", "bs=1M", "skip=3", "seek=3",
        "conv=notrunc", "status=none")  # fmt: skip
    for uuid in uuids.values():
        wait_for_state(root, name, uuid, len(data))
        with open(upload_path(root, name, uuid) / "data", "r+b") as f:
            f.write(data[:4096])
    assert {n: os.stat(uploads / n).st_size for n in uuids} == {n: len(data) for n in uuids}

    layers = m2.path(*name.split("/"), "layers")
    run("mv", uploads / "viacat", layers / digest)
    assert sha256sum(layers / digest) == digest
    # The same blob again: it deduplicates against the first.
    run("mv", uploads / "viadd", layers / digest)
    assert ls(uploads) == [] and ls(layers) == [digest]
    assert upload_uuids(root, name) == []
    assert sha256sum(blob_data_path(root, digest)) == digest
    assert (layers / digest).read_bytes() == data


async def test_resume_after_kill_9(tmp_path, mount):
    """The daemon is SIGKILLed after the first halves: one upload closed (its state saved),
    one still open in a writer. The next `regfs mount` on the same mountpoint cleans the dead
    mount; both uploads resume with `cat >>` and finish byte-exact."""
    root, name = tmp_path / "root", "myorg/app"
    data = os.urandom(4 * MIB + 777)
    half = 2 * MIB + 5
    first = write_file(tmp_path / "first", data[:half])
    rest = write_file(tmp_path / "rest", data[half:])
    digest = digest_of(data)

    m1 = mount(root)
    uploads = new_repo(m1, name) / "uploads"
    run("cp", first, uploads / "closed")
    closed = uuid_of(uploads / "closed")
    wait_for_state(root, name, closed, half)
    fd = os.open(uploads / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    assert os.write(fd, data[:half]) == half
    still_open = uuid_of(uploads / "open")
    # A write is answered while its append is being stored (up to 16 MiB ahead, as a page
    # cache would); only close() waits for storage. Kill once the bytes are on disk, so the
    # sizes below are exact: what a kill loses of appends in flight is the crash tests' part.
    open_data = upload_path(root, name, still_open) / "data"
    wait_until(lambda: open_data.stat().st_size == half, 10, "the open upload's bytes on disk")
    for pid in m1.pids():
        os.kill(pid, signal.SIGKILL)

    # A request in flight when the daemon's /dev/fuse closes ends in ECONNABORTED; later
    # ones in ENOTCONN. (stat may still answer from the kernel's attribute cache.)
    def dead() -> bool:
        return errno_of(lambda: os.listdir(m1.mountpoint)) == errno.ENOTCONN

    wait_until(dead, 10, "the mount to be dead")
    with contextlib.suppress(OSError):
        os.close(fd)  # the connection is gone: the kernel answers for the daemon

    # Mounting again on the dead mountpoint cleans it up; nothing was held in memory.
    m2 = start_mount(root, m1.mountpoint, tmp_path / "after-kill.log")
    try:
        assert "dead FUSE mount" in m2.log_text()
        uploads = m2.path(*name.split("/"), "uploads")
        assert ls(uploads) == ["closed", "open"]
        assert os.stat(uploads / "closed").st_size == os.stat(uploads / "open").st_size == half
        assert state_path(root, name, closed, half).exists()
        # The killed writer never closed: no state at half, so regfs hashes from zero.
        assert not state_path(root, name, still_open, half).exists()
        layers = m2.path(*name.split("/"), "layers")
        for upload in ("closed", "open"):
            bash(f"cat '{rest}' >> '{uploads / upload}'")
            run("mv", uploads / upload, layers / digest)
        assert ls(uploads) == [] and ls(layers) == [digest]
        assert sha256sum(layers / digest) == digest
        assert sha256sum(blob_data_path(root, digest)) == digest
        assert upload_uuids(root, name) == []
    finally:
        m2.stop()
    m2.check_log()


# --------------------------------------------------------------------------- uploads/


async def test_uploads_listing_xattrs_truncate_and_overwrite(tmp_path, mount):
    """`ls -l` shows each upload's progress and start time, `getfattr -d` its uuid and start;
    O_TRUNC restarts an upload from zero; a write below the end overwrites, and the digest
    the upload finishes with is that of the overwritten bytes."""
    root, name = tmp_path / "root", "myorg/app"
    m = mount(root)
    repo = new_repo(m, name)
    uploads, layers = repo / "uploads", repo / "layers"
    big, small = os.urandom(2 * MIB + 3), os.urandom(1000)
    run("cp", write_file(tmp_path / "big", big), uploads / "a")
    run("cp", write_file(tmp_path / "small", small), uploads / "b")

    out = run("ls", "-ln", "--time-style=+%s", uploads).stdout.decode().splitlines()
    listed = {f[6]: (int(f[4]), int(f[5])) for f in (line.split() for line in out[1:])}
    assert {n: size for n, (size, _) in listed.items()} == {"a": len(big), "b": len(small)}
    out = run("getfattr", "-d", "--absolute-names", uploads / "a", uploads / "b").stdout
    attrs = parse_getfattr(out.decode())
    for upload in ("a", "b"):
        found = attrs[str(uploads / upload)]
        uuid = found["user.regfs.uuid"]
        started = (upload_path(root, name, uuid) / "startedat").read_text()
        assert found["user.regfs.startedat"] == started
        epoch = datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp()
        assert listed[upload][1] == int(epoch)  # mtime is the start time
    assert sorted(a["user.regfs.uuid"] for a in attrs.values()) == upload_uuids(root, name)

    # O_TRUNC: cp over an existing upload, and `: >`, restart it from zero (same upload).
    uuid_a = uuid_of(uploads / "a")
    run("cp", tmp_path / "small", uploads / "a")
    assert os.stat(uploads / "a").st_size == len(small) and uuid_of(uploads / "a") == uuid_a
    wait_for_state(root, name, uuid_a, len(small))
    states = os.listdir(state_path(root, name, uuid_a, 0).parent)
    assert all(int(s) <= len(small) for s in states), states  # none left above the new end
    bash(f": > '{uploads / 'b'}'")
    assert os.stat(uploads / "b").st_size == 0

    # A write below the end overwrites; the hash follows the new bytes.
    data = bytearray(os.urandom(3 * MIB))
    original = digest_of(bytes(data) + b"tail")
    fd = os.open(uploads / "c", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        assert os.pwrite(fd, b"overwritten", 1234) == 11
        os.write(fd, b"tail")  # the file position is still at the end
    finally:
        os.close(fd)
    data[1234 : 1234 + 11] = b"overwritten"
    data += b"tail"
    assert (uploads / "c").read_bytes() == data
    assert errno_of(lambda: os.rename(uploads / "c", layers / original)) == errno.EINVAL
    run("mv", uploads / "c", layers / digest_of(bytes(data)))
    run("mv", uploads / "a", layers / digest_of(small))
    assert ls(layers) == sorted([digest_of(bytes(data)), digest_of(small)])
    assert sha256sum(layers / digest_of(bytes(data))) == digest_of(bytes(data))
    assert ls(uploads) == ["b"]


async def test_an_upload_being_written_is_stated_from_its_writer(tmp_path, mount):
    """While its writer is open, stat of an upload answers from the writer (the one writer of
    that upload anywhere): every byte written, its last write's time, and no storage read (on S3 a
    stat costs a GET of startedat and a listing, and `cp` stats after every write). Shown
    here by taking startedat away behind the mount: storage could no longer answer."""
    root, name = tmp_path / "root", "myorg/stat"
    m = mount(root)
    path = new_repo(m, name) / "uploads" / "w"
    data = os.urandom(3 * MIB + 5)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[: 2 * MIB])
        started = upload_path(root, name, uuid_of(path)) / "startedat"
        kept = started.read_bytes()
        epoch = datetime.fromisoformat(kept.decode().replace("Z", "+00:00")).timestamp()
        started.unlink()
        os.write(fd, data[2 * MIB :])
        written = time.time()
        for st in (os.stat(path), os.fstat(fd)):
            assert st.st_size == len(data) and epoch <= st.st_mtime <= written, st
        started.write_bytes(kept)
    finally:
        os.close(fd)
    assert sha256sum(path) == digest_of(data)
    st = os.stat(path)  # closed: storage answers again (the data file's mtime)
    assert st.st_size == len(data) and epoch <= st.st_mtime <= time.time(), st


async def test_rm_cancels_and_mv_renames_uploads(tmp_path, mount):
    """`rm` cancels (its `_uploads/<uuid>` goes), `mv` within uploads/ renames, onto an
    existing name replaces that upload, and onto a digest name finishes it (the pattern of
    tools that write a temporary file and rename it)."""
    root, name = tmp_path / "root", "myorg/app"
    m = mount(root)
    repo = new_repo(m, name)
    uploads, layers = repo / "uploads", repo / "layers"
    one, two = os.urandom(300_000), os.urandom(200_000)
    src_one, src_two = write_file(tmp_path / "one", one), write_file(tmp_path / "two", two)

    run("cp", src_one, uploads / "a")
    uuid = uuid_of(uploads / "a")
    assert upload_path(root, name, uuid).is_dir()
    run("rm", uploads / "a")
    assert ls(uploads) == [] and not upload_path(root, name, uuid).exists()

    run("cp", src_one, uploads / "a")
    uuid_a = uuid_of(uploads / "a")
    run("mv", uploads / "a", uploads / "b")
    assert ls(uploads) == ["b"] and uuid_of(uploads / "b") == uuid_a
    assert (upload_path(root, name, uuid_a) / "regfs-label").read_text() == "b"

    run("cp", src_two, uploads / "c")
    uuid_c = uuid_of(uploads / "c")
    run("mv", uploads / "c", uploads / "b")  # replaces the upload named b
    assert ls(uploads) == ["b"] and uuid_of(uploads / "b") == uuid_c
    assert (uploads / "b").read_bytes() == two
    assert upload_uuids(root, name) == [uuid_c]

    run("cp", src_one, uploads / ".one.tmp")
    run("mv", uploads / ".one.tmp", uploads / digest_of(one))
    run("mv", uploads / "b", layers / digest_of(two))
    assert ls(uploads) == [] and upload_uuids(root, name) == []
    assert ls(layers) == sorted([digest_of(one), digest_of(two)])
    assert (layers / digest_of(one)).read_bytes() == one


async def test_finish_of_a_present_blob_deduplicates(tmp_path, mount):
    """A blob already in the store is linked, never rewritten: its data file keeps its
    inode and mtime whether the same repository or another one finishes it again."""
    root = tmp_path / "root"
    m = mount(root)
    first, second = new_repo(m, "myorg/one"), new_repo(m, "myorg/two")
    data = os.urandom(1_500_000)
    src, digest = write_file(tmp_path / "blob", data), digest_of(data)
    run("cp", src, first / "uploads" / digest)
    on_disk = blob_data_path(root, digest)
    os.utime(on_disk, ns=(10**18, 10**18))  # a rewrite of the data would move this mtime
    before = on_disk.stat()
    run("cp", src, first / "uploads" / digest)
    run("cp", src, second / "uploads" / "x")
    run("mv", second / "uploads" / "x", second / "layers" / digest)
    run("cp", src, second / "uploads" / digest)
    after = on_disk.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    for repo, name in ((first, "myorg/one"), (second, "myorg/two")):
        assert ls(repo / "layers") == [digest] and ls(repo / "uploads") == []
        assert upload_uuids(root, name) == []
        assert sha256sum(repo / "layers" / digest) == digest


async def test_finished_upload_shows_at_once(tmp_path, mount):
    """Right after `cp` to a digest name returns, `ls layers/` and `stat` show the layer and
    `ls uploads/` no longer shows the upload: the finish happens in flush, before close()
    returns. Also `cp` then `mv` at once: the writer's release must not get in the way."""
    root, name = tmp_path / "root", "myorg/app"
    m = mount(root)
    repo = new_repo(m, name)
    for i in range(4):
        data = os.urandom(100_000 + i * 300_000)
        src, digest = write_file(tmp_path / f"blob{i}", data), digest_of(data)
        via_mv = i % 2 == 1
        run("ls", repo / "layers", repo / "uploads")  # the kernel has seen both before
        finish = (
            f"mv uploads/up{i} layers/{digest}" if via_mv else "true"
        )  # cp to a name, then mv at once; or cp to the digest name
        target = f"uploads/up{i}" if via_mv else f"uploads/{digest}"
        out = bash(
            f"cd '{repo}' && cp '{src}' {target} && {finish} && ls layers && echo -- && "
            f"stat -c %s layers/{digest} && echo -- && ls uploads"
        ).stdout.decode()
        listed_layers, size, listed_uploads = out.split("--\n")
        assert digest in listed_layers.split()
        assert int(size) == len(data)
        assert listed_uploads.split() == []
    assert upload_uuids(root, name) == []
    # Nothing arrives late (a release saving a hash state) to re-create an upload directory:
    # unmounting waits for the daemon, so every pending request has been answered.
    m.stop()
    assert upload_uuids(root, name) == []


# --------------------------------------------------------------------------- errors


async def test_upload_errors_leave_storage_unchanged(tmp_path, mount):
    """A gap (EINVAL), a second writer (EBUSY), `mv` to a wrong digest (EINVAL, the log names
    both digests, the upload stays), `mv` to `layers/notadigest` (EINVAL), invalid upload
    names (EINVAL): each leaves the storage root exactly as it was."""
    root, name = tmp_path / "root", "myorg/app"
    m = mount(root)
    repo = new_repo(m, name)
    uploads, layers = repo / "uploads", repo / "layers"
    data = os.urandom(1_000_000)
    run("cp", write_file(tmp_path / "blob", data), uploads / "x")
    uuid = uuid_of(uploads / "x")
    wait_for_state(root, name, uuid, len(data))
    before = snapshot(root)

    fd = os.open(uploads / "x", os.O_WRONLY)
    try:
        assert errno_of(lambda: os.pwrite(fd, b"gap", len(data) + 1)) == errno.EINVAL
        assert errno_of(lambda: os.pwrite(fd, b"gap", len(data) + 10 * MIB)) == errno.EINVAL
        # One writer per upload: a second open for writing is refused, reading is not.
        assert open_errno(uploads / "x", os.O_WRONLY) == errno.EBUSY
        assert open_errno(uploads / "x", os.O_RDWR | os.O_APPEND) == errno.EBUSY
        assert (uploads / "x").read_bytes() == data
    finally:
        os.close(fd)
    assert os.stat(uploads / "x").st_size == len(data)

    wrong = "sha256:" + "ab" * 32
    assert errno_of(lambda: os.rename(uploads / "x", layers / wrong)) == errno.EINVAL
    log = m.log_text()
    assert wrong in log and digest_of(data) in log, log[-2000:]
    assert errno_of(lambda: os.rename(uploads / "x", layers / "notadigest")) == errno.EINVAL
    unsupported = layers / ("sha512:" + "a" * 128)
    assert errno_of(lambda: os.rename(uploads / "x", unsupported)) == errno.EINVAL
    flags = os.O_WRONLY | os.O_CREAT
    for bad in ("a b", "tab\there", "star*", "qu?te", "ünï"):
        assert open_errno(uploads / bad, flags) == errno.EINVAL, bad
        assert errno_of(lambda b=bad: os.rename(uploads / "x", uploads / b)) == errno.EINVAL, bad
    assert ls(uploads) == ["x"] and ls(layers) == []
    assert snapshot(root) == before

    # The upload is intact: it still finishes under its real digest.
    run("mv", uploads / "x", layers / digest_of(data))
    assert ls(layers) == [digest_of(data)]


async def test_digest_named_upload_with_wrong_content_fails_close_with_eio(tmp_path, mount):
    """close() is where a digest-named upload finishes, so its mismatch surfaces there (EIO);
    the upload stays (only its own directory changed) for a resume or an `rm`."""
    root, name = tmp_path / "root", "myorg/app"
    m = mount(root)
    uploads = new_repo(m, name) / "uploads"
    run("cp", write_file(tmp_path / "other", b"other"), uploads / "other")
    run("rm", uploads / "other")  # `_uploads/` exists from now on
    before = snapshot(root)

    data = os.urandom(700_000)
    digest = digest_of(data)
    fd = os.open(uploads / digest, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data[:-1] + b"!")
    assert errno_of(lambda: os.close(fd)) == errno.EIO
    log = m.log_text()
    assert "not finished" in log and digest in log and digest_of(data[:-1] + b"!") in log
    assert ls(uploads) == [digest] and os.stat(uploads / digest).st_size == len(data)
    uuid = uuid_of(uploads / digest)
    wait_for_state(root, name, uuid, len(data))
    prefix = os.path.relpath(upload_path(root, name, uuid), root)
    after = snapshot(root)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert changed and all(p.startswith(prefix) for p in changed), changed

    # Resume: overwrite the wrong last byte; the close finishes it this time.
    fd = os.open(uploads / digest, os.O_WRONLY)
    os.pwrite(fd, data[-1:], len(data) - 1)
    os.close(fd)
    assert ls(uploads) == [] and ls(m.path("myorg", "app", "layers")) == [digest]
    assert sha256sum(blob_data_path(root, digest)) == digest


async def test_invalid_manifests_are_refused_at_close(tmp_path, mount):
    """Each manifest check fails close() with EINVAL (EFBIG for the size, on write), stores
    nothing, and the log names the check."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    m = mount(root)
    tags = m.path("library", "demo", "tags")
    good = json.loads(image["manifest"])
    missing = "sha256:" + "cd" * 32
    bad_layer = {**good, "layers": [{**good["layers"][0], "digest": missing}]}
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": good["mediaType"], "digest": missing, "size": 100}],
    }
    cases = {
        "badjson": (b'{"schemaVersion": 2,', "not valid JSON"),
        "badtype": (
            json.dumps({**good, "mediaType": "application/x-nope"}).encode(),
            "unsupported manifest media type",
        ),
        "nolayer": (json.dumps(bad_layer).encode(), f"names blob {missing}"),
        "nochild": (json.dumps(index).encode(), f"names manifest {missing}"),
    }
    before = snapshot(root)
    for tag, (body, check) in cases.items():
        fd = os.open(tags / tag, os.O_WRONLY | os.O_CREAT, 0o644)
        assert os.write(fd, body) == len(body)
        assert errno_of(lambda fd=fd: os.close(fd)) == errno.EINVAL, tag
        assert check in m.log_text(), (tag, m.log_text()[-1500:])
    # The same through cp, as a user would meet it.
    src = write_file(tmp_path / "bad.json", cases["badjson"][0])
    result = run("cp", src, tags / "viacp", check=False)
    assert result.returncode != 0 and b"Invalid argument" in result.stderr

    # Over 4 MiB: refused on write (EFBIG) before any byte is stored.
    fat = json.dumps({**good, "annotations": {"pad": "x" * (4 * MIB)}}).encode()
    fd = os.open(tags / "fat", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written, code = 0, None
        while code is None and written < len(fat):
            try:
                written += os.write(fd, fat[written : written + MIB])
            except OSError as exc:
                code = exc.errno
        assert code == errno.EFBIG and written <= 4 * MIB
    finally:
        assert errno_of(lambda: os.close(fd)) == errno.EINVAL  # what got in is not JSON
    assert "limited to 4 MiB" in m.log_text()

    assert ls(tags) == ["latest"]
    assert snapshot(root) == before


async def test_a_manifest_being_written_shows_now_as_its_mtime(tmp_path, mount):
    """stat of a tag (new, or truncated) and of a manifest by digest while they are being
    written: the bytes so far and an mtime of now, before and after close. The pending mtime
    was once given in seconds where nanoseconds go, which showed 1970."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    m = mount(root)
    repo = m.path("library", "demo")
    body = image["manifest"]
    untagged = json.dumps({**json.loads(body), "annotations": {"n": "1"}}).encode()
    cases = [  # a name that is not stored yet has no lookup: fstat only
        (repo / "tags" / "new", body, False),  # create
        (repo / "tags" / "latest", body, True),  # open with O_TRUNC
        (repo / "manifests" / digest_of(untagged), untagged, False),  # create by digest
    ]
    slack = 60 * 10**9
    for path, data, stored in cases:
        before = time.time_ns() - slack
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            assert os.write(fd, data[:100]) == 100
            for st in (os.fstat(fd), *([os.stat(path)] if stored else [])):
                assert st.st_size == 100, path
                assert before <= st.st_mtime_ns <= time.time_ns() + slack, (path, st.st_mtime)
            assert os.write(fd, data[100:]) == len(data) - 100
        finally:
            os.close(fd)
        st = os.stat(path)
        assert st.st_size == len(data), path
        assert before <= st.st_mtime_ns <= time.time_ns() + slack, (path, st.st_mtime)


async def test_invalid_tag_and_repository_names_are_einval(tmp_path, mount):
    """Creating a tag or a repository under a name the registry's grammar refuses is EINVAL
    (a lookup of it is ENOENT), and nothing is stored."""
    root = tmp_path / "root"
    await build_root(root, size=10_000)
    m = mount(root)
    tags = m.path("library", "demo", "tags")
    before = snapshot(root)
    flags = os.O_WRONLY | os.O_CREAT
    for bad in (".x", "a b", "t" * 129, "-dash", "ünï"):
        assert errno_of(lambda b=bad: os.stat(tags / b)) == errno.ENOENT, bad
        assert open_errno(tags / bad, flags) == errno.EINVAL, bad
    for bad in ("Bad_Name", "UPPER", "a..b", "-x", "x_"):
        assert errno_of(lambda b=bad: os.mkdir(m.path(b))) == errno.EINVAL, bad
    result = run("mkdir", m.path("Bad_Name"), check=False)
    assert result.returncode != 0 and b"Invalid argument" in result.stderr
    assert snapshot(root) == before
    assert ls(tags) == ["latest"] and ls(m.mountpoint) == ["library"]


async def test_read_only_mount_refuses_every_write_with_erofs(tmp_path, mount):
    """On a --read-only mount every way of writing is EROFS and the root stays as it was."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    m = mount(root, "--read-only")
    repo = m.path("library", "demo")
    before = snapshot(root)
    layer = repo / "layers" / image["layer"]
    creat = os.O_WRONLY | os.O_CREAT
    opens = [
        (repo / "uploads" / "x", creat),
        (repo / "tags" / "v2", creat),
        (repo / "tags" / "latest", os.O_WRONLY),
        (repo / "tags" / "latest", os.O_RDONLY | os.O_TRUNC),
    ]
    for path, flags in opens:
        assert open_errno(path, flags) == errno.EROFS, (path, flags)
    calls = {
        "truncate tag": lambda: os.truncate(repo / "tags" / "latest", 0),
        "rm tag": lambda: os.unlink(repo / "tags" / "latest"),
        "rm manifest": lambda: os.unlink(repo / "manifests" / image["digest"]),
        "rm layer": lambda: os.unlink(layer),
        "mv layer": lambda: os.rename(layer, repo / "uploads" / "y"),
        "mkdir": lambda: os.mkdir(m.path("newrepo")),
        "mkdir nested": lambda: os.mkdir(repo / "nested"),
    }
    for what, call in calls.items():
        assert errno_of(call) == errno.EROFS, what
    src = write_file(tmp_path / "blob", b"data")
    result = run("cp", src, repo / "uploads" / "z", check=False)
    assert result.returncode != 0 and b"Read-only file system" in result.stderr
    assert snapshot(root) == before
    assert sha256sum(layer) == image["layer"]


async def test_rm_of_tags_manifests_and_layers(tmp_path, mount):
    """`rm tags/v1` removes a tag; `rm manifests/<digest>` the manifest and every tag that
    points at it; `rm layers/<digest>` unlinks the layer while its blob data stays."""
    root, name = tmp_path / "root", "library/demo"
    image = await build_root(root, size=10_000)
    m = mount(root)
    repo = m.path("library", "demo")
    tags = repo / "tags"
    for tag in ("v1", "v2"):
        run("cp", tags / "latest", tags / tag)
    other = json.dumps({**json.loads(image["manifest"]), "annotations": {"a": "b"}}).encode()
    run("cp", write_file(tmp_path / "other.json", other), tags / "other")
    assert ls(tags) == ["latest", "other", "v1", "v2"]
    assert ls(repo / "manifests") == sorted([image["digest"], digest_of(other)])

    run("rm", tags / "v1")
    assert ls(tags) == ["latest", "other", "v2"]
    assert not (repo_path(root, name) / "_manifests" / "tags" / "v1").exists()

    run("rm", repo / "manifests" / image["digest"])
    assert ls(tags) == ["other"]
    assert ls(repo / "manifests") == [digest_of(other)]
    assert errno_of(lambda: os.stat(tags / "latest")) == errno.ENOENT

    run("rm", repo / "layers" / image["layer"])
    assert ls(repo / "layers") == [image["config"]]
    assert errno_of(lambda: os.stat(repo / "layers" / image["layer"])) == errno.ENOENT
    assert sha256sum(blob_data_path(root, image["layer"])) == image["layer"]
    assert (tags / "other").read_bytes() == other


async def test_debug_log_shows_writes_by_size_not_content(tmp_path, mount):
    """--debug logs every FUSE call; a write's buffer goes in as its size, never its bytes."""
    root = tmp_path / "root"
    m = mount(root, "--debug")
    uploads = new_repo(m, "myorg/app") / "uploads"
    data = os.urandom(MIB)
    run("cp", write_file(tmp_path / "blob", data), uploads / digest_of(data))
    log = m.log_text()
    assert "write(" in log and " bytes>" in log
    assert len(log) < len(data) // 4, f"a {len(log)}-byte log for a 1 MiB write"


# --------------------------------------------------------------------------- concurrency


async def test_a_big_write_does_not_stall_the_mount(tmp_path, mount):
    """While `dd` streams 512 MiB into uploads/, `ls` of another repository and `cat` of a
    small layer and of a tag elsewhere answer within 1 s, again and again."""
    root = tmp_path / "root"
    image = await build_root(root, size=50_000)
    m = mount(root)
    target = new_repo(m, "myorg/big") / "uploads" / "big"
    repo = m.path("library", "demo")
    small = repo / "layers" / image["layer"]
    with open(os.devnull, "wb") as sink:
        dd = subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=512", "status=none"],
            stdout=sink,
            stderr=subprocess.PIPE,
        )
    latencies = []
    deadline = time.monotonic() + 60
    try:
        wait_until(lambda: target.exists() and target.stat().st_size > 0, 10, "dd to start")
        while dd.poll() is None and time.monotonic() < deadline:
            start = time.monotonic()
            assert ls(repo) == ["layers", "manifests", "rootfs", "tags", "uploads"]
            assert run("cat", small).stdout == image["blobs"][image["layer"]]
            assert run("cat", repo / "tags" / "latest").stdout == image["manifest"]
            latencies.append(time.monotonic() - start)
        assert dd.wait(60) == 0, dd.stderr.read() if dd.stderr else ""
    finally:
        if dd.poll() is None:
            dd.kill()
            dd.wait()
        if dd.stderr:
            dd.stderr.close()
    assert len(latencies) >= 3, f"dd ended too soon to probe: {latencies}"
    # Typically ~40 ms each (three tools), and dd runs ~1.5 s: a daemon stuck in the writes
    # would push a probe past dd's end, or leave fewer than three probes.
    assert max(latencies) < 1.0, latencies
    assert os.stat(target).st_size == 512 * MIB
    run("rm", target)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """An 8 MiB tmpfs to hold a registry root: a disk that fills up. Requested before
    `mount`, so the regfs mount on it is gone before it is unmounted."""
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", disk], check=True)
    try:
        yield disk
    finally:
        # What the daemon started may close its last descriptor on it a moment after the
        # daemon: poll, then detach it lazily (no stale mount) and say who held it.
        try:
            wait_until(
                lambda: subprocess.run(["umount", disk], capture_output=True).returncode == 0,
                10,
                "the small disk to be let go",
            )
        except AssertionError:
            held = _holders(disk)
            subprocess.run(["umount", "-l", disk], check=True)
            raise AssertionError(f"{disk} stayed busy, held by {held}") from None


def _holders(disk: Path) -> list[str]:
    """The processes with a descriptor on disk: their command lines."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(str(disk)):
                found.append((fd.parent.parent / "cmdline").read_text().replace("\0", " "))
    return found


async def test_a_full_disk_fails_cp_and_leaves_the_upload_whole(small_disk, tmp_path, mount):
    """Appends are written behind the FUSE reply, so ENOSPC reaches `cp` from a later write
    or from close; the upload is cut back to what was written, the daemon lives on, and
    once space is freed the push goes through."""
    await build_root(small_disk, size=1000)
    m = mount(small_disk)
    data = os.urandom(12 * MIB)
    source = write_file(tmp_path / "big", data)
    upload = m.path("library", "demo", "uploads", "big")
    result = run("cp", source, upload, check=False)
    assert result.returncode != 0 and b"No space left on device" in result.stderr
    kept = upload.stat().st_size
    assert 0 < kept < len(data)
    assert run("cmp", "-n", str(kept), source, upload).returncode == 0  # a prefix, no hole
    assert "ENOSPC" in m.log_text() or "No space left" in m.log_text()
    # The daemon serves on, and `check` finds nothing broken in the root.
    assert "big" in ls(m.path("library", "demo", "uploads"))
    assert run(REGFS, "check", small_disk, check=False).returncode in (0, 1)
    # The upload is whole: cut it shorter, append the rest of a 4 MiB prefix, finish it.
    prefix = data[: 4 * MIB]
    run("truncate", "-s", str(2 * MIB), upload)
    bash(f"head -c {4 * MIB} {source} | tail -c +{2 * MIB + 1} >> {upload}")
    layer = m.path("library", "demo", "layers", digest_of(prefix))
    run("mv", upload, layer)
    assert sha256sum(layer) == digest_of(prefix)
