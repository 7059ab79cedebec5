"""Errors through a real mount: each asserted by the errno of a real syscall.

The os calls below go through the kernel to the daemon exactly as a tool's would. Every test
ends by reading through the same mount, to show the daemon survived what came before.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support.mounts import Mount
from support.registry import blob_data_path, repo_path
from support.roots import build_root, link_blobs
from support.snapshots import files_snapshot
from support.tools import (
    errno_closing,
    ls,
    run,
)

pytestmark = pytest.mark.mount

HEX = "ab" * 32


def assert_alive(m: Mount, image: dict) -> None:
    """The daemon still serves: its process is there and a layer reads back exactly."""
    assert m.pids(), "the daemon is gone"
    layer = m.path("library", "demo", "layers", image["layer"])
    out = run("sha256sum", layer).stdout.decode()
    assert "sha256:" + out.split()[0] == image["layer"]


# --------------------------------------------------------------------------- bad names


async def test_invalid_names_are_enoent(tmp_path, mount):
    image = await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root")
    repo = m.path("library", "demo")
    bad = [
        repo / "layers" / "notadigest",
        repo / "layers" / ("sha512:" + "a" * 128),  # valid grammar, unsupported algorithm
        repo / "layers" / ("sha256:" + "a" * 63),
        repo / "layers" / image["layer"].upper(),
        repo / "manifests" / "latest",
        repo / "tags" / "..x",
        repo / "tags" / ".hidden",
        repo / "tags" / ("t" * 129),  # tags stop at 128 characters
        m.path("Library"),  # repository names are lowercase
        m.path("library", "Demo"),
        m.path("library", "tags"),  # a namespace is not a repository
        m.path("library", "demo", "_layers"),  # storage internals never show
        repo / "uploads" / "not-a-uuid",
    ]
    for path in bad:
        assert errno_closing(lambda p=path: os.stat(p)) == errno.ENOENT, path
        assert errno_closing(lambda p=path: os.open(p, os.O_RDONLY)) == errno.ENOENT, path
    # Bytes that are not UTF-8 never make a name.
    raw = os.fsencode(repo / "tags") + b"/\xff\xfe"
    assert errno_closing(lambda: os.stat(raw)) == errno.ENOENT

    # 300 characters: the kernel passes the name on (FUSE allows up to 1024), so the daemon
    # answers. Under a section the name is just not a digest or tag; at the top level it is a
    # valid-looking component whose storage path the host filesystem finds too long.
    long_name = "x" * 300
    assert errno_closing(lambda: os.stat(repo / "layers" / long_name)) == errno.ENOENT
    assert errno_closing(lambda: os.stat(repo / "tags" / long_name)) == errno.ENOENT
    assert errno_closing(lambda: os.stat(m.path(long_name))) == errno.ENAMETOOLONG
    assert_alive(m, image)


# --------------------------------------------------------------------------- writes refused


def write_calls(directory: Path, name: str, other: str) -> dict[str, Callable[[], object]]:
    """Every way to change `directory/name` (an existing entry) that stays refused on a
    read-write mount. Not `unlink`: `rm layers/<digest>` unlinks the layer (SPEC §6)."""
    path, sibling = directory / name, directory / other
    return {
        "open O_WRONLY": lambda: os.open(path, os.O_WRONLY),
        "open O_RDWR": lambda: os.open(path, os.O_RDWR),
        "open O_WRONLY|O_APPEND": lambda: os.open(path, os.O_WRONLY | os.O_APPEND),
        "open O_WRONLY|O_TRUNC": lambda: os.open(path, os.O_WRONLY | os.O_TRUNC),
        "open O_RDONLY|O_TRUNC": lambda: os.open(path, os.O_RDONLY | os.O_TRUNC),
        "create": lambda: os.open(directory / f"sha256:{HEX}", os.O_WRONLY | os.O_CREAT, 0o644),
        "create junk name": lambda: os.open(directory / "junk", os.O_WRONLY | os.O_CREAT),
        "mknod": lambda: os.mknod(directory / "junk2"),
        "chmod": lambda: os.chmod(path, 0o600),
        "chown": lambda: os.chown(path, 1234, 1234),
        "utime": lambda: os.utime(path, (0, 0)),
        "truncate": lambda: os.truncate(path, 0),
        "hard link": lambda: os.link(path, directory / f"sha256:{HEX}"),
        "symlink": lambda: os.symlink(path, directory / "junk3"),
        "mkdir": lambda: os.mkdir(directory / "junk4"),
        "rename": lambda: os.rename(path, directory / f"sha256:{HEX}"),
        "rename over sibling": lambda: os.rename(path, sibling),
        "setxattr": lambda: os.setxattr(path, "user.test", b"x"),
        "removexattr": lambda: os.removexattr(path, "user.regfs.digest"),
    }


async def test_writes_to_layers_and_manifests_are_eperm(tmp_path, mount):
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    extra = await build_root(root, size=20_000, tag="other", config=b'{"other":1}')
    m = mount(root)
    repo = m.path("library", "demo")
    before = files_snapshot(root)
    targets = [
        (repo / "layers", image["layer"], extra["layer"]),
        (repo / "manifests", image["digest"], extra["digest"]),
    ]
    for directory, name, other in targets:
        for what, call in write_calls(directory, name, other).items():
            if (directory.name, what) == ("manifests", "create"):
                continue  # a new manifest by digest is taken (tests/test_everyday_tools.py)
            if (directory.name, what) == ("layers", "create"):
                # An upload verified by its name (tests/test_everyday_tools_replace.py): nothing
                # written is another's digest, so close() fails and nothing is left.
                descriptor = call()
                assert isinstance(descriptor, int)
                with pytest.raises(OSError) as closed:
                    os.close(descriptor)
                assert closed.value.errno == errno.EIO
                continue
            if what == "removexattr":  # of regfs's own: accepted and ignored (rsync -X)
                assert errno_closing(call) is None
                continue
            assert errno_closing(call) == errno.EPERM, f"{what} in {directory.name}"
    assert errno_closing(lambda: os.rmdir(repo / "layers")) == errno.ENOTEMPTY
    assert files_snapshot(root) == before, "a refused write changed the storage"
    assert "refused" in m.log_text()
    assert run("cat", repo / "manifests" / image["digest"]).stdout == image["manifest"]
    assert_alive(m, image)


async def test_read_only_mount_refuses_every_write_with_erofs(tmp_path, mount):
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    extra = await build_root(root, size=20_000, tag="other", config=b'{"other":1}')
    m = mount(root, "--read-only")
    repo = m.path("library", "demo")
    before = files_snapshot(root)
    targets = [
        (repo / "layers", image["layer"], extra["layer"]),
        (repo / "manifests", image["digest"], extra["digest"]),
        (repo / "tags", "latest", "other"),
    ]
    for directory, name, other in targets:
        for what, call in write_calls(directory, name, other).items():
            assert errno_closing(call) == errno.EROFS, f"{what} in {directory.name}"
    # Where a read-write mount will take writes (uploads, new repositories), ro still refuses.
    uploads = repo / "uploads" / "new"
    assert errno_closing(lambda: os.open(uploads, os.O_WRONLY | os.O_CREAT)) == errno.EROFS
    assert errno_closing(lambda: os.mkdir(m.path("myorg"))) == errno.EROFS
    assert errno_closing(lambda: os.rmdir(repo / "layers")) == errno.EROFS
    for path in (repo / "layers" / image["layer"], repo / "manifests" / image["digest"]):
        assert errno_closing(lambda p=path: os.unlink(p)) == errno.EROFS, path
    assert errno_closing(lambda: os.unlink(repo / "tags" / "latest")) == errno.EROFS
    assert files_snapshot(root) == before
    assert run("cat", repo / "tags" / "latest").stdout == image["manifest"]
    assert_alive(m, image)


# --------------------------------------------------------------------------- broken storage


async def test_missing_blob_data_is_absent_for_that_layer_only(tmp_path, mount):
    """The registry answers 404 for a link whose blob data is missing: so ENOENT here, not
    listed. Its blob directory is still there, so it is damage (garbage collection deletes
    whole directories): a warning names it."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    (lost,) = await link_blobs(root, "library/demo", [os.urandom(5000)])
    blob_data_path(root, lost).unlink()
    m = mount(root, allow_tracebacks=False)
    layers = m.path("library", "demo", "layers")

    assert errno_closing(lambda: os.stat(layers / lost)) == errno.ENOENT
    assert errno_closing(lambda: os.open(layers / lost, os.O_RDONLY)) == errno.ENOENT
    cat = run("cat", layers / lost, check=False)
    assert cat.returncode != 0 and b"No such file or directory" in cat.stderr
    # The listing skips it; the others read back.
    assert ls(layers) == sorted(image["blobs"])
    assert run("cat", layers / image["config"]).stdout == image["blobs"][image["config"]]
    warnings = [line for line in m.log_text().splitlines() if " WARNING " in line]
    assert any(lost.removeprefix("sha256:") in line for line in warnings), m.log_text()
    assert " ERROR " not in m.log_text()
    assert_alive(m, image)


