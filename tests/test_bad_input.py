"""Bad input, table-driven, through real mounts (issue 7).

Each row is one thing a user (or a damaged storage root) can do wrong: a real syscall or tool
through the mount, the errno it must end in (None: success), and what the storage root may
change. A whole group runs through one `regfs mount` (a mount per row would be slow). For
each row the runner checks the errno, that the root is unchanged (every path, every file's
sha256; a row that legitimately changes something names the prefixes it may touch, and its
cleanup must bring the root back), and that any expected log line appeared. After each table
the daemon must still be mounted and serving a known layer byte for byte.

Rows run in a thread with a deadline, so a daemon that hangs fails the row instead of the
whole run; teardown then aborts the mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.mounts import Mount, is_mounted
from support.registry import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
)
from support.roots import build_root, link_blobs
from support.snapshots import lstat_snapshot
from support.tools import (
    C_LOCALE,
    MIB,
    digest_of,
)

from storage.digests import Sha256State
from storage.drivers import FilesystemDriver
from storage.registry import Registry

pytestmark = pytest.mark.mount

V2 = "docker/registry/v2"
ROW_DEADLINE = 15.0
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
ODD = {  # NUL-free but odd characters, each inside an otherwise fine name
    "space": "a b",
    "newline": "a\nb",
    "tab": "a\tb",
    "backslash": "a\\b",
    "unicode": "ünï",
    "%2e%2e": "%2e%2e",
}
Action = Callable[[], object]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One row: `expect` is an errno, or None for success. `changes` are root-relative
    prefixes the action may change (say why in `what`); `keeps` what may still differ from
    before `setup` once `cleanup` ran. `log` must appear in the daemon log during the row."""

    what: str
    action: Action
    expect: int | None
    setup: Action | None = None
    cleanup: Action | None = None
    changes: tuple[str, ...] = ()
    keeps: tuple[str, ...] = ()
    log: str | None = None


@dataclass
class Group:
    """What one table runs against: a mount, its root, and how to let uploads settle."""

    m: Mount
    root: Path
    layer: Path  # a known layer through the mount, for the liveness check
    layer_digest: str
    upload_dirs: list[Path] = field(default_factory=list)


def changed_outside(
    before: dict[str, str], after: dict[str, str], allowed: Iterable[str]
) -> list[str]:
    """Paths that differ, except those under an allowed prefix (or that directory itself)."""
    allowed = tuple(allowed)

    def ok(path: str) -> bool:
        return any(path == a.rstrip("/") or path.startswith(a) for a in allowed)

    differ = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(p for p in differ if not ok(p))


def outcome(action: Action) -> int | None:
    """The errno the action fails with (None: success), within ROW_DEADLINE seconds.

    Anything but an OSError is a broken row and propagates."""
    result: list[object] = []

    def target() -> None:
        try:
            action()
            result.append(None)
        except OSError as exc:
            result.append(exc.errno)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(ROW_DEADLINE)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {ROW_DEADLINE} s: the daemon hangs")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[return-value]


def errname(code: int | None) -> str:
    return "success" if code is None else errno.errorcode.get(code, str(code))


def settle(group: Group) -> None:
    """Wait for every upload's pending release: it saves a hash state after close() has
    returned. Opening an upload for writing waits for that release (OpenFiles.settled);
    the second round waits for the first one's, which has nothing left to save."""
    for _ in range(2):
        for directory in group.upload_dirs:
            for name in os.listdir(directory):
                # Busy (a row holds a writer) or broken (the corrupt group): nothing pends.
                with contextlib.suppress(OSError):
                    os.close(os.open(directory / name, os.O_WRONLY))


def run_table(group: Group, table: list[Case]) -> None:
    """Every row, all problems collected; then the daemon must still serve."""
    problems = []
    for case in table:
        found = []
        base = lstat_snapshot(group.root)
        try:
            if case.setup:
                case.setup()
                settle(group)
            before = lstat_snapshot(group.root)
            mark = len(group.m.log_text())
            got = outcome(case.action)
            settle(group)
            after = lstat_snapshot(group.root)
            log = group.m.log_text()[mark:]
        except TimeoutError as exc:
            problems.append(f"{case.what}: {exc}")
            break  # the mount is stuck: nothing after this row can run
        except Exception as exc:
            problems.append(f"{case.what}: {type(exc).__name__}: {exc}")
            continue
        if got != case.expect:
            found.append(f"{errname(got)}, want {errname(case.expect)}")
        if outside := changed_outside(before, after, case.changes):
            found.append(f"storage changed: {outside[:4]}")
        if case.log and case.log not in log:
            found.append(f"log lacks {case.log!r}")
        try:
            if case.cleanup:
                case.cleanup()
                settle(group)
        except Exception as exc:
            found.append(f"cleanup failed: {exc!r}")
        if outside := changed_outside(base, lstat_snapshot(group.root), case.keeps):
            found.append(f"not restored: {outside[:4]}")
        if found:
            problems.append(f"{case.what}: {'; '.join(found)}")
    assert not problems, f"{len(problems)} of {len(table)} rows failed:\n" + "\n".join(problems)
    assert_alive(group)


def assert_alive(group: Group) -> None:
    assert is_mounted(group.m.mountpoint), "the mount is gone"
    assert group.m.pids(), "the daemon is gone"
    with open(group.layer, "rb") as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == group.layer_digest


# --------------------------------------------------------------------------- actions


def join(directory: Path, name: str | bytes) -> str | bytes:
    """A child path; bytes names (not UTF-8) give a bytes path."""
    if isinstance(name, bytes):
        return os.fsencode(directory) + b"/" + name
    return str(directory / name)


def call(function: Callable[..., object], *args: object) -> Action:
    """A row's syscall with its arguments bound now (no late binding in loops)."""
    return lambda: function(*args)


def lookup(path: str | bytes | Path) -> Action:
    return lambda: os.stat(path)


def create(path: str | bytes | Path) -> Action:
    return lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def open_(path: str | bytes | Path, flags: int) -> Action:
    return lambda: os.close(os.open(path, flags, 0o644))


def write_at(path: Path, data: bytes, offset: int, flags: int = os.O_WRONLY) -> Action:
    def action() -> None:
        fd = os.open(path, flags)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    return action


def put(path: Path, data: bytes) -> Action:
    """Create (or open) and write the whole file; the errno of write or close, the first."""

    def action() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):  # close() fails too; the write's errno counts
                os.close(fd)
            raise
        os.close(fd)

    return action


