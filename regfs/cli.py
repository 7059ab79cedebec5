"""The `regfs` command line: mount, umount, check, purge-uploads, and mount(8)'s helper.

`regfs mount` starts the daemon as a child process in a new session and returns once the
child reports, through a pipe, that the mount is up (or why it is not). The parser here is
the one source of `--help`, the man page (regfs/manpage.py) and bash completion (shtab).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import version
from typing import TypeVar

import platformdirs
import shtab

from storage.errors import StorageError

from .logs import default_log_file, open_log, setup_logging
from .mounthelper import HELPER_NAMES, is_fuse_call, mount_arguments
from .mountpoint import (
    MountError,
    daemon_pids,
    exited,
    force_unmount,
    mounted_filesystem,
    prepare,
)
from .options import (
    DEFAULT_READ_AHEAD_KB,
    DEFAULT_TAG_TTL,
    MountOptions,
    OptionValueError,
    apply_o_options,
    byte_size,
    endpoint_url,
    kibibytes,
)
from .sources import (
    SUPPORTED,
    check_source,
    is_remote,
    open_registry,
    refuse_host_like,
    split_login,
)

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
UMOUNT_TIMEOUT = 30.0
COMMANDS = frozenset({"mount", "umount", "check", "purge-uploads"})
PASSWORD_FILE_MAX = 4096


def default_source() -> str:
    return str(platformdirs.user_data_path("regfs") / "registry")


def _octal(text: str) -> int:
    return int(text, 8)


T = TypeVar("T")


def _completes(action: argparse.Action, what: dict[str, str | dict[str, str]]) -> None:
    """What bash completes for action's value (shtab.FILE, shtab.DIRECTORY)."""
    action.complete = what  # type: ignore[attr-defined]  # an attribute shtab reads


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """parse as an argparse type whose OptionValueError message reaches the user as it is
    (argparse shows only "invalid VALUE" for a plain ValueError)."""

    def typed(text: str) -> T:
        try:
            return parse(text)
        except OptionValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    typed.__name__ = parse.__name__
    return typed


ROOT_HELP = "the registry's storage root directory, or s3://BUCKET[/PREFIX]"


def _s3_endpoint(group: argparse._ActionsContainer) -> None:
    """--s3-endpoint, where a bucket may be the source: mount, check, purge-uploads."""
    group.add_argument(
        "--s3-endpoint",
        type=_argument(endpoint_url),
        metavar="URL",
        help="an S3-compatible server (MinIO, Ceph…) instead of AWS, e.g. http://127.0.0.1:9000",
    )