async def test_garbage_link_files_are_eio(tmp_path, mount):
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    extra = await build_root(root, size=20_000, tag="good", config=b'{"other":1}')
    await build_root(root, size=1000, tag="bad", config=b'{"bad":1}')
    repo_dir = repo_path(root, "library/demo")
    layer_link = repo_dir / "_layers" / "sha256" / extra["layer"].removeprefix("sha256:") / "link"
    layer_link.write_bytes(b"garbage\n")
    (repo_dir / "_manifests" / "tags" / "bad" / "current" / "link").write_bytes(b"\x00\xffnope")
    m = mount(root)
    repo = m.path("library", "demo")

    assert errno_closing(lambda: os.stat(repo / "layers" / extra["layer"])) == errno.EIO
    assert errno_closing(lambda: os.stat(repo / "tags" / "bad")) == errno.EIO
    assert run("cat", repo / "tags" / "bad", check=False).returncode != 0
    assert sorted(ls(repo / "tags")) == ["bad", "good", "latest"]
    assert extra["layer"] in ls(repo / "layers")
    assert run("cat", repo / "tags" / "good").stdout == extra["manifest"]
    log = m.log_text()
    errors = [line for line in log.splitlines() if " ERROR " in line and "corrupt" in line]
    assert any(extra["layer"].removeprefix("sha256:") in line for line in errors), log
    assert any("/tags/bad/current/link" in line for line in errors), log
    assert_alive(m, image)
