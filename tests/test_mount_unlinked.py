"""Files that outlive their names, and uploads removed or renamed while written, driven by
bash, stat, cat, rm and mv on a real mount of a local root, as on ext4: unlink and rename act
on the name, never on an open file."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from support.mounts import Mount
from support.registry import repo_path
from support.roots import build_root
from support.s3 import MotoServer, bucket_keys
from support.tools import bash, digest_of
from support.uploads import new_repo

pytestmark = pytest.mark.mount

NAME = "library/demo"


@pytest.fixture
async def demo(tmp_path: Path, mount) -> tuple[Mount, Path, dict]:
    image = await build_root(tmp_path / "root", size=200_000)
    return mount(tmp_path / "root", "--tag-ttl", "0"), tmp_path / "root", image


def uploads_stored(root: Path) -> list[str]:
    """The upload directories in storage (what a registry or another mount would see)."""
    uploads = repo_path(root, NAME) / "_uploads"
    return sorted(os.listdir(uploads)) if uploads.exists() else []


@pytest.mark.parametrize("kind", ["layer", "tag", "upload"])
async def test_a_descriptor_reads_what_it_opened_after_rm(demo, kind):
    # `exec 3<` holds the file, rm takes its name; stat -L of /dev/fd/3 (an fstat) says 0
    # links, and cat reads every byte from the descriptor, as from an ext4 file.
    m, _, image = demo
    repo = m.path(*NAME.split("/"))
    if kind == "upload":
        path, data = repo / "uploads" / "held", b"u" * 70_000
        path.write_bytes(data)
    elif kind == "tag":
        path, data = repo / "tags" / "latest", image["manifest"]
    else:
        path, data = repo / "layers" / image["layer"], image["blobs"][image["layer"]]
    out = bash(
        f"exec 3< '{path}'; rm '{path}'; test ! -e '{path}'; stat -L -c '%h %s' /dev/fd/3; cat <&3"
    ).stdout
    links, rest = out.split(b"\n", 1)
    assert links == b"0 %d" % len(data)
    assert rest == data
    assert path.name not in os.listdir(path.parent)


async def test_a_name_back_is_the_new_file_and_the_old_descriptor_keeps_its_bytes(demo):
    # rm tags/latest while a descriptor reads it, then push latest again with another
    # manifest: the name shows the new one (one link), the old descriptor the old bytes.
    m, _, image = demo
    tag = m.path(*NAME.split("/"), "tags", "latest")
    other = json.loads(image["manifest"])
    other["annotations"] = {"again": "1"}
    other_bytes = json.dumps(other).encode()
    fd = os.open(tag, os.O_RDONLY)
    try:
        os.unlink(tag)
        tag.write_bytes(other_bytes)
        assert os.stat(tag).st_nlink == 1
        assert tag.read_bytes() == other_bytes
        assert os.pread(fd, 1 << 20, 0) == image["manifest"]
    finally:
        os.close(fd)


async def test_rm_of_an_upload_being_written_cancels_it_at_the_writers_close(demo):
    # A stopped `cp`'s upload removed: the writer goes on (its writes succeed), the name is
    # free at once for a new upload, and at the writer's close nothing of it is left.
    m, root, _ = demo
    held = m.path(*NAME.split("/"), "uploads", "held")
    out = bash(
        f"{{ head -c 3000 /dev/zero; rm '{held}'; test ! -e '{held}' && ls '{held.parent}';"
        f" echo new > '{held}'; stat -L -c %h /dev/fd/3 3>&1 >&2; head -c 5000 /dev/zero;"
        f" stat -L -c %s /dev/fd/3 3>&1 >&2; }} > '{held}'"
    )
    assert out.stderr.split() == [b"0", b"8000"]  # the writer's: unlinked, 8000 bytes
    assert held.read_bytes() == b"new\n"  # the new upload of that name, alone there
    assert os.listdir(held.parent) == ["held"]
    assert len(uploads_stored(root)) == 1  # the removed one cancelled in storage


async def test_rm_of_a_digest_named_upload_being_written_finishes_nothing(demo, tmp_path):
    # An upload named by its digest finishes at its last close; removed before, that close
    # finishes nothing (no layer), and the upload is gone from storage.
    m, root, _ = demo
    data = os.urandom(10_000)
    (tmp_path / "src").write_bytes(data)
    name = m.path(*NAME.split("/"), "uploads", digest_of(data))
    bash(f"{{ head -c 4000; rm '{name}'; cat; }} < '{tmp_path}/src' > '{name}'")
    assert not name.exists()
    assert digest_of(data) not in os.listdir(name.parent.parent / "layers")
    assert uploads_stored(root) == []


async def test_mv_of_an_upload_being_written_moves_it_under_its_writer(demo):
    # `mv` renames the upload; the writer's bytes before and after go to the new name, and
    # it stays an upload (nothing is finished by the rename or the close).
    m, root, _ = demo
    uploads = m.path(*NAME.split("/"), "uploads")
    bash(
        f"{{ printf a%.0s {{1..3000}}; mv '{uploads}/tmp' '{uploads}/moved';"
        f" printf b%.0s {{1..2000}}; }} > '{uploads}/tmp'"
    )
    assert os.listdir(uploads) == ["moved"]
    assert (uploads / "moved").read_bytes() == b"a" * 3000 + b"b" * 2000
    assert len(uploads_stored(root)) == 1


async def test_a_finish_by_rename_waits_for_the_writers_close(demo, tmp_path):
    # mv into layers/ verifies every byte, and the writer may still send more: EBUSY while
    # it holds the upload, which stays; after its close the same mv finishes it.
    m, _, _ = demo
    data = os.urandom(9000)
    (tmp_path / "src").write_bytes(data)
    repo = m.path(*NAME.split("/"))
    layer, upload = repo / "layers" / digest_of(data), repo / "uploads" / "x"
    out = bash(f"{{ cat '{tmp_path}/src'; mv '{upload}' '{layer}'; echo $? >&2; }} > '{upload}'")
    assert out.stderr.endswith(b"Device or resource busy\n1\n"), out.stderr
    assert os.listdir(upload.parent) == ["x"]
    bash(f"mv '{upload}' '{layer}'")
    assert layer.read_bytes() == data
    assert os.listdir(upload.parent) == []


@pytest.fixture
def aws_env(moto_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons' AWS chain points at moto, and at no AWS file of this machine."""
    for name, value in moto_server.environment(tmp_path).items():
        monkeypatch.setenv(name, value)


