"""Which close(2) of a tag or a digest-named upload ends it (regfs/closers.py): the last one
of the process that opened it, so that its error reaches that close, while the closes of
copies (a shell's redirect, children that inherited the descriptor) end nothing. What no
close of the opener ended, the release ends. Real mounts, real tools."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.mounts import Mount, wait_until
from support.roots import build_root, variants
from support.tools import bash, digest_of, errno_of, run
from support.uploads import write_file

from regfs.closers import Close, Closers, Opener

pytestmark = pytest.mark.mount

NAME = "library/demo"
BAD = b'{"schemaVersion": 2}'  # JSON, but no media type: refused (EINVAL)


@pytest.fixture
async def image(tmp_path: Path) -> dict:
    return await build_root(tmp_path / "root", size=10_000)


@pytest.fixture
def mounted(tmp_path: Path, image: dict, mount) -> Mount:
    return mount(tmp_path / "root", "--tag-ttl", "0")


def tags_of(m: Mount) -> Path:
    return m.path(*NAME.split("/"), "tags")


def refusals(m: Mount) -> int:
    return m.log_text().count(" not stored: ")


def write_close_on_threads(path: Path, data: bytes) -> int | None:
    """Open and write on one thread, close on another (as Go does); close()'s errno."""
    fds: list[int] = []
    opener = threading.Thread(
        target=lambda: fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    )
    opener.start()
    opener.join()
    os.write(fds[0], data)
    closed: list[int | None] = []
    closer = threading.Thread(target=lambda: closed.append(errno_of(lambda: os.close(fds[0]))))
    closer.start()
    closer.join()
    return closed[0]


def python_write(path: Path, data: bytes) -> int | None:
    """Python's open/write/close; close()'s errno."""
    f = open(path, "wb")  # noqa: SIM115 (the close is what is tested)
    f.write(data)
    return errno_of(f.close)


@pytest.mark.parametrize(
    "writer", ["cp", "cat >", "cat > (forked)", "tee", "python", "threads", "printf >"]
)
@pytest.mark.parametrize("good", [True, False], ids=["good", "bad"])
async def test_the_opener_s_last_close_stores_or_fails(tmp_path, image, mounted, writer, good):
    """Each writer's close ends the tag once: a refusal reaches its close(2) (the builtin
    `printf >`: the shell ignores it, the log has it), a good manifest is stored, and no
    close of a copy (the shell's dup) refuses anything."""
    body = image["manifest"] if good else BAD
    src = write_file(tmp_path / "m.json", body)
    tag = tags_of(mounted) / "v1"
    failed: bool | None
    if writer == "python":
        failed = python_write(tag, body) == errno.EINVAL
    elif writer == "threads":
        failed = write_close_on_threads(tag, body) == errno.EINVAL
    else:
        script = {
            "cp": f"cp {src} {tag}",
            "cat >": f"cat {src} > {tag}",  # bash execs cat in its own process
            "cat > (forked)": f"cat {src} > {tag}; exit $?",  # a child opens, dups, execs
            "tee": f"tee {tag} < {src} > /dev/null",
            "printf >": f"printf %s '{body.decode()}' > {tag}",  # a builtin: the shell's own
        }[writer]
        result = bash(script, check=False)
        failed = None if writer == "printf >" else result.returncode != 0
        if failed is not None and failed == good:
            pytest.fail(f"{script}: exit {result.returncode}: {result.stderr.decode()}")
    if failed is not None:
        assert failed == (not good)
    assert refusals(mounted) == (0 if good else 1), mounted.log_text()
    assert (tag.read_bytes() == body) if good else not tag.exists()


@pytest.mark.parametrize("truncate", ["python", ": >", "true >", "cp /dev/null"])
async def test_a_tag_emptied_by_its_opener_is_refused_once(tmp_path, image, mounted, truncate):
    """An existing tag opened with O_TRUNC and closed with nothing written: the empty
    manifest is refused at the last close (EINVAL; logged once) and the tag stays."""
    tag = tags_of(mounted) / "latest"
    if truncate == "python":
        fd = os.open(tag, os.O_WRONLY | os.O_TRUNC)
        assert errno_of(lambda: os.close(fd)) == errno.EINVAL
    else:
        result = bash(f"{truncate} {tag}", check=False)
        assert (result.returncode != 0) == (truncate == "cp /dev/null"), result.stderr
    assert refusals(mounted) == 1, mounted.log_text()
    assert tag.read_bytes() == image["manifest"]


