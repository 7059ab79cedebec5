"""Everyday tools on a mount, reviewer r1's rough edges of stop 25 (stop 26, b): each run
with the real tool on a real mount and compared with what it does on a local filesystem.

Mostly a finished upload's layer written over (`dd conv=notrunc` with its own bytes, locally
and remotely; any other byte EPERM and logged); also a renamed tag's inode number seen by
git, and `cp -a` of a repository and its uploads to and from a local disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from support.inodes import forgotten
from support.mounts import Mount
from support.roots import build_root
from support.tools import digest_of, errno_of, ls, run
from support.uploads import new_repo, write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"
MIB = 1 << 20


@pytest.fixture
async def mounted(tmp_path: Path, mount) -> Mount:
    """A mount of a fresh root holding library/demo."""
    await build_root(tmp_path / "root", size=10_000)
    return mount(tmp_path / "root")


@pytest.fixture
def repo(mounted: Mount) -> Path:
    return mounted.path(*NAME.split("/"))


def dd(src: Path, dst: Path, *args: str, check: bool = False):
    return run(
        "dd", f"if={src}", f"of={dst}", "bs=1M", "conv=notrunc", "status=none", *args, check=check
    )


# ------------------------------------------------- a finished upload's name, written again


@pytest.mark.parametrize("skip", [0, 1])
async def test_dd_conv_notrunc_of_a_just_finished_upload_with_its_own_bytes(tmp_path, repo, skip):
    # ext4: `dd if=blob of=file bs=1M skip=K seek=K conv=notrunc` of a file that holds blob
    # writes the same bytes over it and exits 0. The resume of an upload (README), run again
    # right after the upload finished at its close (a retry of a script), found its name
    # (`FinishedNode`, FINISHED_GRACE) refusing any open for writing without O_TRUNC: EPERM.
    # The name is the layer, which never changes: the bytes it holds are taken, nothing is
    # stored, nothing ends at close.
    data = os.urandom(3 * MIB + 5)
    blob = write_file(tmp_path / "blob", data)
    name = repo / "uploads" / digest_of(data)
    run("cp", blob, name)
    result = dd(blob, name, f"skip={skip}", f"seek={skip}")
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert ls(repo / "uploads") == []
    assert (repo / "layers" / digest_of(data)).read_bytes() == data
    assert name.read_bytes() == data


@pytest.mark.registry
@pytest.mark.remote
def test_dd_conv_notrunc_of_a_just_finished_upload_on_a_remote_mount(tmp_path, remote_mount):
    # The same over https://: the name reads the layer from the registry to compare.
    data = os.urandom(2 * MIB)
    blob = write_file(tmp_path / "blob", data)
    uploads = new_repo(remote_mount(), "b26/dd") / "uploads"
    run("cp", blob, uploads / digest_of(data))
    result = dd(blob, uploads / digest_of(data), "skip=1", "seek=1")
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert dd(write_file(tmp_path / "x", b"x"), uploads / digest_of(data)).returncode == 1
    assert ls(uploads) == []


async def test_a_write_that_would_change_a_finished_layer_is_eperm_and_logged(
    tmp_path, repo, mounted
):
    # A local file would take any bytes; this one is a layer, and a finished layer never
    # changes (SPEC 5): other bytes, bytes past its end (`>>`) and a truncate to another size
    # are EPERM, each with a log line; a truncate to its own size changes nothing and is taken.
    data = os.urandom(MIB)
    name = repo / "uploads" / digest_of(data)
    run("cp", write_file(tmp_path / "blob", data), name)
    other = write_file(tmp_path / "other", os.urandom(4096))
    result = dd(other, name)
    assert result.returncode == 1 and "Operation not permitted" in result.stderr.decode()
    assert run("bash", "-c", f'echo more >> "{name}"', check=False).returncode != 0
    assert errno_of(lambda: os.truncate(name, 10)) == errno.EPERM
    os.truncate(name, len(data))
    with open(name, "r+b") as f:  # O_RDWR: reads the layer, takes its own bytes
        assert f.read(100) == data[:100]
        f.seek(50)
        f.write(data[50:4096])
        f.flush()
        os.ftruncate(f.fileno(), len(data))
        assert errno_of(lambda: os.pwrite(f.fileno(), b"x", 0)) == errno.EPERM
    assert (repo / "layers" / digest_of(data)).read_bytes() == data
    assert ls(repo / "uploads") == []
    refused = [line for line in mounted.log_text().splitlines() if "never changes" in line]
    assert len(refused) == 4, refused  # dd, >>, truncate, pwrite
    assert f"uploads/{digest_of(data)} of {NAME} is the layer it finished as" in refused[0]


# ------------------------------------------------------- a renamed tag's inode number


async def test_a_renamed_tags_number_becomes_its_names_once_forgotten_and_git_sees_no_change(
    tmp_path, repo, mounted, mount
):
    # ext4: `mv a b` keeps the inode, and its number, for good. Here the kernel moves the
    # dentry with a's number (`InodeTable.rebind`), and once it forgets the inode, b is
    # numbered by its name (SipHash of what it names), as a remount numbers it: the number
    # changes once, to the one a remount would give anyway, never to one another live file
    # has. Not a bug for the tools that look at st_ino: hard-link detection (rsync -H, tar,
    # cp -a, du) looks only at files with st_nlink > 1 (a tag has 1), and a cache keyed on
    # it (git's index, backup tools) reads the file again and finds it unchanged: shown with
    # git, whose `status` stats every file of its index.
    tags = repo / "tags"
    run("cp", tags / "latest", tags / "v1")
    git = ["git", f"--git-dir={tmp_path / 'git'}", f"--work-tree={tags}"]
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    run("git", "init", "-q", "--bare", tmp_path / "git")
    run(*git, "add", "-A")
    run(*git, *ident, "commit", "-qm", "tags")
    kept = os.stat(tags / "v1").st_ino
    run("mv", tags / "v1", tags / "v2")
    assert os.stat(tags / "v2").st_ino == kept  # the kernel's dentry, moved
    run(*git, "add", "-A")
    run(*git, *ident, "commit", "-qm", "mv")
    forgotten(mounted, 1)
    renumbered = os.stat(tags / "v2").st_ino
    assert renumbered != kept
    assert run(*git, "status", "--porcelain").stdout == b""
    others = mount(tmp_path / "root").path(*NAME.split("/"), "tags")
    assert os.stat(others / "v2").st_ino == renumbered  # what a remount gives it
    assert len({os.stat(tags / tag).st_ino for tag in ls(tags)}) == len(ls(tags))


# ------------------------------------------------------- cp -a of a repository's uploads/


async def test_cp_a_of_a_repository_and_its_uploads_to_and_from_a_local_disk(
    tmp_path, repo, mounted
):
    # ext4: `cp -a dir new` makes new, then makes each subdirectory in it: a new directory is
    # empty. A new repository is not: `mkdir` makes it with its sections (SPEC 3), and cp,
    # which took it for new, does not look before its mkdir of each section: "cannot create
    # directory 'new/uploads': File exists" (the kernel's answer: the daemon never sees
    # that mkdir, so no log line). Not the daemon's to change: hiding the sections of a new
    # repository until a mkdir would break `mkdir -p org/app && cp blob
    # org/app/uploads/...`, the README's push. What works, as README says: copy into
    # the repository once it exists (`cp -a src/. repo/`), or `rsync -a`, which looks first;
    # and copying out, to a local disk, keeps every section and upload.
    data = b"the first part of a layer\n"
    run("bash", "-c", f'printf %s "{data.decode()}" > "{repo}/uploads/part"')
    local = tmp_path / "local"
    local.mkdir()
    run("cp", "-a", repo, local)
    assert sorted(ls(local / "demo")) == ["layers", "manifests", "rootfs", "tags", "uploads"]
    assert (local / "demo" / "uploads" / "part").read_bytes() == data
    new = mounted.path("library", "new")
    result = run("cp", "-a", local / "demo", new, check=False)
    assert result.returncode == 1
    assert f"cannot create directory '{new}/uploads': File exists" in result.stderr.decode()
    for target, argv in [
        (mounted.path("library", "copied"), ["cp", "-a", f"{local / 'demo' / 'uploads'}/."]),
        (mounted.path("library", "synced"), ["rsync", "-a", f"{local / 'demo' / 'uploads'}/"]),
    ]:
        run("mkdir", "-p", target)
        result = run(*argv, f"{target / 'uploads'}/", check=False)
        assert (result.returncode, result.stderr.decode()) == (0, "")
        assert (target / "uploads" / "part").read_bytes() == data
    assert (
        run("cp", "-a", repo / "uploads", mounted.path("library", "copied"), check=False).returncode
        == 0
    )
