"""The `regfs` command line, run as users run it: mount, umount, signals, options, help.

Mounts made with odd command lines (no source, --foreground, over a dead mount) are
registered with `tracked` (conftest.py), which unmounts them at teardown like `mount` does.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.mounts import REGFS, Mount, daemon_pids, is_mounted, regfs, wait_until
from support.roots import build_root
from support.tools import (
    ls,
    run,
)

from regfs.cli import build_parser, child_command, mount_options
from regfs.options import DEFAULT_INDEX_CACHE_SIZE, MountOptions
from regfs.readahead import bdi_setting

pytestmark = pytest.mark.mount


def mount_lines(mountpoint: Path) -> list[str]:
    target = os.fsencode(os.path.abspath(mountpoint)).replace(b" ", b"\\040")
    with open("/proc/mounts", "rb") as f:
        return [line.decode() for line in f if line.split()[1] == target]


def regfs_processes_naming(path: Path) -> list[str]:
    """Command lines of any process with path among its arguments (a daemon left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if os.fsencode(path) in args:
                found.append(b" ".join(args).decode(errors="replace"))
    return found


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return 0


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, waiting for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@pytest.fixture
async def root(tmp_path) -> Path:
    await build_root(tmp_path / "root", size=10_000)
    return tmp_path / "root"


# --------------------------------------------------------------------------- mount, umount


async def test_background_mount_returns_ready_and_umount_waits(root, tmp_path, tracked):
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    m = tracked(mnt, log)
    result = regfs("mount", "--log", str(log), str(root), str(mnt))
    assert result.returncode == 0, result.stderr
    # Ready when it returns: mounted, and a listing (served by the daemon) works at once.
    assert is_mounted(mnt)
    assert os.listdir(mnt) == ["library"]
    (pid,) = m.pids()

    result = regfs("umount", str(mnt))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert daemon_pids(mnt) == [], "regfs umount returned before the daemon exited"
    assert process_gone(pid), "the daemon process is still there"
    assert "unmounted" in log.read_text()


async def test_mount_on_missing_mountpoint_fails_clearly(root, tmp_path):
    missing = tmp_path / "nope"
    result = regfs("mount", "--log", str(tmp_path / "regfs.log"), str(root), str(missing))
    assert result.returncode != 0
    assert f"mountpoint {missing} does not exist" in result.stderr
    assert not missing.exists() and not mount_lines(missing)
    assert regfs_processes_naming(missing) == []


async def test_mount_on_busy_mountpoint_fails_clearly(root, tmp_path, mount):
    m = mount(root)
    (pid,) = m.pids()
    result = regfs("mount", "--log", str(tmp_path / "second.log"), str(root), str(m.mountpoint))
    assert result.returncode != 0
    assert "busy" in result.stderr and str(m.mountpoint) in result.stderr, result.stderr
    assert len(mount_lines(m.mountpoint)) == 1
    assert m.pids() == [pid]
    assert os.listdir(m.mountpoint) == ["library"]  # the first mount is untouched


def test_umount_of_unmounted_dir_fails_clearly(tmp_path):
    (tmp_path / "plain").mkdir()
    result = regfs("umount", str(tmp_path / "plain"))
    assert result.returncode != 0
    assert "is not mounted" in result.stderr and str(tmp_path / "plain") in result.stderr


# --------------------------------------------------------------------------- signals


async def test_sigterm_unmounts_cleanly(root, mount):
    m = mount(root)
    assert os.listdir(m.mountpoint) == ["library"]
    (pid,) = m.pids()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not m.pids(), 10, "the daemon to exit after SIGTERM")
    assert not is_mounted(m.mountpoint), "SIGTERM left a stale mount"
    assert os.listdir(m.mountpoint) == []  # the plain directory again
    log = m.log_text()
    assert "SIGTERM: unmounting" in log and "unmounted" in log


def spin_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until without the pause between polls: for windows of a few milliseconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_sigterm_right_after_the_mount_appears_unmounts(root, tmp_path, tracked):
    """SIGTERM in the first milliseconds of the mount, before the main loop runs, still
    unmounts (it used to kill the daemon and leave a dead mount, most of the time)."""
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    with subprocess.Popen(
        [REGFS, "mount", "--log", str(log), str(root), str(mnt)], stderr=subprocess.PIPE
    ) as parent:  # closes the pipe at the end
        try:
            pids: list[int] = []
            spin_until(lambda: bool(pids.extend(daemon_pids(mnt)) or pids), 20, "the daemon")
            spin_until(lambda: is_mounted(mnt), 20, "the mount")
            os.kill(pids[0], signal.SIGTERM)
            parent.wait(timeout=30)
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()
    wait_until(lambda: process_gone(pids[0]), 10, "the daemon to exit")
    assert not is_mounted(mnt), "SIGTERM during start-up left a dead mount"
    assert "SIGTERM: unmounting" in log.read_text()