async def test_a_reader_of_the_tag_in_the_writer_s_process_ends_nothing(image, mounted):
    """A process that holds the tag open for reading while it writes it: the writer's close
    is still its last (the reader's descriptor is another handle's), and fails."""
    tag = tags_of(mounted) / "latest"
    with open(tag, "rb") as reader:
        assert reader.read() == image["manifest"]
        assert python_write(tag, BAD) == errno.EINVAL
    assert python_write(tag, variants(image, 1)[0]) is None
    assert refusals(mounted) == 1, mounted.log_text()


async def test_a_child_that_inherited_the_descriptor_ends_nothing(tmp_path, image, mounted):
    """A child that writes through an inherited descriptor and exits ends nothing; the
    opener's close then stores the whole, or fails: a refusal reaches the opener."""
    tag = tags_of(mounted) / "v1"
    whole = image["manifest"]
    half = len(whole) // 2
    for first, expected in ((BAD[:5], errno.EINVAL), (whole[:half], None)):
        rest = write_file(tmp_path / "rest", BAD[5:] if expected else whole[half:])
        fd = os.open(tag, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, first)
        child = subprocess.run(["cat", rest], stdout=fd)  # cat closes its stdout, then exits
        assert child.returncode == 0  # before: the child's close stored (or refused) half
        assert errno_of(lambda fd=fd: os.close(fd)) == expected
    assert tag.read_bytes() == whole
    assert refusals(mounted) == 1, mounted.log_text()


@pytest.mark.parametrize("section", ["tags", "uploads"])
async def test_a_descriptor_handed_to_a_child_ends_at_the_child_s_exit(
    tmp_path, image, mounted, section
):
    """`Popen(..., stdout=f)` then `f.close()` before the child is done: the parent's close
    ends nothing (its child holds the file), the child's exit ends nothing either (not the
    opener), and the release stores the whole manifest, or finishes the upload."""
    whole = image["manifest"] if section == "tags" else os.urandom(100_000)
    repo = mounted.path(*NAME.split("/"))
    path = repo / section / ("v1" if section == "tags" else digest_of(whole))
    done = path if section == "tags" else repo / "layers" / digest_of(whole)
    half = len(whole) // 2
    rest = write_file(tmp_path / "rest", whole[half:])
    with open(path, "wb") as f:
        f.write(whole[:half])
        f.flush()
        child = subprocess.Popen(["sh", "-c", f"sleep 0.5; cat {rest}"], stdout=f)
    assert child.wait() == 0  # f.close() did not raise: half was not checked
    wait_until(lambda: done.exists() and done.read_bytes() == whole, what="the release's end")
    assert refusals(mounted) == 0 and " not finished: " not in mounted.log_text()


@pytest.mark.parametrize("last", ["parent", "child"])
async def test_two_processes_writing_one_tag_the_last_to_close_wins(tmp_path, image, mounted, last):
    """Two writers of one tag in two processes: each stores at its own last close."""
    tag = tags_of(mounted) / "latest"
    mine, theirs = variants(image, 2)
    script = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)\n"
        "os.write(fd, sys.stdin.buffer.read(int(sys.argv[2])))\n"
        "print('written', flush=True)\n"
        "sys.stdin.readline()\n"
        "os.close(fd)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(tag), str(len(theirs))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(theirs)
        child.stdin.flush()
        assert child.stdout.readline() == b"written\n"
        fd = os.open(tag, os.O_WRONLY | os.O_TRUNC)  # before: EBUSY
        os.write(fd, mine)
        if last == "child":
            os.close(fd)
        child.stdin.write(b"\n")
        child.stdin.close()
        assert child.wait() == 0
        if last == "parent":
            os.close(fd)
    assert tag.read_bytes() == (mine if last == "parent" else theirs)
    assert refusals(mounted) == 0, mounted.log_text()


