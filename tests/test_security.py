"""Security of the command line and the daemon's start (issue 13): what a local user can plant
beside a root-run `regfs mount`, and where a password may show.

Each test reproduces the attack as it was found; the storage-root and hostile-registry cases
live beside the driver and remote-client tests. docs/security.md has the threat model.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import REGFS, Mount, is_mounted, regfs
from support.registry import RegistryServer, htpasswd_auth, write_htpasswd
from support.users import OtherUser, shared_directory

from regfs.sources import split_login
from storage.privatedir import UnsafeDirectory, open_private
from storage.remote.uploads import UploadRecord, UploadRecords

pytestmark = pytest.mark.mount

USER, PASSWORD = "alice", "s3cr3t-p@ss"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-writable sticky directory, as /tmp is."""
    with shared_directory(0o1777) as path:
        yield path


def daemon_cwd(m: Mount) -> str:
    (pid,) = m.pids()
    return os.readlink(f"/proc/{pid}/cwd")


# --------------------------------------------------------------------------- 1. working directory


def test_daemon_runs_no_code_from_the_working_directory(shared_dir: Path, tmp_path: Path) -> None:
    """A `regfs/` package planted in /tmp ran as root when root mounted from /tmp: the
    daemon restarted itself as `python -m regfs` in the caller's directory."""
    planted = shared_dir / "regfs"
    planted.mkdir()
    marker = shared_dir / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (planted / "__main__.py").write_text("")
    m = Mount("inmemory:", tmp_path / "mnt", tmp_path / "regfs.log")
    try:
        result = subprocess.run(
            [REGFS, "mount", "--log", "relative.log", "inmemory:", str(m.mountpoint)],
            cwd=shared_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert is_mounted(m.mountpoint)
        assert not marker.exists(), "code from the working directory ran"
        assert daemon_cwd(m) == "/"
        # A relative --log names the file in the caller's directory, not in /.
        assert (shared_dir / "relative.log").stat().st_size > 0
        assert not Path("/relative.log").exists()
    finally:
        m.stop()


# --------------------------------------------------------------------------- 5. password in URL


def test_split_login() -> None:
    assert split_login("https://u:p%40ss%3A@host:5000") == ("https://host:5000", "u", "p@ss:")
    assert split_login("https://u@host") == ("https://host", "u", None)
    assert split_login("https://host") == ("https://host", None, None)
    assert split_login("/srv/a@b") == ("/srv/a@b", None, None)


@pytest.mark.registry
def test_password_in_source_url_is_used_but_never_shown(tmp_path: Path, mount) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    with RegistryServer(
        tmp_path / "root", workdir=tmp_path / "registry", auth=htpasswd_auth(htpasswd)
    ) as server:
        quoted = PASSWORD.replace("@", "%40")
        url = server.url.replace("://", f"://{USER}:{quoted}@")
        m = mount(url)
        assert os.listdir(m.mountpoint) == []  # authenticated: the mount serves
        with open("/proc/mounts") as f:
            mounts = f.read()
        assert str(m.mountpoint) in mounts
        assert PASSWORD not in mounts and quoted not in mounts
        assert PASSWORD not in m.log_text() and quoted not in m.log_text()
        (pid,) = m.pids()
        for what in ("cmdline", "environ"):
            data = Path(f"/proc/{pid}/{what}").read_bytes()
            assert PASSWORD.encode() not in data and quoted.encode() not in data, what
        # The password really is the one used: a wrong one is refused.
        wrong = server.url.replace("://", f"://{USER}:Xyzzy-guess@")
        failed = Mount(wrong, tmp_path / "mnt-wrong", tmp_path / "wrong.log")
        try:
            result = regfs("mount", "--log", str(failed.log), wrong, str(failed.mountpoint))
            assert result.returncode != 0 and "401" in result.stderr, result.stderr
            assert "Xyzzy-guess" not in result.stderr + failed.log_text()
        finally:
            failed.stop()


# --------------------------------------------------------------------------- 8. --log FILE


def test_log_symlink_is_refused_not_followed(shared_dir: Path, tmp_path: Path) -> None:
    """`--log /tmp/x.log` where another user planted x.log → /etc/something: root appended
    to the target."""
    target = tmp_path / "precious"
    target.write_text("keep\n")
    link = shared_dir / "regfs.log"
    link.symlink_to(target)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = regfs("mount", "--log", str(link), "inmemory:", str(mnt))
    assert result.returncode != 0
    assert "log file" in result.stderr and str(link) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)
    assert target.read_text() == "keep\n"