async def test_sigkill_leaves_dead_mount_and_remount_cleans_it(root, mount):
    m = mount(root)
    (pid,) = m.pids()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not m.pids(), 10, "the killed daemon to go")
    # A request caught in flight by the abort fails with ECONNABORTED; every later one with
    # ENOTCONN, "Transport endpoint is not connected".
    wait_until(lambda: stat_errno(m.mountpoint) == errno.ENOTCONN, 10, "ENOTCONN on the dead mount")
    assert is_mounted(m.mountpoint)

    m.start()  # the same `regfs mount` command line, on the dead mount
    assert os.listdir(m.mountpoint) == ["library"]
    assert len(mount_lines(m.mountpoint)) == 1, "the dead mount is still stacked underneath"
    assert len(m.pids()) == 1
    assert re.search(r"WARNING .*dead FUSE mount", m.log_text()), m.log_text()


async def test_foreground_ctrl_c_unmounts_and_exits_0(root, tmp_path, tracked):
    mnt, err_file = tmp_path / "mnt", tmp_path / "stderr"
    mnt.mkdir()
    tracked(mnt, err_file)
    with open(err_file, "wb") as err:
        proc = subprocess.Popen(
            [REGFS, "mount", "--foreground", str(root), str(mnt)],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    try:
        wait_until(lambda: is_mounted(mnt), 20, "the foreground mount")
        # A listing is answered only once the main loop runs, i.e. Ctrl-C is handled.
        assert ls(mnt) == ["library"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, err_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not is_mounted(mnt)
    text = err_file.read_text()  # without --log, the foreground daemon logs to stderr
    assert "SIGINT: unmounting" in text and "Traceback" not in text, text


# --------------------------------------------------------------------------- options


def test_unknown_source_scheme_names_supported_sources(tmp_path):
    (tmp_path / "mnt").mkdir()
    result = regfs("mount", "--log", str(tmp_path / "l"), "ftp://x", str(tmp_path / "mnt"))
    assert result.returncode != 0
    assert "ftp://x" in result.stderr
    assert "storage root directory" in result.stderr and "inmemory:" in result.stderr
    assert not is_mounted(tmp_path / "mnt")
    assert regfs_processes_naming(tmp_path / "mnt") == []


def test_a_registry_host_is_not_made_a_root(tmp_path, monkeypatch, tracked):
    """`regfs mount ghcr.io MNT` is refused with the URL to write, and makes nothing; an
    existing directory of that name, or `./ghcr.io`, is a storage root as ever."""
    monkeypatch.chdir(tmp_path)
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    result = regfs("mount", "--log", str(log), "ghcr.io", str(mnt))
    assert result.returncode == 2
    assert "'ghcr.io' is not a directory" in result.stderr
    assert "say https://ghcr.io (or ./ghcr.io" in result.stderr
    assert not (tmp_path / "ghcr.io").exists() and not is_mounted(mnt)
    result = regfs("mount", "--log", str(log), "./ghcr.io", str(mnt))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ghcr.io").is_dir() and is_mounted(mnt)


async def test_o_options_ro_uid_file_mode(root, mount):
    m = mount(root, "-o", "ro,uid=1234,file_mode=0600")
    layers = m.path("library", "demo", "layers")
    (layer,) = [d for d in os.listdir(layers) if os.stat(layers / d).st_size == 10_000]
    st = os.stat(layers / layer)
    assert (st.st_uid, st.st_mode & 0o7777) == (1234, 0o600)
    assert os.stat(m.path("library")).st_uid == 1234
    assert os.stat(m.path("library")).st_mode & 0o7777 == 0o755
    with pytest.raises(OSError) as err:
        os.open(layers / layer, os.O_WRONLY)
    assert err.value.errno == errno.EROFS
    assert "ro" in mount_lines(m.mountpoint)[0].split()[3].split(",")
    # Root reads regardless of the mode (the kernel checks modes: default_permissions).
    assert run("sha256sum", layers / layer).stdout.decode().split()[0] in layer


async def test_bogus_o_option_fails_clearly(root, tmp_path):
    (tmp_path / "mnt").mkdir()
    result = regfs("mount", "-o", "bogus", str(root), str(tmp_path / "mnt"))
    assert result.returncode != 0
    assert "unknown mount option 'bogus'" in result.stderr and "known:" in result.stderr
    assert not is_mounted(tmp_path / "mnt")


def parsed_mount(*args: str) -> MountOptions:
    """The options `regfs mount ARGS` would mount with, parsed in-process."""
    return mount_options(build_parser().parse_args(["mount", *args]))


@pytest.mark.parametrize(
    "args",
    [
        ["--s3-endpoint", "http://127.0.0.1:9000/", "--index-cache-size", "512M"],
        ["-o", "ro,s3_endpoint=http://127.0.0.1:9000/,index_cache_size=536870912"],
        ["-o", "s3_endpoint=http://127.0.0.1:9000/", "-o", "index_cache_size=0.5GiB"],
    ],
    ids=["flags", "o", "o-twice"],
)
def test_s3_endpoint_and_index_cache_size_reach_the_daemon(args):
    options = parsed_mount(*args, "s3://bucket/prefix", "/mnt")
    assert options.s3_endpoint == "http://127.0.0.1:9000/"
    assert options.index_cache_size == 512 << 20
    # The background daemon is started with every option spelled out: it parses the same.
    command = child_command(options, 5, None)
    assert command[3:5] == ["regfs", "mount"]
    daemon = mount_options(build_parser().parse_args(command[4:]))
    assert daemon.log_file is not None
    assert daemon == dataclasses.replace(options, log_file=daemon.log_file)


def test_index_cache_size_defaults_to_1_gib_and_takes_binary_units():
    assert parsed_mount("inmemory:", "/mnt").index_cache_size == DEFAULT_INDEX_CACHE_SIZE == 1 << 30
    assert parsed_mount("inmemory:", "/mnt").s3_endpoint is None
    for text, size in (("2G", 2 << 30), ("64k", 64 << 10), ("1T", 1 << 40), ("100", 100)):
        assert (
            parsed_mount("--index-cache-size", text, "inmemory:", "/mnt").index_cache_size == size
        )


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("index_cache_size", "lots", "bad size 'lots' (e.g. 512M, 2G or a number of bytes)"),
        ("index_cache_size", "0", "bad size '0'"),
        ("index_cache_size", "-5M", "bad size '-5M'"),
        ("index_cache_size", "3X", "bad size '3X'"),
        ("s3_endpoint", "minio:9000", "bad S3 endpoint 'minio:9000' (an http:// or https:// URL"),
        ("s3_endpoint", "ftp://h", "bad S3 endpoint 'ftp://h'"),
        ("s3_endpoint", "http://h:99999", "bad S3 endpoint 'http://h:99999'"),
    ],
)
def test_bad_s3_endpoint_or_index_cache_size_is_refused(tmp_path, option, value, words):
    """Both spellings refuse with the same words, name the option, mount nothing."""
    (tmp_path / "mnt").mkdir()
    flag = "--" + option.replace("_", "-")
    for args in ([f"{flag}={value}"], ["-o", f"{option}={value}"]):
        result = regfs(
            "mount", "--log", str(tmp_path / "l"), *args, "inmemory:", str(tmp_path / "mnt")
        )
        assert result.returncode == 2, (args, result.stderr)
        assert words in result.stderr, result.stderr
        assert (flag if args[0] != "-o" else f"-o {option}") in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not is_mounted(tmp_path / "mnt") and not (tmp_path / "l").exists()


