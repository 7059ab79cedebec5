"""Tools that replace a file unlink it, then create it again (`cp -f` over a file it cannot
open, `install`, `tar -x`, `cp --remove-destination`, `mv` from another disk): what the
create of layers/<digest> is, and what the daemon remembers of the tags an unlink deleted
(stop 25, f1; r1's findings in tests/test_everyday_tools_overwrites.py are the tools themselves)."""

from __future__ import annotations

import errno
import os

import pytest
from support.roots import build_root, put_tagged, variants
from support.tools import digest_of, ls, open_errno, run
from support.uploads import upload_uuids, write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"


async def test_a_created_layer_whose_bytes_are_not_its_name_links_nothing_and_leaves_nothing(
    tmp_path, mount
):
    # SPEC 5's finish by name, but the upload was never asked for under uploads/: close()
    # fails EIO and the upload is cancelled, so nothing is linked and nothing is left.
    await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    name = digest_of(b"what the name says\n")
    result = run(
        "cp", write_file(tmp_path / "other", b"other bytes\n"), repo / "layers" / name, check=False
    )
    assert result.returncode != 0
    assert b"Input/output error" in result.stderr
    assert name not in ls(repo / "layers")
    assert ls(repo / "uploads") == []
    assert upload_uuids(tmp_path / "root", NAME) == []


async def test_a_created_layer_of_its_own_bytes_is_linked_and_no_upload_is_left(tmp_path, mount):
    await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    blob = os.urandom(100_000)
    layer = repo / "layers" / digest_of(blob)
    run("cp", write_file(tmp_path / "blob", blob), layer)
    assert layer.read_bytes() == blob
    assert ls(repo / "uploads") == []
    assert upload_uuids(tmp_path / "root", NAME) == []
    empty = repo / "layers" / digest_of(b"")  # nothing written: the empty layer, linked
    run("cp", "/dev/null", empty)
    assert empty.read_bytes() == b""


async def test_a_created_layer_removed_while_written_links_nothing(tmp_path, mount):
    await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    blob = b"a layer\n"
    layer = repo / "layers" / digest_of(blob)
    with open(layer, "wb") as out:
        out.write(blob)
        out.flush()
        os.unlink(layer)  # its name goes now; its writer's close cancels the upload
    assert digest_of(blob) not in ls(repo / "layers")
    assert upload_uuids(tmp_path / "root", NAME) == []


async def test_other_writes_to_layers_stay_refused(tmp_path, mount):
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    linked = repo / "layers" / image["layer"]
    assert open_errno(linked, os.O_RDWR) == errno.EPERM
    assert open_errno(repo / "layers" / "blob", os.O_WRONLY | os.O_CREAT) == errno.EPERM
    assert ls(repo / "layers") == sorted(image["blobs"])


async def test_rm_of_a_manifest_deletes_its_tags_and_storing_it_again_points_them_back(
    tmp_path, mount
):
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    run("cp", repo / "tags" / "latest", repo / "tags" / "v1")
    # One process unlinks, then creates (as cp -f and install do): this test's own.
    os.unlink(repo / "manifests" / image["digest"])
    assert ls(repo / "tags") == []  # SPEC 6, as before
    write_file(repo / "manifests" / image["digest"], image["manifest"])
    assert ls(repo / "tags") == ["latest", "v1"]
    assert (repo / "tags" / "v1").read_bytes() == image["manifest"]


async def test_a_tag_set_meanwhile_is_left_alone(tmp_path, mount):
    # By anyone: another client of the registry sets it between the unlink and the create.
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    [other] = variants(image, 1)
    repo = mount(root, "--tag-ttl", "0").path(*NAME.split("/"))
    # One process unlinks, then creates (this test's own, as cp -f would).
    os.unlink(repo / "manifests" / image["digest"])
    await put_tagged(root, NAME, "latest", other)
    write_file(repo / "manifests" / image["digest"], image["manifest"])
    assert (repo / "tags" / "latest").read_bytes() == other
    os.unlink(repo / "tags" / "latest")  # remembered: latest named `other`
    await put_tagged(root, NAME, "latest", image["manifest"])
    with pytest.raises(OSError) as refused:
        write_file(repo / "tags" / "latest", b'{"schemaVersion": 2}')
    assert refused.value.errno == errno.EINVAL
    assert (repo / "tags" / "latest").read_bytes() == image["manifest"]  # not `other`


async def test_a_retag_is_not_undone_by_a_refused_create(tmp_path, mount):
    # Only an unlink is remembered: `mv tags/latest tags/v1` deletes latest for good.
    image = await build_root(tmp_path / "root", size=10_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    run("mv", repo / "tags" / "latest", repo / "tags" / "v1")
    bad = write_file(tmp_path / "bad", b'{"schemaVersion": 2}')
    assert run("cp", bad, repo / "tags" / "latest", check=False).returncode
    assert ls(repo / "tags") == ["v1"]
    assert (repo / "tags" / "v1").read_bytes() == image["manifest"]


async def test_cp_f_of_other_bytes_over_a_layer_keeps_it_linked(tmp_path, mount):
    # cp -f cannot open the layer to write (EPERM), so it unlinks it and creates it again:
    # the bytes are another's, refused (EIO), and the layer it unlinked is linked again,
    # as a refused manifest puts back the tag an unlink took (was: the image lost it).
    image = await build_root(tmp_path / "root", size=10_000)
    m = mount(tmp_path / "root", "--tag-ttl", "0")
    repo = m.path(*NAME.split("/"))
    layer = repo / "layers" / image["layer"]
    before = layer.read_bytes()
    result = run("cp", "-f", write_file(tmp_path / "other", b"other\n"), layer, check=False)
    assert result.returncode != 0
    assert b"Input/output error" in result.stderr
    assert layer.read_bytes() == before
    assert ls(repo / "layers") == sorted(image["blobs"])
    assert "linked again" in m.log.read_text()
    # An rm alone stays an rm: only a refused create of the name undoes it.
    run("rm", layer)
    assert image["layer"] not in ls(repo / "layers")