@pytest.mark.registry
async def test_on_s3_an_upload_removed_while_open(tmp_path, aws_env, moto_server, s3_bucket, mount):
    # S3 reads an upload by key and rm deletes it: a reader's next read is EIO, never other
    # bytes. Removed under its writer, the upload goes at that writer's close: no object of
    # it is left, no multipart upload either (billed for ever).
    m = mount(f"s3://{s3_bucket}/root")
    uploads = new_repo(m, "org/app") / "uploads"
    (uploads / "read").write_bytes(b"r" * 5000)
    fd = os.open(uploads / "read", os.O_RDONLY)
    try:
        os.unlink(uploads / "read")
        assert os.fstat(fd).st_nlink == 0
        with pytest.raises(OSError) as failed:
            os.pread(fd, 5000, 0)
        assert failed.value.errno == errno.EIO
    finally:
        os.close(fd)
    (tmp_path / "src").write_bytes(os.urandom(20 << 20))  # one 16 MiB part sent, the rest held
    bash(f"{{ head -c 17M; rm '{uploads}/held'; cat; }} < '{tmp_path}/src' > '{uploads}/held'")
    assert os.listdir(uploads) == []
    s3 = moto_server.client()
    assert [k for k in bucket_keys(s3, s3_bucket) if "/_uploads/" in k] == []
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


@pytest.mark.registry
async def test_over_https_an_upload_removed_or_renamed_while_written(remote_mount, tmp_path):
    # The registry keeps the upload: rm under the writer DELETEs it at the writer's close,
    # and its record goes (no upload left to list or resume); mv keeps the writer's PATCHes
    # going to the renamed upload, which `mv` into layers/ then finishes.
    m = remote_mount()
    uploads = new_repo(m, "org/app") / "uploads"
    bash(
        f"{{ head -c 3000 /dev/zero; rm '{uploads}/held'; head -c 2000 /dev/zero; }}"
        f" > '{uploads}/held'"
    )
    assert os.listdir(uploads) == []
    data = os.urandom(12_000)
    (tmp_path / "src").write_bytes(data)
    bash(
        f"{{ head -c 5000; mv '{uploads}/tmp' '{uploads}/moved'; cat; }}"
        f" < '{tmp_path}/src' > '{uploads}/tmp'"
    )
    assert os.listdir(uploads) == ["moved"]
    assert os.stat(uploads / "moved").st_size == len(data)
    bash(f"mv '{uploads}/moved' '{uploads.parent}/layers/{digest_of(data)}'")
    assert (uploads.parent / "layers" / digest_of(data)).read_bytes() == data
    assert os.listdir(uploads) == []