def test_help_mentions_mountpoint():
    for args in (["--help"], ["mount", "--help"], ["umount", "--help"]):
        result = regfs(*args)
        assert result.returncode == 0, args
        assert "MOUNTPOINT" in result.stdout, (args, result.stdout)
    assert "SOURCE" in regfs("mount", "--help").stdout


def test_default_source_under_user_data_dir(tmp_path, monkeypatch, tracked):
    """`regfs mount MOUNTPOINT` alone mounts (and creates) a root under XDG_DATA_HOME."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default_root = tmp_path / "data" / "regfs" / "registry"
    help_text = "".join(regfs("mount", "--help").stdout.split())  # undo argparse's wrapping
    assert str(default_root) in help_text
    mnt, log = tmp_path / "mnt", tmp_path / "regfs.log"
    mnt.mkdir()
    tracked(mnt, log)
    result = regfs("mount", "--log", str(log), str(mnt))
    assert result.returncode == 0, result.stderr
    assert default_root.is_dir()
    assert os.listdir(mnt) == []
    assert mount_lines(mnt)[0].split()[:3] == [str(default_root), str(mnt), "fuse.regfs"]


# --------------------------------------------------------------------------- --debug


async def test_debug_logs_each_operation(root, mount):
    quiet = mount(root)
    loud = mount(root, "--debug")
    for m in (quiet, loud):
        layers = m.path("library", "demo", "layers")
        for name in os.listdir(layers):
            run("cat", layers / name)
    text = loud.log_text()
    for op in ("lookup", "getattr", "opendir", "readdir", "open", "read", "release"):
        assert re.search(rf" DEBUG regfs\.ops\.\w+: {op}\(", text), op
    assert " DEBUG " not in quiet.log_text()


# --------------------------------------------------------------------------- read-ahead


def read_ahead_kb(mountpoint: Path) -> int:
    """The kernel's read-ahead of the filesystem mounted there (its backing device in sysfs)."""
    return int(bdi_setting(os.stat(mountpoint).st_dev).read_text())