async def test_of_two_ends_of_one_tag_at_once_the_later_close_wins(image, mounted):
    """Two writers of a tag in one process close at once, the first with a big manifest
    (slow to check and store), the second with a small one: the ends take turns in the
    order of the closes, so the tag holds the second, as the registry's PUTs would."""
    tag = tags_of(mounted) / "latest"
    small = variants(image, 1)[0]
    big = json.dumps({**json.loads(small), "annotations": {"pad": "x" * (3 << 20)}}).encode()
    fds = [os.open(tag, os.O_WRONLY | os.O_TRUNC) for _ in range(2)]
    for fd, body in zip(fds, (big, small), strict=True):
        assert os.write(fd, body) == len(body)
    closing = threading.Event()

    def close_first() -> None:
        closing.set()
        os.close(fds[0])

    first = threading.Thread(target=close_first)
    first.start()
    closing.wait()
    time.sleep(0.005)  # its FLUSH is in, its store under way
    os.close(fds[1])
    first.join()
    assert tag.read_bytes() == small
    assert refusals(mounted) == 0, mounted.log_text()


@pytest.mark.parametrize("good", [True, False], ids=["good", "bad"])
async def test_a_digest_named_upload_ends_at_the_last_close(tmp_path, image, mounted, good):
    """`{ cat a; cat b; } > uploads/<digest>`: the first cat's close finishes nothing; the
    last close finishes the upload, or (a wrong digest) fails and leaves it for a resume.
    A `cat > uploads/<digest>` reports a wrong digest at its close."""
    repo = mounted.path(*NAME.split("/"))
    data = os.urandom(100_000)
    a, b = write_file(tmp_path / "a", data[:50_000]), write_file(tmp_path / "b", data[50_000:])
    name = digest_of(data) if good else digest_of(b"other")
    result = run("bash", "-ec", f"{{ cat {a}; cat {b}; }} > {repo / 'uploads' / name}", check=False)
    assert result.returncode == 0, result.stderr.decode()  # the shell ignores close's error
    if good:
        assert (repo / "layers" / name).read_bytes() == data
        return
    assert (repo / "uploads" / name).read_bytes() == data  # it stays, whole
    assert mounted.log_text().count(" not finished: ") == 1, mounted.log_text()
    whole = write_file(tmp_path / "whole", data)
    other = repo / "uploads" / digest_of(b"another")
    result = run("bash", "-c", f"cat {whole} > {other}; exit $?", check=False)
    assert result.returncode != 0 and b"Input/output error" in result.stderr, result.stderr


async def test_closers_tell_this_mount_s_descriptors_by_mount_and_inode(tmp_path, mounted):
    """The scan behind each ending close, asked in process: a descriptor on this mount's
    inode keeps a close from being the last; one on another filesystem's file of the same
    inode number does not (a tty's number is small too); no closer known is UNKNOWN."""
    closers = Closers(str(mounted.mountpoint))
    tag = tags_of(mounted) / "latest"
    local = write_file(tmp_path / "local", b"x")
    me, thread = os.getpid(), threading.get_native_id()

    async def close_with(path: Path, mode: str = "r+b") -> Close:
        with open(path, mode) as held:
            return await closers.close_of(Opener(me, os.fstat(held.fileno()).st_ino), thread, {})

    assert await close_with(tag) is Close.NOT_LAST
    assert await close_with(tag, "rb") is Close.LAST  # a reader's is no copy of a writer's
    assert await close_with(local) is Close.LAST  # its inode, another mount
    assert await closers.close_of(Opener(0, 1), thread, {}) is Close.UNKNOWN
    assert await closers.close_of(Opener(me, 1), 0, {}) is Close.UNKNOWN
    with open(tag, "r+b") as held:  # the process's other handle of the inode holds it
        inode = os.fstat(held.fileno()).st_ino
        assert await closers.close_of(Opener(me, inode), thread, {me: 1}) is Close.LAST
    seen: list[int] = []
    other = threading.Thread(target=lambda: seen.append(closers.thread_group(thread)))
    other.start()
    other.join()
    assert seen == [me]
