"""The name of an upload that finished at its close (`cp blob uploads/sha256:<hex>`) resolves
for a few seconds to the layer it became (regfs/nodes.py `FinishedNode`), so that what a
copying tool does by path after the close (chmod, utimes, stat) finds a file: read-only,
not listed, its chmod and times accepted and ignored, `rm` drops the name (the layer stays),
`mv` into layers/ under its digest drops the name, `mv` into uploads/ copies it, an open
with O_TRUNC starts a new upload of that name, as a create does, and any other open for
writing gets the layer, which takes only the bytes it holds (EPERM for any other: the upload
finished, the layer never changes; tests/test_everyday_tools_finished_layers.py)."""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path

import pytest
import trio
from support.roots import build_root
from support.tools import digest_of, errno_of, ls, run
from support.uploads import write_file

from regfs import tree as tree_module
from regfs.nodes import FinishedNode, NotFound, SectionNode, UploadNode
from regfs.tree import Tree
from storage.digests import Digest, digest_bytes
from storage.drivers import InMemoryDriver
from storage.registry import Registry

NAME = "library/demo"


@pytest.fixture
async def repo(tmp_path: Path, mount) -> Path:
    """library/demo of a fresh root, through a mount."""
    await build_root(tmp_path / "root", size=10_000)
    return mount(tmp_path / "root").path(*NAME.split("/"))


def copied(tmp_path: Path, uploads: Path, data: bytes) -> Path:
    """`cp` of data into uploads/<its digest>, which finishes it: that name."""
    dst = uploads / digest_of(data)
    run("cp", write_file(tmp_path / "blob", data), dst)
    assert (uploads.parent / "layers" / digest_of(data)).read_bytes() == data
    return dst


@pytest.mark.mount
async def test_the_name_shows_the_layer_read_only_and_is_not_listed(tmp_path, repo):
    data = os.urandom(30_000)
    name = copied(tmp_path, repo / "uploads", data)
    st = os.stat(name)
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(data)
    assert name.read_bytes() == data
    assert os.getxattr(name, "user.regfs.digest").decode() == digest_of(data)
    assert digest_of(data) not in ls(repo / "uploads")  # it is no upload
    run("chmod", "600", name)  # accepted and ignored, as on a tag
    run("touch", "-d", "2001-01-01", name)
    assert os.stat(name)[:9] == st[:9]
    assert errno_of(lambda: os.truncate(name, 0)) == errno.EPERM
    assert (repo / "layers" / digest_of(data)).read_bytes() == data