def at_close(path: Path, data: bytes) -> Action:
    """Every write succeeds; only close() fails (a tag is checked in the last flush)."""

    def action() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            assert os.write(fd, data) == len(data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        os.close(fd)

    return action


def tool(*args: str | Path) -> Action:
    """A real tool; its failure becomes the errno whose message it printed."""

    def action() -> None:
        result = subprocess.run(
            [str(a) for a in args], capture_output=True, timeout=ROW_DEADLINE, env=C_LOCALE
        )
        if result.returncode == 0:
            return
        text = result.stderr.decode(errors="replace")
        # The first error it printed (cp reports a failed write, then the failed close).
        found = [(text.find(os.strerror(c)), c) for c in errno.errorcode]
        found = [(at, -len(os.strerror(c)), c) for at, c in found if at >= 0]
        if not found:
            raise AssertionError(f"{args} failed without an errno: {text}")
        raise OSError(min(found)[2], text)

    return action


_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> Action:
    """Python has no renameat2: call libc's (glibc ≥ 2.28)."""

    def action() -> None:
        at_fdcwd = -100
        if _libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return action


def both(*actions: Action) -> Action:
    def action() -> None:
        for one in actions:
            one()

    return action


def expect_listing(directory: Path, names: Iterable[str]) -> Action:
    """`ls` still works and shows exactly these names (a broken entry spoils only itself)."""
    wanted = sorted(names)

    def action() -> None:
        got = sorted(os.listdir(directory))
        assert got == wanted, f"{directory}: {got} != {wanted}"

    return action


def expect_bytes(path: Path, data: bytes) -> Action:
    def action() -> None:
        with open(path, "rb") as f:
            got = f.read()
        assert got == data, f"{path}: {len(got)} bytes, not the {len(data)} expected"

    return action


def rm(path: str | bytes | Path) -> Action:
    return lambda: os.unlink(path)


def rel_repo(name: str) -> str:
    return f"{V2}/repositories/{name}/"


def rel_uploads(name: str) -> str:
    return f"{V2}/repositories/{name}/_uploads/"


def rel_blob(digest: str) -> str:
    hexpart = digest.removeprefix("sha256:")
    return f"{V2}/blobs/sha256/{hexpart[:2]}/{hexpart}/"


def rel_fanout(digest: str) -> str:
    return f"{V2}/blobs/sha256/{digest.removeprefix('sha256:')[:2]}"


def rel_layer_link(name: str, digest: str) -> str:
    return f"{V2}/repositories/{name}/_layers/sha256/{digest.removeprefix('sha256:')}/"


def mounted(mount, root: Path, image: dict) -> Group:
    """A mount of root whose library/demo holds image. --tag-ttl 0: no row sees what the
    daemon cached in an earlier one."""
    m = mount(root, "--tag-ttl", "0")
    return Group(m, root, m.path("library", "demo", "layers", image["layer"]), image["layer"])


def warm_uploads(uploads: Path) -> None:
    """Create and cancel one upload, so `_uploads/` exists before any row's baseline (a
    cancelled upload leaves that directory, which is the registry's behaviour too)."""
    create(uploads / "warm")()
    os.unlink(uploads / "warm")


# --------------------------------------------------------------------------- names


def names_table(mnt: Path, root: Path, image: dict) -> list[Case]:
    repo = mnt / "library" / "demo"
    tags, uploads, layers, manifests = (
        repo / s for s in ("tags", "uploads", "layers", "manifests")
    )
    hexpart = image["layer"].removeprefix("sha256:")
    table: list[Case] = []

    def row(what: str, action: Action, expect: int | None, **kw: object) -> None:
        table.append(Case(what, action, expect, **kw))  # type: ignore[arg-type]

    # Lookups of names no grammar allows: ENOENT wherever the daemon gets to answer.
    for label, odd in ODD.items():
        row(f"lookup repository with {label}", lookup(mnt / odd), errno.ENOENT)
        row(f"lookup tag with {label}", lookup(tags / odd), errno.ENOENT)
        row(f"lookup upload with {label}", lookup(uploads / odd), errno.ENOENT)
    row("lookup repository, uppercase", lookup(mnt / "LIBRARY"), errno.ENOENT)
    row("lookup repository, leading dash", lookup(mnt / "-library"), errno.ENOENT)
    row("lookup repository, `..` inside", lookup(mnt / "lib..rary"), errno.ENOENT)
    row("lookup storage internals", lookup(repo / "_manifests"), errno.ENOENT)
    row("lookup tag, leading dash", lookup(tags / "-latest"), errno.ENOENT)
    row("lookup tag, uppercase (valid, absent)", lookup(tags / "LATEST"), errno.ENOENT)
    row("lookup non-UTF-8 repository", lookup(join(mnt, b"\xff\xfe")), errno.ENOENT)
    row("lookup non-UTF-8 upload", lookup(join(uploads, b"up\xff")), errno.ENOENT)
    # Over-long names reach the daemon (FUSE takes up to 1024 bytes, newer kernels more). In
    # a section a name that is no tag, digest or upload is ENOENT; a repository component
    # over 255 bytes looks valid, and the host filesystem finds its storage path too long:
    # ENAMETOOLONG, passed on (the errno any Linux filesystem gives; statfs says 255).
    for size in (256, 300, 1000):
        row(f"lookup {size}-byte repository", lookup(mnt / ("a" * size)), errno.ENAMETOOLONG)
        row(f"lookup {size}-byte tag", lookup(tags / ("t" * size)), errno.ENOENT)
        row(f"lookup {size}-byte upload", lookup(uploads / ("u" * size)), errno.ENOENT)
        row(f"lookup {size}-byte layer", lookup(layers / ("f" * size)), errno.ENOENT)
    # Only a path over PATH_MAX (4096) is refused by the kernel itself.
    for size in (1025, 4000):
        row(f"lookup {size}-byte tag", lookup(tags / ("t" * size)), errno.ENOENT)
    row("lookup a path over PATH_MAX (kernel)", lookup(tags / ("t" * 5000)), errno.ENAMETOOLONG)
    # Malformed and unsupported digests, in layers/ and manifests/.
    digests = {
        "no hex": "sha256:",
        "algorithm only": "sha256",
        "no algorithm": ":" + hexpart,
        "short hex": "sha256:" + hexpart[:63],
        "long hex": "sha256:" + hexpart + "0",
        "uppercase hex": "sha256:" + hexpart.upper(),
        "uppercase algorithm": "SHA256:" + hexpart,
        "non-hex": "sha256:" + "g" * 64,
        "sha512 valid length": "sha512:" + "a" * 128,
        "sha384 valid length": "sha384:" + "a" * 96,
        "md5": "md5:" + "a" * 32,
        "%2e%2e": "sha256:%2e%2e",
        "trailing newline": image["layer"] + "\n",
    }
    for label, name in digests.items():
        row(f"lookup layer, {label}", lookup(layers / name), errno.ENOENT)
    for label in ("short hex", "uppercase hex", "sha512 valid length", "md5"):
        row(f"lookup manifest, {label}", lookup(manifests / digests[label]), errno.ENOENT)
    # Traversal: `..` is the kernel's own (the daemon never sees it), so it stays inside
    # the mount's tree or leaves the mount for the host; it never reaches storage paths.
    row("`tags/..` is the repository", call(_same, tags / "..", repo), None)
    row("`layers/../../x` is library/x", lookup(layers / ".." / ".." / "x"), errno.ENOENT)
    row("`..%2f..` in a tag", lookup(tags / "..%2f..%2fetc"), errno.ENOENT)
    row("`%2e%2e%2f` in an upload", lookup(uploads / "%2e%2e%2fdata"), errno.ENOENT)
    row(
        "layer through `tags/../layers`",
        expect_bytes(tags / ".." / "layers" / image["layer"], image["blobs"][image["layer"]]),
        None,
    )

    # Creating under a bad name: EINVAL, nothing stored.
    for label, odd in ODD.items():
        row(f"create tag with {label}", create(tags / odd), errno.EINVAL)
        row(f"create upload with {label}", create(uploads / odd), errno.EINVAL)
        row(f"mkdir repository with {label}", call(os.mkdir, mnt / odd), errno.EINVAL)
    for label, name in {"leading dash": "-x", "leading dot": ".x", "129 bytes": "t" * 129}.items():
        row(f"create tag, {label}", create(tags / name), errno.EINVAL)
    row("create upload named `*`", create(uploads / "st*r"), errno.EINVAL)
    for label, name in {
        "uppercase": "UPPER",
        "leading dash": "-x",
        "trailing dash": "x-",
        "`..` inside": "a..b",
        "leading underscore": "_layers",
    }.items():
        row(f"mkdir repository, {label}", call(os.mkdir, mnt / name), errno.EINVAL)
    row("mkdir storage internals in a repository", call(os.mkdir, repo / "_uploads"), errno.EINVAL)
    row(
        "mkdir nested name over 255 in all",
        call(os.mkdir, mnt / "library" / ("n" * 250)),
        errno.EINVAL,
    )
    for size in (256, 300, 1000, 4000):
        row(f"create {size}-byte tag", create(tags / ("t" * size)), errno.EINVAL)
        row(f"create {size}-byte upload", create(uploads / ("u" * size)), errno.EINVAL)
    # mkdir: the kernel's lookup comes first, and for a top-level component over 255 bytes
    # it already fails (ENAMETOOLONG, as above), so the mkdir never reaches the daemon.
    # That is the errno every Linux filesystem gives for such a name (statfs says 255).
    for size in (256, 300, 1000):
        row(
            f"mkdir {size}-byte repository",
            call(os.mkdir, mnt / ("r" * size)),
            errno.ENAMETOOLONG,
        )
    row("create over PATH_MAX (kernel)", create(uploads / ("u" * 5000)), errno.ENAMETOOLONG)
    row("create non-UTF-8 tag", create(join(tags, b"t\xff")), errno.EINVAL)
    row("create non-UTF-8 upload", create(join(uploads, b"u\xff")), errno.EINVAL)
    row("mkdir non-UTF-8 repository", call(os.mkdir, join(mnt, b"r\xff")), errno.EINVAL)
    row("create a file at the top", create(mnt / "file"), errno.EPERM)
    row(  # an upload verified by its name: nothing written hashes to another (close() EIO)
        "create a digest-named file in layers/",
        create(layers / image["layer"].replace(hexpart, "0" * 64)),
        errno.EIO,
    )
    row("mkdir an existing repository", call(os.mkdir, repo), errno.EEXIST)

    # Odd but valid: these succeed; cleanup removes what they made.
    demo = "library/demo"
    for label, name in {
        "leading dash": "-dash",
        "uppercase": "UPPER",
        "`..` inside": "a..b",
        "all dots": "...",
        "255 bytes": "u" * 255,
    }.items():
        row(
            f"create upload, {label} (allowed)",
            create(uploads / name),
            None,
            cleanup=rm(uploads / name),
            changes=(rel_uploads(demo),),
        )
    for label, name in {
        "double dash": "a--b",
        "double underscore": "a__b",
        "255": "r" * 255,
    }.items():
        row(
            f"mkdir repository, {label} (allowed)",
            call(os.mkdir, mnt / name),
            None,
            cleanup=_rmtree(root / V2 / "repositories" / name),
            changes=(rel_repo(name),),
        )
    return table


def _same(a: Path, b: Path) -> None:
    assert os.stat(a).st_ino == os.stat(b).st_ino, f"{a} is not {b}"


def _rmtree(path: Path) -> Action:
    """A repository that is not empty cannot be removed through the mount: clean the root."""
    return lambda: shutil.rmtree(path)


async def test_bad_names(tmp_path, mount):
    """Bad repository names, tags, upload names and digests: ENOENT on lookup, EINVAL on
    create, ENAMETOOLONG where a name exceeds what the kernel or the host filesystem take."""
    root = tmp_path / "root"
    image = await build_root(root, size=50_000)
    group = mounted(mount, root, image)
    uploads = group.m.path("library", "demo", "uploads")
    group.upload_dirs.append(uploads)
    warm_uploads(uploads)
    run_table(group, names_table(group.m.mountpoint, root, image))


# --------------------------------------------------------------------------- writes


class Held:
    """A descriptor a row keeps open around its action (a writer that makes others busy)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def open(self, path: Path, flags: int = os.O_WRONLY) -> Action:
        def action() -> None:
            self.fd = os.open(path, flags)

        return action

    def close(self, *then: Action) -> Action:
        def action() -> None:
            if self.fd is not None:
                fd, self.fd = self.fd, None
                os.close(fd)
            for one in then:
                one()

        return action


def overwrite_and_check(path: Path, data: bytes) -> Action:
    """Overwrite below the end (allowed), append, then read back what the file must hold."""

    def action() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"XYZ", 10)
            os.pwrite(fd, b"tail", len(data))
        finally:
            os.close(fd)
        expect_bytes(path, data[:10] + b"XYZ" + data[13:] + b"tail")()

    return action


# A POSIX ACL xattr for mode 644 (what cp -p and sed -i set): version 2, then user::rw-,
# group::r--, other::r-- (tag, permissions, id).
ACL_644 = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 6), (4, 4), (0x20, 4))
)


def shows(
    path: Path,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
    mtime: int | None = None,
) -> Action:
    """stat shows what chmod, chown or utime set (checked only for what is given)."""

    def action() -> None:
        st = os.stat(path)
        got = (stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid), int(st.st_mtime))
        want = (mode, owner, mtime)
        for have, expected in zip(got, want, strict=True):
            assert expected is None or have == expected, f"{path}: {got}, want {want}"

    return action


def has_xattr(path: Path, name: str) -> Action:
    """getxattr still answers name: a removal of a computed one changed nothing."""
    return lambda: os.getxattr(path, name)


def touch_same(path: Path) -> Action:
    def action() -> None:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    return action


def ftruncate(path: Path, size: int) -> Action:
    def action() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    return action


def writes_table(mnt: Path, image: dict) -> list[Case]:
    ns = mnt / "library"
    repo = ns / "demo"
    tags, uploads, layers, manifests = (
        repo / s for s in ("tags", "uploads", "layers", "manifests")
    )
    layer, manifest, tag = layers / image["layer"], manifests / image["digest"], tags / "latest"
    upload = uploads / "up"
    data = os.urandom(100_000)
    changes = (rel_uploads("library/demo"),)  # the row's own upload, which cleanup removes
    new_upload = put(upload, data)
    drop = rm(upload)
    table: list[Case] = []

    def row(what: str, action: Action, expect: int | None, **kw: object) -> None:
        table.append(Case(what, action, expect, **kw))  # type: ignore[arg-type]

    def on_upload(what: str, action: Action, expect: int | None, **kw: object) -> None:
        """A row about an upload that setup makes and cleanup cancels."""
        kw.setdefault("changes", changes)
        row(what, action, expect, setup=new_upload, cleanup=drop, **kw)

    # Writing where nothing is written: layers/ and manifests/ (SPEC §7: EPERM).
    for label, flags in {
        "O_WRONLY": os.O_WRONLY,
        "O_RDWR|O_TRUNC": os.O_RDWR | os.O_TRUNC,
        "O_RDONLY|O_TRUNC": os.O_RDONLY | os.O_TRUNC,
        "O_WRONLY|O_APPEND": os.O_WRONLY | os.O_APPEND,
    }.items():
        row(f"open a layer {label}", open_(layer, flags), errno.EPERM)
        row(f"open a manifest {label}", open_(manifest, flags), errno.EPERM)
    # A manifest by digest is stored on close, checked (test_everyday_tools.py): closed
    # with nothing written, it stores nothing and says so (EINVAL, as a new tag left empty);
    # a name that is no digest is refused.
    row(
        "create in manifests/, nothing written",
        create(manifests / ("sha256:" + "0" * 64)),
        errno.EINVAL,
    )
    row("create junk in manifests/", create(manifests / "junk"), errno.EPERM)
    row("create junk in layers/", create(layers / "junk"), errno.EPERM)
    row("create a file in a repository", create(repo / "file"), errno.EPERM)

    # chmod and chown: what changes nothing succeeds everywhere (cp -p, rsync -a); a real
    # change is kept for an upload (in memory), ignored on a tag, EPERM elsewhere. setxattr,
    # removexattr: EPERM, but ACLs are "not supported", so that tools fall back to chmod, and
    # so are user.* names on what is written (an upload, a tag): mv and cp -a go on quietly.
    nodes = {
        "the top": mnt,
        "a namespace": ns,
        "a repository": repo,
        "a section": layers,
        "a layer": layer,
        "a manifest": manifest,
        "a tag": tag,
        "an upload": upload,
    }
    me = (os.getuid(), os.getgid())  # the daemon's, which the mount shows
    for label, path in nodes.items():
        kw = {"setup": new_upload, "cleanup": drop, "changes": changes} if path == upload else {}
        real = None if path in (upload, tag) else errno.EPERM
        same = 0o644 if path in (layer, manifest, tag, upload) else 0o755
        # An upload shows what it is given; a tag takes it and shows its own (ignored).
        mode, owner = (0o600, (1234, 4321)) if path != tag else (same, me)
        row(f"chmod {label}", both(call(os.chmod, path, 0o600), shows(path, mode)), real, **kw)
        row(
            f"chown {label}",
            both(call(os.chown, path, 1234, 4321), shows(path, owner=owner)),
            real,
            **kw,
        )
        row(f"chmod {label} to its mode", call(os.chmod, path, same), None, **kw)
        row(f"chown {label} to its owner", call(os.chown, path, *me), None, **kw)
        row(
            f"setxattr on {label}",
            call(os.setxattr, path, "user.test", b"x"),
            errno.EOPNOTSUPP if path in (tag, upload) else errno.EPERM,  # as without user xattrs
            **kw,
        )
    for label, path in (("a tag", tag), ("a layer", layer), ("a repository", repo)):
        row(
            f"set an ACL on {label}",
            call(os.setxattr, path, "system.posix_acl_access", ACL_644),
            errno.EOPNOTSUPP,
        )
    row("chmod(1) a layer", tool("chmod", "600", layer), errno.EPERM)
    row("chmod(1) a layer to its mode", tool("chmod", "644", layer), None)
    on_upload("chmod(1) an upload", both(tool("chmod", "755", upload), shows(upload, 0o755)), None)
    # removexattr of regfs's own (computed from storage) is accepted and ignored, so that
    # rsync -X goes on; of a name the file lacks, ENODATA, as on a local filesystem.
    for label, path, name in (
        ("a layer", layer, "user.regfs.digest"),
        ("a manifest", manifest, "user.regfs.mediatype"),
        ("a tag", tag, "user.regfs.digest"),
    ):
        row(
            f"removexattr on {label}",
            both(call(os.removexattr, path, name), has_xattr(path, name)),
            None,
        )
    row("removexattr on a repository", call(os.removexattr, repo, "user.none"), errno.ENODATA)
    row("removexattr of a missing name", call(os.removexattr, layer, "user.none"), errno.ENODATA)
    on_upload(
        "removexattr on an upload",
        both(call(os.removexattr, upload, "user.regfs.uuid"), has_xattr(upload, "user.regfs.uuid")),
        None,
    )
    row(
        "setxattr replacing user.regfs.digest",
        call(os.setxattr, layer, "user.regfs.digest", b"sha256:0"),
        errno.EPERM,
    )
    row("getxattr of an unknown name", call(os.getxattr, layer, "user.nope"), errno.ENODATA)

    # truncate: blobs never; uploads shrink (a resume point), never grow (a gap).
    row("truncate a layer", call(os.truncate, layer, 0), errno.EPERM)
    row("truncate a manifest", call(os.truncate, manifest, 10), errno.EPERM)
    row("truncate a tag by path", call(os.truncate, tag, 0), errno.EPERM)
    on_upload("truncate an upload by path, shrink", call(os.truncate, upload, 1000), None)
    on_upload("truncate an upload by path, grow", call(os.truncate, upload, 200_000), errno.EINVAL)
    on_upload("ftruncate an upload, shrink", ftruncate(upload, 1000), None)
    on_upload("ftruncate an upload, grow", ftruncate(upload, len(data) + 1), errno.EINVAL)
    on_upload("truncate(1) tool, grow", tool("truncate", "-s", "+1", upload), errno.EINVAL)

    # Upload writes: a gap is EINVAL; below the end overwrites; O_TRUNC restarts.
    on_upload("write leaving a 1-byte gap", write_at(upload, b"x", len(data) + 1), errno.EINVAL)
    on_upload("write leaving a 1 GiB gap", write_at(upload, b"x", 1 << 30), errno.EINVAL)
    on_upload(
        "write at the end of an O_TRUNC",
        write_at(upload, b"x", 10, os.O_WRONLY | os.O_TRUNC),
        errno.EINVAL,
        changes=changes,
    )
    on_upload("overwrite below the end, then append", overwrite_and_check(upload, data), None)
    on_upload("append with O_APPEND", write_at(upload, b"more", 0, os.O_WRONLY | os.O_APPEND), None)
    on_upload(
        "O_TRUNC restarts the upload",
        both(open_(upload, os.O_WRONLY | os.O_TRUNC), expect_bytes(upload, b"")),
        None,
    )
    row(
        "write a tag past its end",
        write_at(tags / "gap", b"{}", 5, os.O_WRONLY | os.O_CREAT),
        errno.EINVAL,
    )

    # One writer per upload: the second is EBUSY and changes nothing.
    held = Held()

    def while_written(what: str, action: Action, expect: int | None) -> None:
        setup = both(new_upload, held.open(upload))
        row(what, action, expect, setup=setup, cleanup=held.close(drop), changes=changes)

    for label, flags in {
        "O_WRONLY": os.O_WRONLY,
        "O_RDWR": os.O_RDWR,
        "O_WRONLY|O_TRUNC": os.O_WRONLY | os.O_TRUNC,
        "O_WRONLY|O_APPEND": os.O_WRONLY | os.O_APPEND,
    }.items():
        while_written(f"second writer {label}", open_(upload, flags), errno.EBUSY)
    row(  # the name goes; the writer's close cancels the upload (tests/test_mount_unlinked.py)
        "rm while written",
        rm(upload),
        None,
        setup=both(new_upload, held.open(upload)),
        cleanup=held.close(),
        changes=changes,
    )
    while_written("reader beside the writer", expect_bytes(upload, data), None)

    # Links, symlinks, special files: none in this tree.
    for label, source, target in (
        ("a layer into layers/", layer, layers / ("sha256:" + "0" * 64)),
        ("a layer into uploads/", layer, uploads / "x"),
        ("a manifest into tags/", manifest, tags / "v9"),
        ("a tag into tags/", tag, tags / "v9"),
    ):
        row(f"hard link {label}", call(os.link, source, target), errno.EPERM)
    on_upload("hard link an upload", call(os.link, upload, uploads / "up2"), errno.EPERM)
    for label, directory in {
        "the top": mnt,
        "a repository": repo,
        "tags/": tags,
        "uploads/": uploads,
        "layers/": layers,
    }.items():
        row(
            f"symlink in {label}",
            call(os.symlink, "/etc/passwd", directory / "ln"),
            errno.EPERM,
        )
    # A regular file in uploads/ is an empty upload (tar --xattrs makes files so).
    node = uploads / "node"
    row(
        "mknod a regular file in uploads/",
        both(call(os.mknod, node, stat.S_IFREG | 0o644), expect_bytes(node, b"")),
        None,
        cleanup=rm(node),
        changes=changes,
    )
    for label, path, mode in (
        ("a FIFO in uploads/", uploads / "fifo", stat.S_IFIFO | 0o644),
        ("a FIFO in tags/", tags / "fifo", stat.S_IFIFO | 0o644),
        ("a FIFO at the top", mnt / "fifo", stat.S_IFIFO | 0o644),
        ("/dev/null's twin in uploads/", uploads / "null", stat.S_IFCHR | 0o644),
    ):
        row(f"mknod {label}", call(os.mknod, path, mode, os.makedev(1, 3)), errno.EPERM)

    # Directories: mkdir only makes repositories; rmdir removes only an empty one, and takes
    # an empty section as a no-op (`rm -r` of a repository: tests/test_everyday_tools.py).
    for section in ("layers", "manifests", "tags", "uploads"):
        row(f"mkdir in {section}/", call(os.mkdir, repo / section / "d"), errno.EPERM)
        full = errno.ENOTEMPTY if section != "uploads" else None
        row(f"rmdir {section}/", call(os.rmdir, repo / section), full)
    row("rmdir a repository holding an image", call(os.rmdir, repo), errno.ENOTEMPTY)
    row("rmdir a namespace holding a repository", call(os.rmdir, ns), errno.ENOTEMPTY)
    row("rmdir the mountpoint", call(os.rmdir, mnt), errno.EBUSY)
    row("rmdir a layer", call(os.rmdir, layer), errno.ENOTDIR)
    row("rmdir what is not there", call(os.rmdir, repo / "nothere"), errno.ENOENT)
    row("unlink a section", rm(layers), errno.EISDIR)
    row("unlink a repository", rm(repo), errno.EISDIR)
    row("unlink a layer that is not linked", rm(layers / ("sha256:" + "0" * 64)), errno.ENOENT)
    row("unlink a malformed digest", rm(layers / "sha256:xyz"), errno.ENOENT)
    row("unlink a tag with a bad name", rm(tags / "bad tag"), errno.ENOENT)
    # Times are the storage's: a touch of what can be written is accepted and ignored.
    row("utime a layer", call(os.utime, layer, (0, 0)), errno.EPERM)
    row("utime a layer to its own times", touch_same(layer), None)
    row("touch -d a layer", tool("touch", "-d", "2020-01-01", layer), errno.EPERM)
    row("utime a tag (ignored)", call(os.utime, tag, (0, 0)), None)
    on_upload(
        "utime an upload (kept)", both(call(os.utime, upload, (5, 5)), shows(upload, mtime=5)), None
    )
    return table


async def test_bad_writes(tmp_path, mount):
    """Writes, truncates, links, special files, xattrs, mkdir and rmdir where none belong;
    upload writes with gaps or a second writer. SPEC §5 and §7."""
    root = tmp_path / "root"
    image = await build_root(root, size=50_000)
    group = mounted(mount, root, image)
    uploads = group.m.path("library", "demo", "uploads")
    group.upload_dirs.append(uploads)
    warm_uploads(uploads)
    run_table(group, writes_table(group.m.mountpoint, image))


# --------------------------------------------------------------------------- renames


def renames_table(mnt: Path, image: dict, other: dict) -> list[Case]:
    repo, far = mnt / "library" / "demo", mnt / "other" / "app"
    tags, uploads, layers, manifests = (
        repo / s for s in ("tags", "uploads", "layers", "manifests")
    )
    layer_data = image["blobs"][image["layer"]]
    a, b = uploads / "a", uploads / "b"
    wrong = os.urandom(5000)
    changes = (rel_uploads("library/demo"),)
    drop_all = both(*(_rm_if_there(uploads / n) for n in ("a", "b", "c", "a..b")))
    table: list[Case] = []

    def row(what: str, action: Action, expect: int | None, **kw: object) -> None:
        kw.setdefault("cleanup", drop_all)
        kw.setdefault("changes", changes)
        table.append(Case(what, action, expect, **kw))  # type: ignore[arg-type]

    def with_a(what: str, action: Action, expect: int | None, data: bytes = wrong, **kw: object):
        row(what, action, expect, setup=put(a, data), **kw)

    def mv(source: Path, target: Path) -> Action:
        return call(os.rename, source, target)

    # Only an upload moves, and only within its repository's uploads/ or into its layers/.
    with_a(
        "upload → another repository's layers/", mv(a, far / "layers" / other["layer"]), errno.EPERM
    )
    with_a("upload → another repository's uploads/", mv(a, far / "uploads" / "a"), errno.EXDEV)
    with_a("upload → manifests/", mv(a, manifests / digest_of(wrong)), errno.EPERM)
    with_a("upload → tags/", mv(a, tags / "v9"), errno.EPERM)
    with_a("upload → the repository directory", mv(a, repo / "a"), errno.EPERM)
    row("layer → uploads/", mv(layers / image["layer"], uploads / "c"), errno.EPERM)
    row(
        "layer → another digest in layers/",
        mv(layers / image["layer"], layers / ("sha256:" + "0" * 64)),
        errno.EPERM,
    )
    row(
        "layer → over another layer",
        mv(layers / image["layer"], layers / image["config"]),
        errno.EPERM,
    )
    row(
        "layer → another repository", mv(layers / image["layer"], far / "layers" / "x"), errno.EPERM
    )
    row("tag → uploads/", mv(tags / "latest", uploads / "c"), errno.EPERM)
    row("tag → another repository's tags/", mv(tags / "latest", far / "tags" / "v9"), errno.EXDEV)

    # Within tags/: a retag (sed -i, editors that save by rename). The target points at the
    # source's manifest, the source goes.
    retags = (rel_repo("library/demo") + "_manifests/",)  # the tags, the manifest re-put
    v2 = tags / "v2"
    with_v2 = {"setup": tool("cp", tags / "latest", v2), "changes": retags}
    row(
        "tag → a new name: retag",
        both(mv(tags / "latest", tags / "v9"), expect_listing(tags, ["v9"])),
        None,
        cleanup=mv(tags / "v9", tags / "latest"),
        changes=retags,
    )
    row(
        "tag → over another tag: retag",
        both(mv(v2, tags / "latest"), expect_listing(tags, ["latest"])),
        None,
        **with_v2,
    )
    row(
        "RENAME_NOREPLACE tag → over another tag",
        renameat2(v2, tags / "latest", RENAME_NOREPLACE),
        errno.EEXIST,
        cleanup=rm(v2),
        **with_v2,
    )
    row("tag → itself", mv(tags / "latest", tags / "latest"), None)
    for label, name in {
        "`~`": "latest~",
        "leading dot": ".latest",
        "129 characters": "t" * 129,
    }.items():
        row(f"tag → invalid tag name, {label}", mv(tags / "latest", tags / name), errno.EINVAL)
    row("tag that does not exist → a tag", mv(tags / "nothere", tags / "v9"), errno.ENOENT)
    row("manifest → manifests/", mv(manifests / image["digest"], manifests / "x"), errno.EPERM)
    row("manifest → tags/", mv(manifests / image["digest"], tags / "v9"), errno.EPERM)
    row("a repository", mv(repo, mnt / "library" / "renamed"), errno.EPERM)
    row("a section", mv(layers, repo / "blobs"), errno.EPERM)
    row("a namespace", mv(mnt / "library", mnt / "lib2"), errno.EPERM)

    # Into layers/: the content must hash to the name.
    with_a(
        "wrong content onto an existing layer",
        mv(a, layers / image["layer"]),
        errno.EINVAL,
        log="not finished",
    )
    with_a("wrong content to a new digest", mv(a, layers / ("sha256:" + "0" * 64)), errno.EINVAL)
    with_a(
        "right content onto an existing layer: finishes, deduplicated",
        mv(a, layers / image["layer"]),
        None,
        data=layer_data,
    )
    with_a(
        "right content to an uploads/ digest name: finishes, deduplicated",
        mv(a, uploads / image["layer"]),
        None,
        data=layer_data,
    )
    with_a(
        "wrong content to an uploads/ digest name", mv(a, uploads / image["layer"]), errno.EINVAL
    )
    for label, name in {
        "not a digest": "notadigest",
        "no hex": "sha256:",
        "short hex": image["layer"][:-1],
        "uppercase hex": "sha256:" + image["layer"].removeprefix("sha256:").upper(),
        "sha512": "sha512:" + "a" * 128,
        "md5": "md5:" + "a" * 32,
    }.items():
        with_a(f"upload → layers/, {label}", mv(a, layers / name), errno.EINVAL)
    for label, name in {**ODD, "256 bytes": "u" * 256, "`*`": "st*r"}.items():
        with_a(f"upload → uploads/ name with {label}", mv(a, uploads / name), errno.EINVAL)
    with_a("upload → non-UTF-8 name", call(os.rename, a, join(uploads, b"u\xff")), errno.EINVAL)
    with_a("upload → odd but valid `a..b`", mv(a, uploads / "a..b"), None)

    # renameat2 flags (libc; Python has none): RENAME_NOREPLACE never replaces; the others
    # (exchange, whiteout) mean something this tree cannot do.
    two = both(put(a, wrong), put(b, b"bee"))
    row(
        "RENAME_NOREPLACE onto an upload",
        renameat2(a, b, RENAME_NOREPLACE),
        errno.EEXIST,
        setup=two,
    )
    with_a(
        "RENAME_NOREPLACE onto a layer",
        renameat2(a, layers / image["layer"], RENAME_NOREPLACE),
        errno.EEXIST,
        data=layer_data,
    )
    with_a("RENAME_NOREPLACE to a new name", renameat2(a, uploads / "c", RENAME_NOREPLACE), None)
    row("RENAME_EXCHANGE of two uploads", renameat2(a, b, RENAME_EXCHANGE), errno.EINVAL, setup=two)
    with_a("RENAME_WHITEOUT", renameat2(a, uploads / "c", RENAME_WHITEOUT), errno.EINVAL)

    # A written upload is renamed under its writer, never finished by a rename.
    held = Held()
    row(
        "upload being written → layers/",
        mv(a, layers / digest_of(wrong)),
        errno.EBUSY,
        setup=both(put(a, wrong), held.open(a)),
        cleanup=held.close(drop_all),
    )
    row(
        "upload being written → uploads/",
        mv(a, uploads / "c"),
        None,
        setup=both(put(a, wrong), held.open(a)),
        cleanup=held.close(drop_all),
    )
    row(  # as rm of it: the name goes at once, its writer's last close cancels it
        "onto an upload being written",
        both(mv(a, b), expect_listing(uploads, ["b"])),
        None,
        setup=both(two, held.open(b)),
        cleanup=held.close(drop_all),
    )
    return table


def _rm_if_there(path: Path) -> Action:
    def action() -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    return action


async def test_bad_renames(tmp_path, mount):
    """Renames: only an upload moves, within uploads/ or into layers/ of its repository, and
    into layers/ only under its content's digest (a present blob is deduplicated)."""
    root = tmp_path / "root"
    image = await build_root(root, size=50_000)
    other = await build_root(root, name="other/app", size=20_000)
    group = mounted(mount, root, image)
    uploads = group.m.path("library", "demo", "uploads")
    group.upload_dirs.append(uploads)
    warm_uploads(uploads)
    run_table(group, renames_table(group.m.mountpoint, image, other))


# --------------------------------------------------------------------------- manifests


def manifests_table(mnt: Path, root: Path, tmp: Path, image: dict, other: dict) -> list[Case]:
    tags = mnt / "library" / "demo" / "tags"
    good = json.loads(image["manifest"])
    config, layer = good["config"], good["layers"][0]
    missing = "sha256:" + "cd" * 32
    only_other = other["layer"]  # a blob of other/app, not linked in library/demo

    def descriptor(**changes: object) -> dict:
        return {**layer, **changes}

    docker_config = {**config, "mediaType": DOCKER_CONFIG}
    docker_layer = {**layer, "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"}
    child = {"mediaType": good["mediaType"], "digest": image["digest"], "size": 10}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}
    bodies: dict[str, tuple[object, str]] = {
        # what: (body, the check the log must name)
        "not an object (list)": ([good], "not a JSON object"),
        "not an object (string)": ("manifest", "not a JSON object"),
        "not an object (null)": (None, "not a JSON object"),
        "schemaVersion 1": ({**good, "schemaVersion": 1}, "schemaVersion"),
        "schemaVersion missing": (
            {k: v for k, v in good.items() if k != "schemaVersion"},
            "schemaVersion",
        ),
        "schemaVersion as a string": ({**good, "schemaVersion": "2"}, "schemaVersion"),
        "unknown media type": (
            {**good, "mediaType": "application/x-nope"},
            "unsupported manifest media type",
        ),
        "docker media type, no config": (
            {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": [docker_layer]},
            "config is not a descriptor",
        ),
        "index with layers": ({**index, "layers": [layer]}, "must not have config or layers"),
        "docker list with config": (
            {**index, "mediaType": DOCKER_MANIFEST_LIST, "config": config},
            "must not have config or layers",
        ),
        "index without manifests": (
            {"schemaVersion": 2, "mediaType": OCI_INDEX},
            "needs a manifests list",
        ),
        "image manifest with manifests": (
            {**good, "manifests": [child]},
            "must not have manifests",
        ),
        "image manifest without layers": (
            {k: v for k, v in good.items() if k != "layers"},
            "needs a layers list",
        ),
        "layers not a list": ({**good, "layers": layer}, "needs a layers list"),
        "missing config blob": (
            {**good, "config": {**config, "digest": missing}},
            f"config names blob {missing}",
        ),
        "missing layer blob": (
            {**good, "layers": [descriptor(digest=missing)]},
            f"layers[0] names blob {missing}",
        ),
        "layer only in another repository": (
            {**good, "layers": [descriptor(digest=only_other)]},
            f"names blob {only_other}",
        ),
        "missing child manifest": (
            {**index, "manifests": [{**child, "digest": missing}]},
            f"names manifest {missing}",
        ),
        "child manifest only in another repository": (
            {**index, "manifests": [{**child, "digest": other["digest"]}]},
            f"names manifest {other['digest']}",
        ),
        "negative size": ({**good, "layers": [descriptor(size=-1)]}, "no valid size"),
        "size true": ({**good, "layers": [descriptor(size=True)]}, "no valid size"),
        "size 1.5": ({**good, "layers": [descriptor(size=1.5)]}, "no valid size"),
        "descriptor without mediaType": (
            {**good, "layers": [{k: v for k, v in layer.items() if k != "mediaType"}]},
            "has no mediaType",
        ),
        "descriptor not an object": ({**good, "layers": ["sha256:x"]}, "not a descriptor"),
        "digest short": ({**good, "layers": [descriptor(digest=missing[:-2])]}, "invalid digest"),
        "digest uppercase": (
            {**good, "layers": [descriptor(digest=layer["digest"].upper())]},
            "invalid digest",
        ),
        "digest sha512": (
            {**good, "layers": [descriptor(digest="sha512:" + "a" * 128)]},
            "not supported",
        ),
        "digest md5": (
            {**good, "layers": [descriptor(digest="md5:" + "a" * 32)]},
            "unknown digest algorithm",
        ),
        "digest missing": (
            {**good, "layers": [{k: v for k, v in layer.items() if k != "digest"}]},
            "has no digest",
        ),
        "urls not strings": ({**good, "layers": [descriptor(urls=[1])]}, "invalid urls"),
    }
    table: list[Case] = []
    for what, (body, check) in bodies.items():
        src = tmp / f"manifest-{len(table)}.json"
        src.write_bytes(json.dumps(body).encode())
        table.append(Case(f"cp: {what}", tool("cp", src, tags / "v1"), errno.EINVAL, log=check))

    raw: dict[str, tuple[bytes, str]] = {
        "invalid JSON": (b'{"schemaVersion": 2,', "not valid JSON"),
        "trailing garbage": (image["manifest"] + b"}", "not valid JSON"),
        "UTF-8 BOM": (b"\xef\xbb\xbf" + image["manifest"], "not valid JSON"),
        "not UTF-8": (b'{"schemaVersion": 2, "x": "\xff"}', "not valid JSON"),
        "a 5000-digit number": (b'{"schemaVersion": ' + b"9" * 5000 + b"}", "not valid JSON"),
        "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        "NaN schemaVersion": (b'{"schemaVersion": NaN}', "not valid JSON"),
        "NaN inside": (image["manifest"][:-1] + b', "annotations": {"x": NaN}}', "not valid JSON"),
        "UTF-16": (image["manifest"].decode().encode("utf-16"), "not valid JSON"),
    }
    for what, (body, check) in raw.items():
        table.append(Case(f"close: {what}", at_close(tags / "v1", body), errno.EINVAL, log=check))

    # Docker's schema 2 requires mediaType; without one a body with config and layers is an
    # OCI image manifest, which may name blobs of any media type: the registry 2.8 reads
    # such stored bytes the same way. So this one is accepted (and removed again).
    no_type = {k: v for k, v in good.items() if k != "mediaType"}
    no_type = {**no_type, "config": docker_config, "layers": [docker_layer]}
    no_type_bytes = json.dumps(no_type).encode()
    no_type_digest = digest_of(no_type_bytes)
    table.append(
        Case(
            "docker blob types without a mediaType: an OCI manifest, accepted",
            put(tags / "v1", no_type_bytes),
            None,
            cleanup=both(
                rm(mnt / "library" / "demo" / "manifests" / no_type_digest),
                _rm_blob(root, no_type_digest),
            ),
            changes=(rel_repo("library/demo") + "_manifests/", rel_fanout(no_type_digest)),
        )
    )
    # The good manifest under a new tag works; rm removes the tag (the blob was there).
    table.append(
        Case(
            "cp of a good manifest to a new tag",
            tool("cp", tags / "latest", tags / "v2"),
            None,
            cleanup=rm(tags / "v2"),
            changes=(rel_repo("library/demo") + "_manifests/tags/v2/",),
        )
    )
    # Over 4 MiB: EFBIG on write, and nothing stored, even when what got in is valid JSON.
    huge = tmp / "huge.json"
    huge.write_bytes(json.dumps({**good, "annotations": {"pad": "x" * (5 * MIB)}}).encode())
    padded = tmp / "padded.json"
    padded.write_bytes(image["manifest"] + b" " * (5 * MIB))
    table += [
        Case("cp of a 5 MiB manifest", tool("cp", huge, tags / "v1"), errno.EFBIG),
        Case("cp of a good manifest padded to 5 MiB", tool("cp", padded, tags / "v1"), errno.EFBIG),
        Case("write past 4 MiB", put(tags / "v1", padded.read_bytes()), errno.EFBIG),
        Case("a bad manifest over latest", tool("cp", huge, tags / "latest"), errno.EFBIG),
        Case("an empty manifest over latest", at_close(tags / "latest", b"{}"), errno.EINVAL),
        # Created and left empty at its last close (a shell's dup'd descriptor is no last
        # close): refused, as an existing tag emptied (02479b6), not a silent nothing.
        Case(
            "cp of an empty file to a new tag", tool("cp", "/dev/null", tags / "v1"), errno.EINVAL
        ),
        Case("no tag v1 is left", expect_listing(tags, ["latest"]), None),
        Case("latest is untouched", expect_bytes(tags / "latest", image["manifest"]), None),
    ]

    # A shell's `>` ignores close(2)'s error: the refusal is only in the log, which names
    # the repository and the tag.
    table.append(
        Case(
            "echo of a bad manifest > tags/x: the shell says nothing",
            tool("bash", "-c", f"echo '{{}}' > {tags / 'x'}"),
            None,
            log="tag library/demo:x not stored",
        )
    )
    table.append(
        Case(
            "tee of a bad manifest: reported",
            tool("bash", "-c", f"echo '{{}}' | tee {tags / 'x'}"),
            errno.EINVAL,
            log="tag library/demo:x not stored",
        )
    )

    # manifests/<digest>: checked like a tag push, and the bytes must hash to the name.
    manifests = mnt / "library" / "demo" / "manifests"
    child = json.dumps({**good, "annotations": {"child": "1"}}).encode()
    child_src = tmp / "child.json"
    child_src.write_bytes(child)
    bad_child = json.dumps({**good, "layers": [descriptor(digest=missing)]}).encode()
    bad_src = tmp / "bad-child.json"
    bad_src.write_bytes(bad_child)
    other_digest = "sha256:" + "0" * 64
    table += [
        Case(
            "cp a manifest to manifests/ by its digest",
            both(
                tool("cp", child_src, manifests / digest_of(child)),
                expect_bytes(manifests / digest_of(child), child),
            ),
            None,
            cleanup=both(rm(manifests / digest_of(child)), _rm_blob(root, digest_of(child))),
            changes=(rel_repo("library/demo") + "_manifests/", rel_fanout(digest_of(child))),
        ),
        Case(
            "cp a manifest to manifests/ under another digest",
            tool("cp", child_src, manifests / other_digest),
            errno.EINVAL,
            log=f"does not match {other_digest}",
        ),
        Case(
            "cp a manifest failing a check to manifests/ by its digest",
            tool("cp", bad_src, manifests / digest_of(bad_child)),
            errno.EINVAL,
            log=f"names blob {missing}",
        ),
        Case(
            "cp a manifest to manifests/<not a digest>",
            tool("cp", child_src, manifests / "child"),
            errno.EPERM,
        ),
        Case(
            "cp over an existing manifest",
            tool("cp", child_src, manifests / image["digest"]),
            errno.EPERM,
        ),
    ]
    return table


def _rm_blob(root: Path, digest: str) -> Action:
    """A blob stays after rm (garbage collection's job): clean it from the root directly."""

    def action() -> None:
        shutil.rmtree(root / rel_blob(digest))
        with contextlib.suppress(OSError):  # the fan-out directory, if this made it
            os.rmdir(root / rel_fanout(digest))

    return action


async def test_bad_manifests(tmp_path, mount):
    """`cp manifest tags/v1` with a manifest that fails each check: close() fails with
    EINVAL and the log names the check (EFBIG on write past 4 MiB); nothing is stored."""
    root = tmp_path / "root"
    image = await build_root(root, size=50_000)
    other = await build_root(root, name="other/app", size=20_000)
    group = mounted(mount, root, image)
    run_table(group, manifests_table(group.m.mountpoint, root, tmp_path, image, other))


# --------------------------------------------------------------------------- corrupt root

BROKEN = "broken/app"
STARTED = b"2026-01-02T03:04:05Z"


def _replace(path: Path, kind: str, content: bytes = b"") -> None:
    """Put something else where storage expects a file: garbage, a directory, a FIFO, a
    symlink to nowhere, a symlink to the file `content` names (outside the root)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    match kind:
        case "bytes":
            path.write_bytes(content)
        case "dir":
            path.mkdir()
            (path / "inside").write_bytes(b"x")
        case "fifo":
            os.mkfifo(path)
        case "dangling":
            path.symlink_to(path.parent / "nowhere")
        case "symlink":
            path.symlink_to(os.fsdecode(content))


def _upload_dir(root: Path, uuid: str) -> Path:
    return root / V2 / "repositories" / BROKEN / "_uploads" / uuid


def _write_upload(root: Path, uuid: str, data: bytes, states: dict[str, tuple[str, bytes]]) -> None:
    """An upload as the registry keeps it, with hash states `{offset: (kind, content)}`."""
    path = _upload_dir(root, uuid)
    (path / "hashstates" / "sha256").mkdir(parents=True)
    (path / "data").write_bytes(data)
    (path / "startedat").write_bytes(STARTED)
    for offset, (kind, content) in states.items():
        _replace(path / "hashstates" / "sha256" / offset, kind, content)


async def corrupt_root(root: Path) -> dict:
    """library/demo stays good (the liveness check reads it); broken/app gets one damaged
    entry of each kind, next to good ones. Returns what the table needs to know."""
    image = await build_root(root, size=50_000)
    good = await build_root(root, name=BROKEN, tag="good", size=30_000)
    repo_dir = root / V2 / "repositories" / BROKEN
    blobs = [os.urandom(1000 + i) for i in range(15)]
    layers = await link_blobs(root, BROKEN, blobs)

    def link(digest: str) -> Path:
        return repo_dir / "_layers" / "sha256" / digest.removeprefix("sha256:") / "link"

    def data(digest: str) -> Path:
        return root / rel_blob(digest) / "data"

    _replace(link(layers[0]), "bytes", b"garbage")
    _replace(link(layers[1]), "bytes", b"")
    _replace(link(layers[2]), "bytes", layers[2].encode() + b"\n")
    _replace(link(layers[3]), "bytes", good["config"].encode())  # names another blob
    data(layers[4]).unlink()
    _replace(link(layers[5]), "dir")
    _replace(link(layers[6]), "fifo")
    _replace(link(layers[7]), "dangling")
    _replace(data(layers[8]), "dir")
    _replace(data(layers[9]), "fifo")
    _replace(data(layers[10]), "dangling")
    # Whoever can write the root links what the daemon (root) may read to a secret of
    # someone else's: a blob's data, and a layer link's directory (issue 13).
    secret = root.parent / "secret"
    secret.write_bytes(b"root's secret\n")
    secret.chmod(0o600)
    _replace(data(layers[11]), "symlink", bytes(secret))
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "link").write_bytes(layers[12].encode())
    _replace(link(layers[12]).parent, "symlink", bytes(elsewhere))
    (repo_dir / "_layers" / "sha256" / "nothex").mkdir()
    os.mkdir(os.fsencode(repo_dir / "_layers" / "sha256") + b"/\xff\xfe")
    # What the registry itself leaves (issue 14): its DELETE removes only the link file, and
    # garbage collection deletes a blob's whole directory but not the links to it.
    link(layers[13]).unlink()
    shutil.rmtree(data(layers[14]).parent)

    # Manifests m0..m3, tagged t0..t3, then damaged; t4..t7 are broken tags themselves.
    repo = Registry(FilesystemDriver(root)).repository(BROKEN)
    manifests = []
    for i in range(4):
        body = json.loads(good["manifest"])
        body["annotations"] = {"n": str(i)}
        digest = await repo.manifests.put(json.dumps(body).encode())
        await repo.tags.put(f"t{i}", digest)
        manifests.append(str(digest))
    for i in (4, 5):  # m4 deleted by the registry, m5's blob garbage-collected: untagged
        body = json.loads(good["manifest"])
        body["annotations"] = {"n": str(i)}
        manifests.append(str(await repo.manifests.put(json.dumps(body).encode())))

    def revision(digest: str) -> Path:
        hexpart = digest.removeprefix("sha256:")
        return repo_dir / "_manifests" / "revisions" / "sha256" / hexpart / "link"

    def current(tag: str) -> Path:
        return repo_dir / "_manifests" / "tags" / tag / "current" / "link"

    _replace(revision(manifests[0]), "bytes", b"sha256:nothex")
    data(manifests[1]).unlink()
    _replace(revision(manifests[2]), "dir")
    revision(manifests[4]).unlink()
    shutil.rmtree(data(manifests[5]).parent)
    _replace(current("t3"), "bytes", b"sha256:" + b"a" * 63)
    _replace(current("t4"), "bytes", b"sha256:" + b"e" * 64)  # not a revision here
    _replace(current("t5"), "fifo")
    _replace(current("t6"), "dir")
    (repo_dir / "_manifests" / "tags" / "t7" / "index" / "sha256").mkdir(parents=True)
    os.mkdir(os.fsencode(repo_dir / "_manifests" / "tags") + b"/\xff")
    _replace(current(".hidden"), "bytes", good["digest"].encode())
    os.mkdir(os.fsencode(root / V2 / "repositories") + b"/\xffrepo")
    (root / V2 / "repositories" / "Bad" / "_layers").mkdir(parents=True)

    # Uploads: damaged metadata (u0..u5), and uploads with damaged hash states that must
    # still resume and finish (r0..r4): storage falls back to a lower state.
    uuids = {
        key: f"{i:08x}-0000-4000-8000-{i:012x}"
        for i, key in enumerate(["u0", "u1", "u2", "u3", "u4", "u5", "r0", "r1", "r2", "r3", "r4"])
    }
    initial = Sha256State().marshal()
    for key in ("u0", "u1", "u2", "u3", "u4", "u5"):
        _write_upload(root, uuids[key], b"payload", {"0": ("bytes", initial)})
    _replace(_upload_dir(root, uuids["u0"]) / "startedat", "bytes", b"yesterday-ish")
    (_upload_dir(root, uuids["u1"]) / "startedat").unlink()
    for name in ("data", "startedat"):
        (_upload_dir(root, uuids["u2"]) / name).unlink()  # hash states only
    _replace(_upload_dir(root, uuids["u3"]) / "startedat", "fifo")
    _replace(_upload_dir(root, uuids["u4"]) / "regfs-label", "bytes", b"bad name \xff")
    _replace(_upload_dir(root, uuids["u5"]) / "regfs-label", "fifo")
    resumes = {}
    size = 70_000
    wrong_magic = b"nope" + os.urandom(104)
    wrong_length = bytearray(Sha256State().marshal())
    wrong_length[-8:] = (12345).to_bytes(8, "big")
    for key, state in {
        "r0": ("bytes", initial[:50]),  # truncated
        "r1": ("bytes", wrong_magic),  # garbage
        "r2": ("bytes", bytes(wrong_length)),  # well formed, for another length
        "r3": ("fifo", b""),
        "r4": ("dir", b""),
    }.items():
        blob = os.urandom(size + 5000)
        _write_upload(root, uuids[key], blob[:size], {"0": ("bytes", initial), str(size): state})
        resumes[key] = blob
    return {
        "image": image,
        "good": good,
        "layers": layers,
        "blobs": dict(zip(layers, blobs, strict=True)),
        "manifests": manifests,
        "uuids": uuids,
        "resumes": resumes,
        "resume_at": size,
    }


def resume_and_finish(uploads: Path, layers: Path, uuid: str, blob: bytes, at: int) -> Action:
    """`cat rest >> uploads/<uuid>`, then `mv` it to its digest, then read it back."""

    def action() -> None:
        fd = os.open(uploads / uuid, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, blob[at:])
        finally:
            os.close(fd)
        os.rename(uploads / uuid, layers / digest_of(blob))
        expect_bytes(layers / digest_of(blob), blob)()

    return action


def corrupt_table(mnt: Path, info: dict) -> list[Case]:
    repo = mnt / "broken" / "app"
    tags, uploads, layers, manifests = (
        repo / s for s in ("tags", "uploads", "layers", "manifests")
    )
    good, L, M, U = info["good"], info["layers"], info["manifests"], info["uuids"]
    table: list[Case] = []

    def row(what: str, action: Action, expect: int | None, **kw: object) -> None:
        table.append(Case(what, action, expect, **kw))  # type: ignore[arg-type]

    def read(path: Path) -> Action:
        return call(Path.read_bytes, path)

    # EIO with an ERROR line for damage; ENOENT for what storage must treat as absent (what
    # the registry answers 404 for), with a warning when it is damage.
    corrupt = "corrupt storage entry"
    symlink = "a symbolic link in the storage root"
    for i, what, code, log in (
        (0, "link holding garbage", errno.EIO, corrupt),
        (1, "empty link", errno.EIO, corrupt),
        (2, "link with a newline", errno.EIO, corrupt),
        (3, "link naming another blob", errno.EIO, corrupt),
        (4, "link to a missing blob", errno.ENOENT, "blob data is missing"),
        (5, "link that is a directory", errno.ENOENT, "not a regular file"),
        (6, "link that is a FIFO", errno.ENOENT, "not a regular file"),
        (7, "link that is a dangling symlink", errno.EIO, symlink),
        (8, "blob data that is a directory", errno.ENOENT, "blob data is missing"),
        (10, "blob data that is a dangling symlink", errno.EIO, symlink),
        (11, "blob data linked to a secret outside the root", errno.EIO, symlink),
        (12, "link directory linked outside the root", errno.EIO, symlink),
        (13, "link deleted by the registry (an empty directory)", errno.ENOENT, None),
        (14, "link to a blob garbage collection deleted", errno.ENOENT, None),
    ):
        row(f"stat layer: {what}", lookup(layers / L[i]), code, log=log)
        row(f"read layer: {what}", read(layers / L[i]), code)
    row("stat layer: blob data that is a FIFO (size 0)", lookup(layers / L[9]), None)
    row(
        "read layer: blob data that is a FIFO",
        read(layers / L[9]),
        errno.EIO,
        log="not a regular file",
    )
    listed = [good["config"], good["layer"], *(L[i] for i in (0, 1, 2, 3, 7, 9, 10, 11))]
    row("ls layers/ shows the rest (EIO entries too)", expect_listing(layers, listed), None)
    row(
        "a good layer still reads",
        expect_bytes(layers / good["layer"], good["blobs"][good["layer"]]),
        None,
    )

    for i, what, code in (
        (0, "revision link holding garbage", errno.EIO),
        (1, "revision whose blob is missing", errno.ENOENT),
        (2, "revision link that is a directory", errno.ENOENT),
    ):
        row(f"stat manifest: {what}", lookup(manifests / M[i]), code)
        row(f"read its tag: {what}", read(tags / f"t{i}"), code)
    for i, what in ((4, "deleted by the registry"), (5, "whose blob garbage collection deleted")):
        row(f"stat manifest: revision {what}", lookup(manifests / M[i]), errno.ENOENT)
        row(f"read manifest: revision {what}", read(manifests / M[i]), errno.ENOENT)
    for tag, what, code, log in (
        ("t3", "current link holding a short digest", errno.EIO, corrupt),
        ("t4", "current link to a digest that is no manifest here", errno.ENOENT, "points at"),
        ("t5", "current link that is a FIFO", errno.ENOENT, "not a regular file"),
        ("t6", "current link that is a directory", errno.ENOENT, "not a regular file"),
        ("t7", "no current link (an interrupted push)", errno.ENOENT, None),
    ):
        row(f"stat tag: {what}", lookup(tags / tag), code, log=log)
        row(f"getxattr tag: {what}", call(os.getxattr, tags / tag, "user.regfs.digest"), code)
    row(  # a listing reads no tag's link: damaged ones too, as the registry's tags/list
        "ls tags/ shows every valid name (not UTF-8, `.hidden`: skipped)",
        expect_listing(tags, ["good", *(f"t{i}" for i in range(8))]),
        None,
    )
    row(
        "ls manifests/ shows the rest",
        expect_listing(manifests, [good["digest"], M[0], M[3]]),
        None,
    )
    row("a good tag still reads", expect_bytes(tags / "good", good["manifest"]), None)
    row(
        "ls of the top skips names that are no repository",
        expect_listing(mnt, ["broken", "library"]),
        None,
    )

    row("stat upload: garbage startedat", lookup(uploads / U["u0"]), errno.EIO, log=corrupt)
    row("read upload: garbage startedat", read(uploads / U["u0"]), errno.EIO)
    row(
        "stat upload: no startedat (unknown to the registry)",
        lookup(uploads / U["u1"]),
        errno.ENOENT,
    )
    row("stat upload: hash states only", lookup(uploads / U["u2"]), errno.ENOENT)
    row("stat upload: startedat that is a FIFO", lookup(uploads / U["u3"]), errno.ENOENT)
    row("stat upload: label not UTF-8 (shown by uuid)", lookup(uploads / U["u4"]), None)
    row("stat upload: label that is a FIFO (shown by uuid)", lookup(uploads / U["u5"]), None)
    resumes = sorted(U[k] for k in ("r0", "r1", "r2", "r3", "r4"))
    row(
        "ls uploads/ shows the rest",
        expect_listing(uploads, sorted([U["u0"], U["u4"], U["u5"], *resumes])),
        None,
    )

    # Damaged hash states: the upload resumes from a lower state (the log says it skipped
    # the damaged one) and finishes right.
    skipped = "skipping unusable hash state"
    for key, what, log in (
        ("r0", "truncated", skipped),
        ("r1", "garbage", skipped),
        ("r2", "for another length", "holds 12345 bytes"),
        ("r3", "a FIFO", skipped),
        ("r4", "a directory", skipped),
    ):
        blob = info["resumes"][key]
        made = (
            rel_uploads(BROKEN),
            rel_fanout(digest_of(blob)),
            rel_layer_link(BROKEN, digest_of(blob)),
        )
        row(
            f"resume and finish: hash state at the end {what}",
            resume_and_finish(uploads, layers, U[key], blob, info["resume_at"]),
            None,
            changes=made,
            keeps=made,
            log=log,
        )
    return table


async def test_corrupt_storage_root(tmp_path, mount):
    """A damaged root: each broken entry gives EIO (damage, logged) or ENOENT (absent) for
    itself only; listings and the good entries keep working; no read blocks on a FIFO."""
    root = tmp_path / "root"
    info = await corrupt_root(root)
    group = mounted(mount, root, info["image"])
    run_table(group, corrupt_table(group.m.mountpoint, info))


def test_the_battery_has_100_cases(tmp_path):
    """The tables are built without running them (no mount), so this counts every row."""
    fake = "sha256:" + "ab" * 32
    descriptor = {"mediaType": OCI_CONFIG, "digest": fake, "size": 1}
    manifest = {"schemaVersion": 2, "config": descriptor, "layers": [descriptor]}
    image = {
        "layer": fake,
        "config": fake,
        "digest": fake,
        "blobs": {fake: b""},
        "manifest": json.dumps({**manifest, "mediaType": OCI_INDEX}).encode(),
    }
    info = {
        "image": image,
        "good": image,
        "layers": [fake] * 15,
        "manifests": [fake] * 6,
        "uuids": dict.fromkeys(
            ["u0", "u1", "u2", "u3", "u4", "u5", "r0", "r1", "r2", "r3", "r4"], "x"
        ),
        "resumes": dict.fromkeys(["r0", "r1", "r2", "r3", "r4"], b""),
        "resume_at": 0,
    }
    tables = {
        "names": names_table(tmp_path, tmp_path, image),
        "writes": writes_table(tmp_path, image),
        "renames": renames_table(tmp_path, image, image),
        "manifests": manifests_table(tmp_path, tmp_path, tmp_path, image, image),
        "corrupt": corrupt_table(tmp_path, info),
    }
    counts = {name: len(table) for name, table in tables.items()}
    print(counts)
    assert sum(counts.values()) >= 100, counts