def test_log_file_owned_by_another_user_is_refused(
    shared_dir: Path, tmp_path: Path, other_user: OtherUser
) -> None:
    planted = shared_dir / "regfs.log"
    planted.write_text("")
    os.chown(planted, other_user.uid, other_user.gid)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = regfs("mount", "--log", str(planted), "inmemory:", str(mnt))
    assert result.returncode != 0 and f"owned by uid {other_user.uid}" in result.stderr
    assert not is_mounted(mnt) and planted.read_text() == ""


def test_new_log_file_is_private(tmp_path: Path, mount) -> None:
    m = mount("inmemory:")
    assert stat.S_IMODE(m.log.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- what stays sound


def test_allow_other_leaves_other_users_read_only(
    tmp_path: Path, shared_dir: Path, other_user: OtherUser
) -> None:
    """default_permissions: another user reads through an --allow-other mount (modes 644/755)
    but cannot create a repository, write an upload or remove anything."""
    mnt = shared_dir / "mnt"
    m = Mount("inmemory:", mnt, tmp_path / "regfs.log", ["--allow-other"])
    with m:
        (mnt / "org" / "app").mkdir(parents=True)
        (mnt / "org/app/uploads/u1").write_bytes(b"data")
        assert other_user.run("cat", str(mnt / "org/app/uploads/u1")).stdout == "data"
        for command in (
            ["mkdir", str(mnt / "evil")],
            ["sh", "-c", f"echo x > {mnt}/org/app/uploads/u2"],
            ["sh", "-c", f"echo x >> {mnt}/org/app/uploads/u1"],
            ["rm", "-f", str(mnt / "org/app/uploads/u1")],
        ):
            result = other_user.run(*command, check=False)
            assert result.returncode != 0, command
            assert "Permission denied" in result.stderr, (command, result.stderr)
        assert sorted(os.listdir(mnt / "org/app/uploads")) == ["u1"]
        assert (mnt / "org/app/uploads/u1").read_bytes() == b"data"


def test_upload_records_are_private(tmp_path: Path) -> None:
    """A remote upload's record holds its signed location and hash state: 0600."""
    records = UploadRecords(tmp_path / "records")
    records.save(UploadRecord("org/app", "0b6d6e5c-uuid", "https://h/v2/x?_state=s", "t"))
    (saved,) = (tmp_path / "records").iterdir()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert records.load("0b6d6e5c-uuid").location.endswith("_state=s")


@pytest.mark.storage
@pytest.mark.parametrize("planted", ["link to a directory", "dangling link", "others may write"])
def test_a_private_directory_is_made_through_no_link_and_refused_if_shared(
    tmp_path: Path, planted: str
) -> None:
    """The index cache's and the upload records' directories (storage/privatedir.py) below
    a shared, sticky base: a part someone planted as a link (to a directory, or dangling) is
    refused and nothing is made where it points; a part others may write is refused."""
    base, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    base.mkdir()
    base.chmod(0o1777)
    if planted == "others may write":
        (base / "regfs").mkdir()
        (base / "regfs").chmod(0o777)
    else:
        if planted == "link to a directory":
            elsewhere.mkdir()
        (base / "regfs").symlink_to(elsewhere)
    with pytest.raises(UnsafeDirectory):
        open_private(base, ["regfs", "uploads"])
    assert not (elsewhere / "uploads").exists()
    assert not (base / "regfs" / "uploads").exists()


@pytest.mark.storage
def test_a_private_directory_is_made_0700_and_ours(tmp_path: Path) -> None:
    fd = open_private(tmp_path / "base", ["regfs", "uploads", "host"])
    try:
        st = os.fstat(fd)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o700)
        assert os.path.samestat(st, os.stat(tmp_path / "base" / "regfs" / "uploads" / "host"))
    finally:
        os.close(fd)
    (tmp_path / "base" / "regfs" / "uploads" / "host").chmod(0o770)
    with pytest.raises(UnsafeDirectory, match="ours alone"):
        open_private(tmp_path / "base", ["regfs", "uploads", "host"])


@pytest.mark.storage
def test_upload_records_outlive_their_directory_removed(tmp_path: Path) -> None:
    """The records' directory is held open; removed meanwhile (`rm -r ~/.local/state/regfs`),
    it is made again, not written into while unlinked (the records would be lost)."""
    records = UploadRecords(tmp_path / "state" / "regfs" / "uploads" / "host", tmp_path / "state")
    try:
        records.save(UploadRecord("org/app", "u1", "https://r/x", "2026-11-30T00:00:00Z"))
        subprocess.run(["rm", "-r", tmp_path / "state" / "regfs"], check=True)
        records.save(UploadRecord("org/app", "u2", "https://r/y", "2026-11-30T00:00:00Z"))
        assert [r.uuid for r in records.all()] == ["u2"]
        assert (tmp_path / "state" / "regfs" / "uploads" / "host" / "u2.json").is_file()
    finally:
        records.close()
