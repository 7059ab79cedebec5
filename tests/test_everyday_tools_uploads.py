"""Review (stop 22): everyday tools a user runs on a mount (rsync, cp, tar, mv, cat, a
shell's redirections, Python's mmap and statvfs), and the registry's own garbage collection
beside it, compared with what a local filesystem (ext4) does.

Each `xfail(strict=True)` test is a bug found here: it fails today for the reason it names,
and passes once the mount answers as a local filesystem would (then drop its mark); the
comment at its top says what ext4 does. The tests without a mark cover what nothing else
did: reads that go on while the registry collects what they read, and `tar -c` of an
image's hard links.

Mostly what tools do into uploads/ (copies, moves, appends, a purge beside a writer); also
tags written by two processes, a remote mount's statfs and `tar -c`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from support.images import directory, file, hardlink, symlink
from support.mounts import REGFS
from support.registry import REGISTRY_BIN, RegistryServer, blob_data_path, repo_path
from support.roots import build_root, put_layer_image, variants
from support.tools import digest_of, errno_of, ls, run
from support.uploads import write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"


@pytest.fixture
async def uploads(tmp_path: Path, mount) -> Path:
    """uploads/ of a fresh root's library/demo, through a mount."""
    await build_root(tmp_path / "root", size=10_000)
    return mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"), "uploads")