class _PrintManPage(argparse.Action):
    """`--print-man-page`: regfs(1) where no `make install` wrote it (a pip install), from
    the interpreter regfs runs on, as `--print-completion` prints the completion."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from .manpage import build_date, manpage  # it imports this module for build_parser

        sys.stdout.write(manpage(parser, build_date()))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regfs", description="A Linux filesystem view of a container registry."
    )
    parser.add_argument("--version", action="version", version=f"regfs {version('regfs')}")
    shtab.add_argument_to(
        parser, "--print-completion", help="print a completion script for that shell"
    )
    parser.add_argument("--print-man-page", action=_PrintManPage, help="print regfs(1) (roff)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount a registry: regfs mount [SOURCE] MOUNTPOINT",
        description=(
            "Mount a registry on MOUNTPOINT and return once the mount is ready; the daemon "
            f"goes on in the background. SOURCE is {SUPPORTED}; without it, "
            f"{default_source()} is used. Background daemons log to {default_log_file()} "
            "unless --log says otherwise."
        ),
    )
    _completes(
        mount.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT"), shtab.DIRECTORY
    )
    mount.add_argument(
        "-f", "--foreground", action="store_true", help="stay attached; Ctrl-C unmounts"
    )
    mount.add_argument("-r", "--read-only", action="store_true", help="refuse every write")
    mount.add_argument(
        "--init",
        action="store_true",
        help="make SOURCE a storage root even though it holds other files",
    )
    mount.add_argument("-d", "--debug", action="store_true", help="log each FUSE operation")
    mount.add_argument(
        "--plain-readdir",
        action="store_true",
        help="after a listing's first part, send names only unless its files are being "
        "stat'ed: a plain ls of 10,000 tags a few percent faster, a first find in rootfs/ "
        "about 15%% slower (its subdirectories looked up one by one)",
    )
    _completes(mount.add_argument("--log", metavar="FILE", help="log to FILE"), shtab.FILE)
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users see the mount (needs user_allow_other for non-root)",
    )
    mount.add_argument("--uid", type=int, help="owner of every file (default: you)")
    mount.add_argument("--gid", type=int, help="group of every file (default: yours)")
    mount.add_argument("--file-mode", type=_octal, metavar="MODE", help="default 644")
    mount.add_argument("--dir-mode", type=_octal, metavar="MODE", help="default 755")
    mount.add_argument(
        "--tag-ttl",
        type=float,
        metavar="SECONDS",
        help=f"how long tags and listings are cached (default {DEFAULT_TAG_TTL})",
    )
    mount.add_argument(
        "--read-ahead-kb",
        type=kibibytes,
        metavar="KIB",
        help=f"the kernel's read-ahead for the mount, as root (default {DEFAULT_READ_AHEAD_KB})",
    )
    mount.add_argument(
        "--index-cache-size",
        type=_argument(byte_size),
        metavar="SIZE",
        help="bound of the on-disk cache of layer indexes for rootfs/, e.g. 512M, 2G (default 1G)",
    )
    mount.add_argument(
        "-o",
        dest="o_options",
        action="append",
        default=[],
        metavar="OPTS",
        help="mount options: ro, allow_other, uid=, gid=, file_mode=, dir_mode=, "
        "tag_ttl=, read_ahead_kb=, index_cache_size=, log=, debug, init, plain_readdir; remote: "
        "insecure, "
        "ca_file=, username=, password_file=, timeout= (seconds a registry may take to "
        "answer, 30); s3: s3_endpoint=",
    )
    remote = mount.add_argument_group("remote registries (SOURCE is https://HOST[:PORT])")
    remote.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain http:// and unverified TLS (self-signed certificates)",
    )
    remote.add_argument("--ca-file", metavar="FILE", help="trust the CA certificates in FILE")
    remote.add_argument(
        "--username", metavar="USER", help="log in as USER (default: ~/.docker/config.json auths)"
    )
    remote.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    _completes(
        remote.add_argument(
            "--password-file",
            metavar="FILE",
            help="read the password from FILE, which must be yours or root's and closed to "
            "others (chmod 600): for fstab lines",
        ),
        shtab.FILE,
    )
    _s3_endpoint(mount.add_argument_group("S3 buckets (SOURCE is s3://BUCKET[/PREFIX])"))
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--password-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)  # mount -f

    umount = commands.add_parser(
        "umount",
        help="unmount: regfs umount MOUNTPOINT",
        description="Unmount and wait until the daemon has gone.",
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")

    check = commands.add_parser(
        "check",
        help="check a registry root (changes nothing)",
        description=(
            "Report dangling and corrupt links, tags pointing at missing manifests, broken "
            "and stale uploads, unlinked blobs and, with --verify, blobs whose content does "
            "not match their digest. Exit status: 0 clean (or only `reclaimable` leftovers of "
            "the registry's own deletes); 1 only what garbage collection or "
            "purge-uploads would remove; 2 damage."
        ),
    )
    _completes(check.add_argument("root", help=ROOT_HELP), shtab.DIRECTORY)
    check.add_argument("--verify", action="store_true", help="hash every blob")
    _s3_endpoint(check)
    check.add_argument(
        "--upload-age",
        type=parse_duration,
        metavar="DURATION",
        help="an upload older than this is stale (default: the registry's 168h)",
    )

    purge = commands.add_parser(
        "purge-uploads",
        help="delete stale uploads",
        description="Delete uploads started longer ago than --older-than, as the registry's "
        "upload purger does (uploads without a start time are left alone).",
    )
    _completes(purge.add_argument("root", help=ROOT_HELP), shtab.DIRECTORY)
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="DURATION",
        help="e.g. 168h, 7d, 1h30m",
    )
    purge.add_argument("-n", "--dry-run", action="store_true", help="only list them")
    _s3_endpoint(purge)
    return parser


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """Go-style durations (168h, 1h30m, 45s) plus days (7d)."""
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[dhms])+", text.strip())
    if parts is None:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 168h, 7d, 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([dhms])", text))
    return timedelta(seconds=seconds)


def mount_options(args: argparse.Namespace) -> MountOptions:
    if len(args.paths) > 2:
        raise MountError("expected [SOURCE] MOUNTPOINT")
    source = args.paths[0] if len(args.paths) == 2 else default_source()
    if "://" not in source and source != "inmemory:" and ":" not in source.split("/")[0]:
        refuse_host_like(source)
        source = os.path.abspath(source)
    source, user, password = split_login(source)
    if password is not None and not args.password_stdin:
        print(
            "regfs: warning: a password in the source URL is visible to other users while "
            "this command runs; prefer --password-stdin",
            file=sys.stderr,
        )
    options = MountOptions(source=source, mountpoint=os.path.abspath(args.paths[-1]))
    options.username, options.password = user, password
    for text in args.o_options:
        apply_o_options(options, text)
    flags = {
        "read_only": args.read_only,
        "allow_other": args.allow_other,
        "debug": args.debug,
        "init": args.init,
        "plain_readdir": args.plain_readdir,
    }
    for name, value in flags.items():
        if value:
            setattr(options, name, True)
    if args.insecure:
        options.insecure = True
    if args.password_file is not None:
        options.password_file = args.password_file
    if options.password_file is not None:
        if options.username is None and args.username is None:
            raise MountError("a password file needs a user name: username=USER or --username")
        options.password_file = os.path.abspath(options.password_file)
        options.password = read_password_file(options.password_file)
    if args.password_stdin:
        options.password = sys.stdin.readline().rstrip("\n")
    elif args.password_fd is not None:
        with os.fdopen(args.password_fd) as secret:  # from the parent: never in argv or env
            options.password = secret.read()
    values = {
        "ca_file": args.ca_file,
        "username": args.username,
        "log_file": args.log,
        "uid": args.uid,
        "gid": args.gid,
        "tag_ttl": args.tag_ttl,
        "read_ahead_kb": args.read_ahead_kb,
        "file_mode": args.file_mode,
        "dir_mode": args.dir_mode,
        "s3_endpoint": args.s3_endpoint,
        "index_cache_size": args.index_cache_size,
    }
    for name, value in values.items():
        if value is not None:
            setattr(options, name, value)
    # The daemon starts in /: a relative path would name another file there.
    if options.log_file:
        options.log_file = os.path.abspath(options.log_file)
    if options.ca_file:
        options.ca_file = os.path.abspath(options.ca_file)
    return options


def read_password_file(path: str) -> str:
    """The first line of a private file: yours or root's, closed to group and others.

    Checked on the opened file, so nothing swapped in between the check and the read counts;
    O_NONBLOCK so that a FIFO is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise MountError(f"password file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MountError(f"password file {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise MountError(
                f"password file {path} belongs to uid {st.st_uid}: it must be root's or yours"
            )
        if st.st_mode & 0o077:
            raise MountError(
                f"password file {path} is open to others (mode {st.st_mode & 0o777:03o}): "
                f"chmod 600 {path}"
            )
        data = f.read(PASSWORD_FILE_MAX + 1)
    if len(data) > PASSWORD_FILE_MAX:
        raise MountError(f"password file {path} is longer than {PASSWORD_FILE_MAX} bytes")
    password = data.decode(errors="replace").split("\n", 1)[0].rstrip("\r")
    if not password:
        raise MountError(f"password file {path} holds no password on its first line")
    return password


def child_command(options: MountOptions, ready_fd: int, password_fd: int | None) -> list[str]:
    """The daemon's command line: every option spelled out, the mountpoint last.

    `-P`: `python -m` would otherwise put the working directory first on sys.path, and a
    `regfs/` planted there (say in /tmp) would run as the caller, usually root."""
    command = [
        sys.executable,
        "-P",
        "-m",
        "regfs",
        "mount",
        "--foreground",
        "--ready-fd",
        str(ready_fd),
        "--log",
        options.log_file or str(default_log_file()),
        "--uid",
        str(options.uid),
        "--gid",
        str(options.gid),
        "--file-mode",
        f"{options.file_mode:o}",
        "--dir-mode",
        f"{options.dir_mode:o}",
        "--tag-ttl",
        str(options.tag_ttl),
        "--read-ahead-kb",
        str(options.read_ahead_kb),
        "--index-cache-size",
        str(options.index_cache_size),
    ]
    for flag, on in (
        ("--read-only", options.read_only),
        ("--allow-other", options.allow_other),
        ("--debug", options.debug),
        ("--insecure", options.insecure),
        ("--init", options.init),
        ("--plain-readdir", options.plain_readdir),
    ):
        if on:
            command.append(flag)
    for flag, value in (
        ("--ca-file", options.ca_file),
        ("--username", options.username),
        ("--s3-endpoint", options.s3_endpoint),
        ("--password-fd", password_fd),
    ):
        if value is not None:
            command += [flag, str(value)]
    if options.timeout is not None:
        command += ["-o", f"timeout={options.timeout}"]
    return [*command, options.source, options.mountpoint]


def mount_background(options: MountOptions) -> int:
    read_end, write_end = os.pipe()
    fds = [write_end]
    secret_fd = None
    if options.password is not None:
        secret_fd, secret_write = os.pipe()
        os.write(secret_write, options.password.encode())  # a pipe holds far more than this
        os.close(secret_write)
        fds.append(secret_fd)
    log_file = options.log_file or str(default_log_file())
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    with os.fdopen(open_log(log_file), "ab") as log_out:
        child = subprocess.Popen(
            child_command(options, write_end, secret_fd),
            pass_fds=tuple(fds),
            start_new_session=True,
            cwd="/",  # nothing of the caller's directory is searched, or kept busy
            stdin=subprocess.DEVNULL,
            stdout=log_out,
            stderr=log_out,
        )
    for fd in fds:
        os.close(fd)
    message = _read_ready(read_end, child)
    os.close(read_end)
    if message == "ok":
        return 0
    if child.poll() is None:
        child.kill()
        child.wait()
    print(f"regfs: mount failed: {message} (log: {log_file})", file=sys.stderr)
    return 1


def _read_ready(fd: int, child: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"the daemon was not ready after {READY_TIMEOUT:.0f} s"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = child.wait()
                return f"the daemon exited with status {code} before the mount was ready"
            data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def mount_foreground(options: MountOptions, ready_fd: int | None) -> int:
    setup_logging(options.debug, options.log_file)

    reported = False

    def report(message: str) -> None:
        nonlocal reported
        if ready_fd is not None and not reported:  # a failure after ready has nobody to tell
            reported = True
            os.write(ready_fd, message.encode() + b"\n")
            os.close(ready_fd)

    try:
        prepare(options.mountpoint)
        check_source(options)
        from . import daemon  # the daemon's imports, in the daemon only

        daemon.serve(options, lambda: report("ok"))
    except (MountError, ValueError, OSError, RuntimeError, StorageError) as exc:
        log.error("mount: %s", exc)
        report(str(exc))
        if ready_fd is None:
            print(f"regfs: mount failed: {exc}", file=sys.stderr)
        return 1
    return 0


def umount(mountpoint: str) -> int:
    path = os.path.abspath(mountpoint)
    if mounted_filesystem(path) is None:
        print(f"regfs: {path} is not mounted", file=sys.stderr)
        return 1
    pids = daemon_pids(path)
    result = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True)
    if result.returncode != 0:
        if "not connected" not in result.stderr and "Transport endpoint" not in result.stderr:
            print(f"regfs: cannot unmount {path}: {result.stderr.strip()}", file=sys.stderr)
            return 1
        force_unmount(path)  # a dead mount: its daemon is gone already
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while not all(map(exited, pids)):
        if time.monotonic() > deadline:
            print(f"regfs: the daemon of {path} did not exit (pids {pids})", file=sys.stderr)
            return 1
        time.sleep(0.01)  # the daemon is usually gone within 10 ms of the unmount
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        # mount(8) runs the helper by its name; fuse3's mount.fuse runs `regfs SRC MNT -o O`.
        if os.path.basename(sys.argv[0]) in HELPER_NAMES or is_fuse_call(argv, COMMANDS):
            argv = mount_arguments(argv)
    args = build_parser().parse_args(argv)
    if args.command == "umount":
        return umount(args.mountpoint)
    if args.command in ("check", "purge-uploads"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        try:
            # Imported here: storage.check, trio and tqdm are most of what `regfs umount`
            # and the parent of `regfs mount` would otherwise load for nothing.
            from . import maintenance

            run = maintenance.run_check if args.command == "check" else maintenance.run_purge
            return run(args)
        except MountError as exc:
            print(f"regfs {args.command}: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # damage no check foresaw: one line and 2, never a traceback
            print(f"regfs {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
    try:
        options = mount_options(args)
        if args.fake:
            return 0
        if args.foreground:
            return mount_foreground(options, args.ready_fd)
        # Into the daemon's log: prepare() may clean up a dead mount, and says so.
        setup_logging(options.debug, options.log_file or str(default_log_file()))
        prepare(options.mountpoint)
        if not is_remote(options.source):
            open_registry(options)  # a root that cannot be made fails here, clearly
    except (MountError, ValueError, OSError) as exc:
        print(f"regfs: mount failed: {exc}", file=sys.stderr)
        return 2
    return mount_background(options)