@pytest.mark.mount
@pytest.mark.parametrize("tool", ["cp", "shutil.copy"])
async def test_a_second_copy_of_the_same_blob_to_the_name_exits_0(tmp_path, repo, tool):
    """The name is there (the first copy's): the tool opens it with O_TRUNC, which begins a
    new upload of that name, as a create does; it finishes at its close."""
    data = os.urandom(30_000)
    name = copied(tmp_path, repo / "uploads", data)
    src = write_file(tmp_path / "again", data)
    if tool == "shutil.copy":
        code = "import shutil, sys; shutil.copy(*sys.argv[1:])"
        result = run(sys.executable, "-c", code, src, name, check=False)
    else:
        result = run(tool, src, name, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert name.read_bytes() == data
    assert ls(repo / "uploads") == []


@pytest.mark.mount
async def test_an_open_for_writing_without_o_trunc_changes_nothing_and_touch_exits_0(
    tmp_path, repo
):
    """The upload finished: there is nothing to resume, and a new upload begun by `touch`
    (O_WRONLY|O_CREAT) would be left empty under the name. The open gets the layer, which
    takes no other bytes; touch sets the times (accepted and ignored) and exits 0; `>>`
    fails (EPERM)."""
    data = os.urandom(30_000)
    name = copied(tmp_path, repo / "uploads", data)
    os.close(os.open(name, os.O_WRONLY))
    result = run("touch", name, check=False)
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert run("bash", "-c", f'echo more >> "{name}"', check=False).returncode != 0
    assert ls(repo / "uploads") == []
    assert name.read_bytes() == data


@pytest.mark.mount
async def test_other_bytes_copied_to_the_name_are_refused_and_stay_as_an_upload(tmp_path, repo):
    """As a create of that name: a new upload, which does not match its name at close
    (EIO) and stays for a resume or an rm."""
    data = os.urandom(30_000)
    name = copied(tmp_path, repo / "uploads", data)
    result = run("cp", write_file(tmp_path / "other", b"other bytes"), name, check=False)
    assert result.returncode != 0
    assert ls(repo / "uploads") == [digest_of(data)]
    assert name.read_bytes() == b"other bytes"
    run("rm", name)
    assert ls(repo / "uploads") == []
    assert (repo / "layers" / digest_of(data)).read_bytes() == data


@pytest.mark.mount
async def test_rm_of_the_name_drops_the_name_and_leaves_the_layer(tmp_path, repo):
    data = os.urandom(30_000)
    name = copied(tmp_path, repo / "uploads", data)
    run("rm", name)
    assert errno_of(lambda: os.stat(name)) == errno.ENOENT
    assert (repo / "layers" / digest_of(data)).read_bytes() == data
    assert digest_of(data) in ls(repo / "layers")


@pytest.mark.mount
async def test_mv_of_the_name_into_layers_or_uploads(tmp_path, repo):
    """Into layers/ under its digest (what a script does to finish an upload): done, the
    layer was there; under another digest: EINVAL, the name stays. Into uploads/ under
    another name: a copy (EXDEV; mv copies the bytes into a new upload, then removes the
    name)."""
    uploads, layers = repo / "uploads", repo / "layers"
    data = os.urandom(30_000)
    name = copied(tmp_path, uploads, data)
    wrong = run("mv", name, layers / digest_of(b"other"), check=False)
    assert wrong.returncode != 0  # EINVAL, which mv words "a subdirectory of itself"
    assert name.stat().st_size == len(data)
    run("mv", name, layers / digest_of(data))
    assert errno_of(lambda: os.stat(name)) == errno.ENOENT
    assert (layers / digest_of(data)).read_bytes() == data

    name = copied(tmp_path, uploads, data)
    result = run("mv", name, uploads / "kept", check=False)
    assert (result.returncode, result.stderr.decode()) == (0, "")
    assert ls(uploads) == ["kept"]
    assert (uploads / "kept").read_bytes() == data


@pytest.mark.storage
async def test_a_name_resolves_for_the_grace_and_only_the_newest_are_held(monkeypatch):
    """Bounded in time (FINISHED_GRACE) and count (FINISHED_KEPT, the oldest dropped); a
    finish by a rename into layers/ keeps no name."""
    monkeypatch.setattr(tree_module, "FINISHED_GRACE", 0.5)
    monkeypatch.setattr(tree_module, "FINISHED_KEPT", 2)
    tree = Tree(Registry(InMemoryDriver()), tag_ttl=0)
    uploads = SectionNode("a/b", "uploads")

    async def finish(data: bytes, named: bool = True) -> Digest:
        digest = digest_bytes(data)
        node, upload = await tree.create_upload("a/b", str(digest))
        assert isinstance(node, UploadNode)
        await upload.write_at(0, data)
        await tree.finish_upload(node, upload, digest, named)
        await upload.close()
        return digest

    digests = [await finish(bytes([i]) * 100) for i in range(3)]
    renamed = await finish(b"renamed", named=False)
    with pytest.raises(NotFound):  # the oldest of three: dropped
        await tree.lookup(uploads, str(digests[0]))
    for digest in digests[1:]:
        assert await tree.lookup(uploads, str(digest)) == FinishedNode("a/b", digest)
    with pytest.raises(NotFound):
        await tree.lookup(uploads, str(renamed))
    await trio.sleep(0.6)
    for digest in digests[1:]:
        with pytest.raises(NotFound):
            await tree.lookup(uploads, str(digest))