def fuse_read_sizes(m: Mount) -> list[int]:
    return [int(n) for n in re.findall(r" read\(\d+, \d+, (\d+)\)", m.log_text())]


# With 128 KiB set by us, the kernel's async window still reaches 256 KiB pieces.
@pytest.mark.parametrize(
    ("args", "kib", "largest"), [((), 1024, 1024), (("-o", "read_ahead_kb=128"), 128, 256)]
)
async def test_read_ahead_sets_how_big_fuse_reads_arrive(tmp_path, mount, args, kib, largest):
    """The kernel gives a FUSE mount 128 KiB of read-ahead and sends reads no bigger; the
    daemon raises it before it reports ready, and a sequential read then arrives in pieces
    up to 1 MiB (each piece is one round trip through the daemon) after a short ramp."""
    layer = (await build_root(tmp_path / "root", size=8 << 20))["layer"]
    m = mount(tmp_path / "root", "--debug", *args)
    assert read_ahead_kb(m.mountpoint) == kib
    path = m.path("library", "demo", "layers", layer)
    assert run("sha256sum", path).stdout.decode().split()[0] == layer.split(":")[1]
    sizes = fuse_read_sizes(m)
    assert max(sizes) == largest << 10 and sum(sizes) >= 8 << 20
    assert len(sizes) <= (8 << 20) // (largest << 10) + 4, sizes  # the ramp: 128K, 256K…


async def test_bad_read_ahead_fails_clearly(root, tmp_path):
    (tmp_path / "mnt").mkdir()
    for args in (["-o", "read_ahead_kb=lots"], ["--read-ahead-kb", "-1"]):
        result = regfs("mount", *args, str(root), str(tmp_path / "mnt"))
        assert result.returncode != 0, args
        assert "read_ahead_kb" in result.stderr or "read-ahead-kb" in result.stderr, result.stderr
        assert not is_mounted(tmp_path / "mnt")


# --------------------------------------------------------------------------- clear refusals


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_text("x"), "is not a directory"),
        (lambda p: (p.mkdir(), (p / "passwd").write_text("root:x:0:0\n")), "not a registry"),
    ],
    ids=["file", "other-directory"],
)
def test_a_source_that_is_no_storage_root_is_refused(tmp_path, make, words):
    """`regfs mount /etc MNT` mounted an empty, writable registry over nothing of /etc;
    a file as SOURCE ended in a traceback. Both are one line and exit 2; nothing changes."""
    source = tmp_path / "source"
    make(source)
    (tmp_path / "mnt").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = regfs("mount", "--log", str(tmp_path / "log"), str(source), str(tmp_path / "mnt"))
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not is_mounted(tmp_path / "mnt")
    for command in ("check", "purge-uploads"):
        extra = ["--older-than", "1h"] if command == "purge-uploads" else []
        checked = regfs(command, str(source), *extra)
        assert checked.returncode == 2 and words in checked.stderr, checked.stderr
        assert "Traceback" not in checked.stderr
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name != "log") == before


async def test_init_makes_any_directory_a_root(tmp_path, mount):
    source = tmp_path / "volume"
    source.mkdir()
    (source / "lost+found").mkdir()
    mount(source)  # a fresh volume is a new root without asking
    (source / "README").write_text("mine\n")
    m = mount(source, "--init")
    (m.path("org/app")).mkdir(parents=True)
    assert (source / "docker/registry/v2/repositories/org/app").is_dir()
    assert (source / "README").read_text() == "mine\n"
    checked = regfs("check", str(source))  # the registry's tree only: not README, lost+found
    assert checked.returncode == 0 and checked.stdout == "", checked.stdout + checked.stderr


def test_fusermount_words_reach_the_user(tmp_path):
    """libfuse and fusermount3 say why a mount failed on stderr, which is a background
    daemon's log: the user saw only "fuse_session_mount failed". In a user namespace
    without a mount namespace, fusermount3 cannot mount and says so."""
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            REGFS,
            "mount",
            "--log",
            str(tmp_path / "log"),
            "inmemory:",
            str(tmp_path / "mnt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "fuse_session_mount failed: fusermount3: mount failed" in result.stderr, result.stderr
    assert not is_mounted(tmp_path / "mnt")
