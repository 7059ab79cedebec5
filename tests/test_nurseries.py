"""storage/nurseries.py: a nursery's error reaches its caller, and FUSE, as itself, not as
an ExceptionGroup. Also here: `regfs/errors.fuse_errors`'s reading of groups, and a real
mount (a daemon without CAP_DAC_OVERRIDE) over a namespace with a child it cannot read.

trio wraps even one error of a nursery's task in an ExceptionGroup. `Catalog.children`
checks a namespace's children in a nursery: a PermissionError (or an I/O error) of one
child's stat came out as a group, which the daemon's mapping (`regfs/errors.py`) knew
nothing of: `ls` got EIO and the log a traceback. Now the nurseries of storage/ raise the
first error as itself (`storage.nurseries.open_nursery`), and the mapping reads any group
of one error as that error (`sole_error`).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.mounts import REGFS, Mount
from support.roots import add_repositories

from regfs.errors import errno_of, fuse_errors
from storage.catalog import Catalog
from storage.drivers import FilesystemDriver
from storage.errors import CorruptEntry
from storage.nurseries import open_nursery, sole_error


async def _fail(exc: BaseException) -> None:
    await trio.lowlevel.checkpoint()
    raise exc


@pytest.mark.storage
async def test_a_nursery_raises_its_tasks_error_as_itself() -> None:
    with pytest.raises(PermissionError) as caught:
        async with open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(_fail, PermissionError(errno.EACCES, "denied"))
    assert caught.value.__cause__ is None
    with pytest.raises(ValueError):  # the body's own error too
        async with open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise ValueError("body")


@pytest.mark.storage
async def test_two_errors_give_the_first_with_the_group_as_its_cause() -> None:
    async def at_once(exc: BaseException) -> None:  # fails before any sibling is cancelled
        raise exc

    with pytest.raises((OSError, KeyError)) as caught:
        async with open_nursery() as nursery:
            nursery.start_soon(at_once, OSError(errno.EIO, "first"))
            nursery.start_soon(at_once, KeyError("second"))
    group = caught.value.__cause__
    assert isinstance(group, ExceptionGroup)
    assert len(group.exceptions) == 2
    assert caught.value is group.exceptions[0]  # the first in the group's order


@pytest.mark.storage
async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    with trio.move_on_after(0.05) as scope:
        async with open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
    assert scope.cancelled_caught


class _Refusing(FilesystemDriver):
    """A root whose one child cannot be stated: the error a root the daemon may not read
    gives (EACCES), or a disk's (EIO)."""

    def __init__(self, root: Path, refused: str, error: OSError) -> None:
        super().__init__(root)
        self.refused, self.error = refused, error

    async def _stat(self, path: str):  # type: ignore[no-untyped-def]
        if self.refused in path:
            raise self.error
        return await super()._stat(path)

    async def _present(self, directory: str, names: list[str]) -> list[bool]:
        """The bulk lstat answers False for what it cannot state (EACCES, EIO), which is
        then asked alone (`holds_repository`): that stat raises the error."""
        found = await super()._present(directory, names)
        refused = [self.refused in f"{directory}/{name}/" for name in names]
        return [yes and not no for yes, no in zip(found, refused, strict=True)]


@pytest.mark.storage
@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO])
async def test_a_childs_error_in_catalog_children_is_that_error(tmp_path: Path, code: int) -> None:
    root = tmp_path / "root"
    names = add_repositories(root, "ns", 40)  # more than CHECKS_AT_ONCE (32)
    drv = _Refusing(root, f"/ns/{names[20]}/", OSError(code, os.strerror(code)))
    with pytest.raises(OSError) as caught:
        await Catalog(drv).children("ns")
    assert type(caught.value) is (PermissionError if code == errno.EACCES else OSError)
    assert caught.value.errno == code
    assert errno_of(caught.value) == code
    assert await Catalog(FilesystemDriver(root)).children("ns") == names


class _Handlers:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    @fuse_errors
    async def readdir(self) -> None:
        raise self.error


@pytest.mark.storage
@pytest.mark.parametrize(
    "error, code",
    [
        (ExceptionGroup("one", [PermissionError(errno.EACCES, "denied")]), errno.EACCES),
        (ExceptionGroup("one", [CorruptEntry("/x", "garbage")]), errno.EIO),
        (ExceptionGroup("out", [ExceptionGroup("in", [FileNotFoundError(2, "no")])]), 2),
        (ExceptionGroup("one", [pyfuse3.FUSEError(errno.ENOTEMPTY)]), errno.ENOTEMPTY),
        (PermissionError("a rule of regfs, no errno"), errno.EPERM),
    ],
    ids=["eacces", "corrupt", "nested", "fuse-error", "plain-permission"],
)
async def test_the_mapping_reads_a_group_of_one_error_as_that_error(
    error: BaseException, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "regfs.ops")
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _Handlers(error).readdir()
    assert caught.value.errno == code
    assert "Traceback" not in caplog.text
    assert "unexpected" not in caplog.text
    if not isinstance(sole_error(error), pyfuse3.FUSEError):
        assert len([r for r in caplog.records if r.name == "regfs.ops" and "readdir:" in r.msg
                    % r.args]) == 1  # fmt: skip


@pytest.mark.storage
async def test_a_group_of_several_errors_is_unexpected(caplog: pytest.LogCaptureFixture) -> None:
    group = ExceptionGroup("two", [OSError(errno.EIO, "a"), KeyError("b")])
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await _Handlers(group).readdir()
    assert caught.value.errno == errno.EIO
    assert "unexpected error, answering EIO" in caplog.text
    assert "Traceback" in caplog.text


@pytest.mark.mount
def test_a_namespace_with_a_child_the_daemon_cannot_read_lists_eacces(tmp_path: Path) -> None:
    """Through a real mount, as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (so a
    directory of mode 000 stops it): `ls` of a namespace one of whose children is such a
    directory is EACCES, one log line without a traceback; the daemon lives and lists
    the rest of the root. Before: EIO, and the traceback of an ExceptionGroup."""
    root = tmp_path / "root"
    add_repositories(root, "ns", 1)  # ns/r00000, before `zlocked` in the namespace's walk
    add_repositories(root, "other", 1)
    locked = root / "docker/registry/v2/repositories/ns/zlocked"
    (locked / "_layers").mkdir(parents=True)
    locked.chmod(0)
    m = Mount(str(root), tmp_path / "mnt", tmp_path / "regfs.log")
    try:
        started = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", REGFS, "mount",
             "--log", str(m.log), str(root), str(m.mountpoint)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr + m.log_text()
        listed = subprocess.run(
            ["ls", str(m.path("ns"))], capture_output=True, text=True, timeout=30
        )
        assert listed.returncode != 0
        assert "Permission denied" in listed.stderr, listed.stderr
        assert sorted(os.listdir(m.path("other"))) == ["r00000"]
        assert m.pids(), "the daemon lives"
        log = m.log_text()
        assert "Traceback" not in log, log
        assert "ExceptionGroup" not in log, log
        assert len([line for line in log.splitlines() if "(EACCES)" in line]) >= 1, log
    finally:
        m.stop()
        locked.chmod(0o755)
    m.check_log()