def files_to_copy(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A directory of two files, as a user keeps blobs to push."""
    src = tmp_path / "src"
    src.mkdir()
    data = {"one": os.urandom(10_000), "two": os.urandom(20_000)}
    for name, body in data.items():
        write_file(src / name, body)
    return src, data


# --------------------------------------------------------------------------- uploads/


@pytest.mark.parametrize("tool", ["rsync -a", "cp -a", "tar -x"])
async def test_a_directory_copied_into_uploads_exits_0(tmp_path, uploads, tool):
    # ext4: the directory takes the source's times; every tool exits 0.
    src, data = files_to_copy(tmp_path)
    if tool == "rsync -a":
        result = run("rsync", "-a", f"{src}/", f"{uploads}/", check=False)
    elif tool == "cp -a":
        result = run("cp", "-a", f"{src}/.", f"{uploads}/", check=False)
    else:  # a tar of a directory's contents, as `tar -C dir -c .` makes it: "./" first
        run("tar", "-C", src, "-cf", tmp_path / "blobs.tar", ".")
        result = run("tar", "-C", uploads, "-xf", tmp_path / "blobs.tar", check=False)
    for name, body in data.items():  # every file arrived, today too
        assert (uploads / name).read_bytes() == body, name
    assert result.returncode == 0, result.stderr.decode()


@pytest.mark.parametrize("tool", ["install -m 644", "shutil.copy", "rsync -a --inplace"])
async def test_a_tool_that_sets_attributes_after_close_copies_a_digest_named_upload(
    tmp_path, uploads, tool
):
    # ext4: each copies, closes, then sets the mode (and rsync the times) by path; exit 0.
    data = os.urandom(30_000)
    src, dst = write_file(tmp_path / "f", data), uploads / digest_of(data)
    if tool == "install -m 644":
        result = run("install", "-m", "644", src, dst, check=False)
    elif tool == "shutil.copy":
        result = run(sys.executable, "-c", "import shutil, sys; shutil.copy(*sys.argv[1:])",
                     src, dst, check=False)  # fmt: skip
    else:
        result = run("rsync", "-a", "--inplace", src, dst, check=False)
    assert (uploads.parent / "layers" / digest_of(data)).read_bytes() == data  # today too
    assert result.returncode == 0, result.stderr.decode()


async def test_cp_of_a_sparse_file_into_uploads_is_refused_with_its_reason(tmp_path, mount):
    # Decided (SPEC §5): an upload is written in order; a write past its end, leaving a gap,
    # is EINVAL. cp seeks over a source's holes, so cp of a sparse file fails: it must say
    # so (not exit 0 with a short upload), the log must say why, and cp --sparse=never
    # (holes written as zeros) copies it. ext4 would take the gap as a hole.
    await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root")
    uploads = m.path(*NAME.split("/"), "uploads")
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(1 << 20)
        f.seek(500_000)
        f.write(b"data after a hole")
    result = run("cp", sparse, uploads / "img", check=False)
    assert result.returncode != 0
    assert "Invalid argument" in result.stderr.decode()
    assert "would leave a gap" in m.log_text()
    run("cp", "--sparse=never", sparse, uploads / "whole")
    assert (uploads / "whole").read_bytes() == sparse.read_bytes()


async def test_mv_of_an_upload_to_another_repository(tmp_path, uploads):
    # ext4: rename(2) moves it; across filesystems rename is EXDEV and mv copies + unlinks.
    data = os.urandom(50_000)
    write_file(uploads / "blob", data)
    other = uploads.parents[2] / "org" / "other"  # uploads is MNT/library/demo/uploads
    run("mkdir", "-p", other)
    result = run("mv", uploads / "blob", other / "uploads" / "blob", check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert (other / "uploads" / "blob").read_bytes() == data
    assert "blob" not in ls(uploads)


async def test_mv_of_an_upload_to_another_repository_says_nothing(tmp_path, uploads):
    # ext4 moves it in silence; across filesystems mv copies the xattrs it can, quietly.
    write_file(uploads / "blob", os.urandom(5_000))
    other = uploads.parents[2] / "org" / "other"
    run("mkdir", "-p", other)
    result = run("mv", uploads / "blob", other / "uploads" / "blob", check=False)
    assert (other / "uploads" / "blob").stat().st_size == 5_000
    assert (result.returncode, result.stderr.decode()) == (0, "")


async def test_an_append_moves_an_uploads_mtime(uploads):
    # ext4: st_mtime is the time of the last write.
    write_file(uploads / "growing", b"first part")
    time.sleep(1.1)
    appended = time.time()
    with open(uploads / "growing", "ab") as f:
        f.write(b", second part")
    assert os.stat(uploads / "growing").st_mtime >= int(appended)


async def test_mv_of_a_downloaded_file_into_uploads_says_nothing(tmp_path, uploads):
    # ext4 keeps the xattr; tmpfs without user xattrs says EOPNOTSUPP: mv prints nothing.
    downloaded = write_file(tmp_path / "layer.tar.gz", os.urandom(5_000))
    os.setxattr(downloaded, "user.xdg.origin.url", b"https://example.com/layer.tar.gz")
    result = run("mv", downloaded, uploads / "layer", check=False)
    assert (uploads / "layer").stat().st_size == 5_000
    assert (result.returncode, result.stderr.decode()) == (0, "")


async def test_a_read_after_an_append_returns_its_bytes(uploads):
    # ext4 (POSIX write(2)): once write returns, a read of those bytes through any
    # descriptor returns them, each of up to 2,048 appends (truncated every 32 MiB): no
    # read comes back short.
    size = 128 << 10
    writer = os.open(uploads / "growing", os.O_WRONLY | os.O_CREAT, 0o644)
    reader = os.open(uploads / "growing", os.O_RDONLY)
    short = None
    try:
        for i in range(2048):
            at = (i % 256) * size
            if at == 0:
                os.ftruncate(writer, 0)
            chunk = bytes([i % 251 + 1]) * size
            os.pwrite(writer, chunk, at)
            if (got := os.pread(reader, size, at)) != chunk:
                short = (i, len(got))
                break
    finally:
        os.close(reader)
        os.close(writer)
    assert short is None, f"append {short[0]}: a read gave {short[1]} of its {size} bytes"


# ------------------------------------------------------------------- writers of tags and uploads


@pytest.mark.parametrize("section", ["tags", "uploads"])
async def test_a_file_written_by_two_processes_in_turn(tmp_path, mount, section):
    # ext4: a close is the end of nothing while another descriptor is open; both cat exit 0.
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    whole = image["manifest"] if section == "tags" else os.urandom(100_000)
    half = len(whole) // 2
    first, second = (
        write_file(tmp_path / "a", whole[:half]),
        write_file(tmp_path / "b", whole[half:]),
    )
    name = "v2" if section == "tags" else digest_of(whole)
    script = f'{{ cat "{first}"; cat "{second}"; }} > "{repo / section / name}"'
    result = run("bash", "-ec", script, check=False)
    assert result.returncode == 0, result.stderr.decode()
    done = repo / "tags" / "v2" if section == "tags" else repo / "layers" / name
    assert done.read_bytes() == whole


@pytest.mark.parametrize("tool", ["cp -p", "rsync -a --inplace"])
async def test_a_manifest_file_of_mode_600_copied_to_a_tag_exits_0(tmp_path, mount, tool):
    # ext4: the copy takes mode 600 and the tool exits 0.
    image = await build_root(tmp_path / "root", size=10_000)
    tags = mount(tmp_path / "root").path(*NAME.split("/"), "tags")
    src = write_file(tmp_path / "manifest.json", image["manifest"])
    src.chmod(0o600)
    result = run(*tool.split(), src, tags / "v2", check=False)
    assert (tags / "v2").read_bytes() == image["manifest"]  # stored, today too
    assert result.returncode == 0, result.stderr.decode()


async def test_a_tag_truncated_by_open_and_left_empty_is_refused(tmp_path, mount):
    # ext4: the file is empty after it. An empty manifest cannot be stored, so the close
    # should fail as `truncate -s 0 tags/v1` does (EINVAL).
    image = await build_root(tmp_path / "root", size=10_000)
    tag = mount(tmp_path / "root").path(*NAME.split("/"), "tags", "latest")
    fd = os.open(tag, os.O_WRONLY | os.O_TRUNC)
    closed = errno_of(lambda: os.close(fd))
    assert tag.read_bytes() == image["manifest"]  # today too: nothing was stored
    assert closed == errno.EINVAL


async def test_two_writers_of_one_tag_the_last_to_close_wins(tmp_path, mount):
    # ext4: both opens succeed and the file holds what was written last; the registry's
    # PUT of two manifests under one tag at once stores both, the tag on the last.
    image = await build_root(tmp_path / "root", size=10_000)
    variant = variants(image, 1)[0]
    tag = mount(tmp_path / "root").path(*NAME.split("/"), "tags", "latest")
    fds = [os.open(tag, os.O_WRONLY | os.O_TRUNC)]
    try:
        fds.append(os.open(tag, os.O_WRONLY | os.O_TRUNC))  # a second writer: no EBUSY
        for fd, body in zip(fds, (image["manifest"], variant), strict=True):
            os.write(fd, body)
    finally:
        for fd in fds:
            os.close(fd)
    assert tag.read_bytes() == variant


async def test_purge_uploads_leaves_an_upload_being_written(tmp_path, mount):
    # The mount itself refuses rm of an upload being written (EBUSY); on ext4 a file a
    # writer holds open keeps every byte it writes until it closes.
    root = tmp_path / "root"
    await build_root(root, size=10_000)
    uploads = mount(root).path(*NAME.split("/"), "uploads")
    fd = os.open(uploads / "slow", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"first half, ")
        time.sleep(1.1)
        purge = run(REGFS, "purge-uploads", root, "--older-than", "1s")
        os.write(fd, b"second half")
    finally:
        os.close(fd)
    assert (uploads / "slow").read_bytes() == b"first half, second half", purge.stdout


# --------------------------------------------------------------------------- https://


@pytest.mark.registry
@pytest.mark.remote
def test_reading_an_upload_on_a_remote_mount_gives_its_bytes_or_fails(tmp_path, remote_mount):
    # ext4: the bytes written; a filesystem that cannot read them back says so (an errno).
    m = remote_mount()
    uploads = m.path("h3", "remote", "uploads")
    run("mkdir", "-p", uploads.parent)
    data = os.urandom(100_000)
    run("cp", write_file(tmp_path / "blob", data), uploads / "blob")
    assert (uploads / "blob").stat().st_size == len(data)
    result = run("cat", uploads / "blob", check=False)
    assert result.returncode != 0 or result.stdout == data, len(result.stdout)


@pytest.mark.registry
@pytest.mark.remote
def test_statfs_of_a_remote_mount_has_a_block_size(remote_mount):
    # Every local filesystem gives f_bsize and f_frsize > 0; tools divide by them, and
    # (as with s3fs and rclone) free space unknown is better said as plenty than as none.
    st = os.statvfs(remote_mount().mountpoint)
    assert st.f_bsize > 0 and st.f_frsize > 0 and st.f_bavail > 0, st


# --------------------------------------------------------------------------- mmap


@pytest.mark.parametrize(
    "section",
    [
        pytest.param(
            "tags",
            marks=pytest.mark.xfail(
                strict=True,
                reason="a shared mmap of a tag is ENODEV: tags are read with direct_io (a tag "
                "read through the page cache could be cut or mixed with the manifest it points "
                "at after a move: tests/test_mount_page_cache.py); uploads, layers and manifests "
                "map",
            ),
        ),
        "uploads",
    ],
)
async def test_python_mmap_of_a_tag_or_an_upload(tmp_path, mount, section):
    # ext4: mmap(MAP_SHARED, PROT_READ) of any regular file maps it (Python's default).
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root").path(*NAME.split("/"))
    write_file(repo / "uploads" / "blob", b"an upload's bytes")
    path = repo / "tags" / "latest" if section == "tags" else repo / "uploads" / "blob"
    want = image["manifest"] if section == "tags" else b"an upload's bytes"
    layer = repo / "layers" / image["layer"]
    with open(layer, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:100] == image["blobs"][image["layer"]][:100]  # a layer maps, today too
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == want  # a tag: mmap raises ENODEV (its mark says why)


# --------------------------------------------------------------------- beside the registry


@pytest.mark.registry
async def test_reads_go_on_while_the_registry_collects_their_blobs(
    tmp_path, registry_server: RegistryServer, mount
):
    """A layer and a file of its image, opened and half read, then the image untagged and
    `docker-registry garbage-collect --delete-untagged` deletes their blob: both read on to
    their end with the right bytes (as an unlinked file on ext4 does), and a new open is
    ENOENT once the tag TTL has passed."""
    root = registry_server.root
    big = os.urandom(3 << 20)
    manifest = await put_layer_image(root, NAME, "gone", [directory("etc"), file("etc/big", big)])
    layer = json.loads(manifest)["layers"][0]["digest"]
    await build_root(root, size=10_000)  # a tagged image gc keeps
    repo_dir = repo_path(root, NAME)
    m = mount(root, "--tag-ttl", "0.5")
    repo = m.path(*NAME.split("/"))
    whole = (repo / "layers" / layer).read_bytes()
    with (
        open(repo / "layers" / layer, "rb", buffering=0) as blob,
        open(repo / "rootfs" / "gone" / "etc" / "big", "rb", buffering=0) as member,
    ):
        heads = blob.read(1 << 20), member.read(1 << 20)
        registry_server.stop()  # garbage-collect wants the registry stopped
        untag(repo_dir, "gone")
        gc = subprocess.run(
            [REGISTRY_BIN, "garbage-collect", "--delete-untagged", registry_server.config_path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert gc.returncode == 0, gc.stdout + gc.stderr
        assert not blob_data_path(root, layer).exists()
        assert heads[0] + blob.read() == whole
        assert heads[1] + member.read() == big
    time.sleep(0.6)
    assert errno_of(lambda: open(repo / "layers" / layer, "rb").close()) == errno.ENOENT
    assert errno_of(lambda: os.stat(repo / "rootfs" / "gone")) == errno.ENOENT
    assert ls(repo / "tags") == ["latest"]


def untag(repo_dir: Path, tag: str) -> None:
    """What a tag delete leaves (the registry's own API has none in 2.8): the tag's
    directory gone, its manifest untagged."""
    run("rm", "-r", repo_dir / "_manifests" / "tags" / tag)


# --------------------------------------------------------------------------- tar -c


async def test_tar_c_of_a_repository_exits_0(tmp_path, mount):
    # ext4: a directory nobody changes keeps its mtime and ctime; tar exits 0.
    await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root").path(*NAME.split("/"))
    out = tmp_path / "repo.tar"
    result = run("tar", "-C", repo, "-cf", out, "layers", "manifests", "tags", check=False)
    with tarfile.open(out) as tar:  # every file is in it, today too
        assert len([m for m in tar.getmembers() if m.isfile()]) == 4
    assert result.returncode == 0, result.stderr.decode()


# --------------------------------------------------------------------------- rootfs/


async def test_tar_c_of_an_image_keeps_its_hard_links(tmp_path, mount):
    """`tar -c` of rootfs/<tag> writes a hard link as a link to the first name (one
    inode, `st_nlink` 2), a symlink as a symlink, and each file's bytes once."""
    body = b"#!/bin/sh\necho tool\n"
    entries = [
        directory("bin"),
        file("bin/tool", body, mode=0o755),
        hardlink("bin/tool2", "bin/tool"),
        symlink("bin/sh", "tool"),
    ]
    await put_layer_image(tmp_path / "root", NAME, "v1", entries)
    image = mount(tmp_path / "root").path(*NAME.split("/"), "rootfs", "v1")
    run("tar", "-C", image, "-cf", tmp_path / "image.tar", "bin")
    with tarfile.open(tmp_path / "image.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["bin/tool"].isfile() and members["bin/tool"].size == len(body)
        assert members["bin/tool2"].islnk() and members["bin/tool2"].linkname == "bin/tool"
        assert members["bin/sh"].issym() and members["bin/sh"].linkname == "tool"
        extracted = tar.extractfile("bin/tool")
        assert extracted is not None and extracted.read() == body
