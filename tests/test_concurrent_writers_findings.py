"""Review (stop 26, c): what landed at stop 25 read as an adversary (d966217 the catalog's
namespaces, d1c3aed everyday tools, 36687ea a refused layer linked again, 669e05a a remote
DELETE retried).

Each `xfail(strict=True)` test is a finding: it fails today for the reason it names, and
passes once regfs answers as the reason says it should (then drop its mark). Worst first.

Mostly a write (refused, repeated, a retag) that must not undo what another process did
meanwhile; also a deep empty namespace in the root, `ls` of a namespace on S3, and `rm -r`
of many small namespaces.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from support.fault_server import FaultServer
from support.roots import add_repositories, build_root, variants
from support.s3 import MotoServer, s3_call
from support.tools import errno_of, ls, run
from support.uploads import write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"


def finding(reason: str) -> pytest.MarkDecorator:
    """A finding of this review: a strict xfail whose reason says what happens and what
    should."""
    return pytest.mark.xfail(strict=True, reason=reason)


# --------------------------------------------------------------- the catalog (d966217)


def deep_namespace(root: Path, top: str, depth: int) -> Path:
    """repositories/<top>/a/a/…: `depth` empty directories, made one below the other (no
    path is ever longer than one name: a root's owner is bound by no PATH_MAX)."""
    fd = os.open(root / "docker/registry/v2/repositories", os.O_DIRECTORY)
    try:
        for name in [top] + ["a"] * depth:
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    return root / "docker/registry/v2/repositories" / top


async def test_a_deep_empty_namespace_in_the_root_leaves_the_mount_working(tmp_path, mount):
    # A root's owner is hostile (docs/security.md, 2). `Catalog.holds_repository` recursed
    # (d966217) one Python frame pair per level to learn whether a namespace holds a
    # repository: ~1,000 empty directories below one name raised RecursionError inside the
    # root's listing (an ExceptionGroup out of `children`'s nursery), so getattr of the
    # mount's root was EIO, `regfs mount` failed ("the main loop failed; unmounting"), and
    # a mount already up answered EIO to `ls MOUNT` and to every lookup of that name. Now
    # the walk is iterative and stops where a name could no longer be a repository's
    # (MAX_NAME_LENGTH, 255): the mount comes up and lists library/ alone, as the
    # registry's _catalog does; a repository as deep as a name may go is still found.
    await build_root(tmp_path / "root", size=1000)
    evil = deep_namespace(tmp_path / "root", "evil", 1100)
    deep = "/".join(["ns", *["a"] * 120])  # 243 characters, r00000 below: 250
    add_repositories(tmp_path / "root", deep, 1)
    try:
        m = mount(tmp_path / "root")
        assert ls(m.path()) == ["library", "ns"]
        assert not m.path("evil").exists()
        assert ls(m.path(*deep.split("/"))) == ["r00000"]
    finally:
        run("rm", "-rf", evil)  # fts: shutil.rmtree of the basetemp would recurse too deep


# ------------------------------------------------ a layer created over itself (d1c3aed)


@pytest.mark.parametrize("how", ["rm", "mv"])
async def test_a_layer_being_created_is_not_lost_through_its_uploads_name(tmp_path, mount, how):
    # ext4: what happens in another directory does not touch a file being written. Here
    # the create of layers/<d> is an upload labelled <d> (OpenFiles.create, `layer=True`),
    # listed in uploads/ and acted on there as any upload: `remove_written` cancels it at
    # its last close (UploadHandle.flush: no EIO, no `layer_refused`), `renamed` gives the
    # handle another name, so `ends_on_close` is False. The image lost its layer and the
    # tool that rewrote it exited 0. Now both are EBUSY (logged): its close links it.
    image = await build_root(tmp_path / "root", size=100_000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    layer = image["layer"]
    data = image["blobs"][layer]
    os.unlink(repo / "layers" / layer)  # what cp -f and install do first
    fd = os.open(repo / "layers" / layer, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data[:50_000])
        assert ls(repo / "uploads") == [layer]
        if how == "rm":
            assert errno_of(lambda: os.unlink(repo / "uploads" / layer)) == errno.EBUSY
        else:
            uploads = repo / "uploads"
            assert errno_of(lambda: os.rename(uploads / layer, uploads / "x")) == errno.EBUSY
        os.write(fd, data[50_000:])
    finally:
        os.close(fd)  # was 0 with the layer lost; now it is linked
    assert layer in ls(repo / "layers")
    assert (repo / "layers" / layer).read_bytes() == data


# ------------------------------------------- what a refused write puts back (d1c3aed, 36687ea)


async def test_a_refused_tag_write_does_not_undo_another_processs_rm(tmp_path, mount):
    # ext4 (tags/ as symlinks): `rm tags/latest`, then a `cp bad tags/latest` that fails
    # leaves latest gone. It pointed at the old manifest again ("its new manifest
    # refused"); now only the process whose own unlink took it (cp -f, install) puts it back.
    await build_root(tmp_path / "root", size=1000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    run("rm", repo / "tags" / "latest")
    bad = write_file(tmp_path / "bad.json", b'{"schemaVersion": 2}')
    assert run("cp", bad, repo / "tags" / "latest", check=False).returncode != 0
    assert ls(repo / "tags") == []


async def test_a_refused_layer_write_does_not_relink_what_another_process_removed(tmp_path, mount):
    # `rm layers/<d>` is how a user withdraws a layer from a repository (a leaked secret,
    # a wrong base): the blob stays for the garbage collection. Any later `cp junk
    # layers/<d>` (a script's retry, another user's mistake) fails with EIO and linked
    # the layer again, so the next garbage collection kept it; now only the process whose
    # own unlink took it relinks it.
    image = await build_root(tmp_path / "root", size=1000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    layer = image["layer"]
    run("rm", repo / "layers" / layer)
    junk = write_file(tmp_path / "junk", b"junk")
    assert run("cp", junk, repo / "layers" / layer, check=False).returncode != 0
    assert layer not in ls(repo / "layers")


async def test_storing_a_manifest_again_does_not_bring_back_tags_another_process_deleted(
    tmp_path, mount
):
    # The put-back is for `install`/`cp -f` of a manifest's own bytes (one process unlinks,
    # then creates). A user who deletes an image (`rm manifests/<d>`, its tags with it) and
    # a CI job that pushes that manifest by digest a moment later (an index's child, a
    # mirror) are two processes: latest pointed at it again, silently (now: not).
    image = await build_root(tmp_path / "root", size=1000)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    run("rm", repo / "manifests" / image["digest"])
    own = write_file(tmp_path / "manifest.json", image["manifest"])
    run("cp", own, repo / "manifests" / image["digest"])
    assert image["digest"] in ls(repo / "manifests")
    assert ls(repo / "tags") == []


async def test_a_tag_set_by_a_retag_is_not_put_back_at_its_older_manifest(tmp_path, mount):
    # ext4 (tags/ as symlinks): after `mv tags/latest tags/v2`, latest is gone, and a
    # `cp bad tags/latest` that fails leaves it gone. latest pointed again at the manifest
    # it named before the retag, older than what v2 holds: Tree.retag left
    # _unlinked_tags as it was (put_tag pops it). A set through the mount ends the put-back.
    image = await build_root(tmp_path / "root", size=1000)
    [other] = variants(image, 1)
    repo = mount(tmp_path / "root", "--tag-ttl", "0").path(*NAME.split("/"))
    run("rm", repo / "tags" / "latest")  # remembered: latest named image
    run("cp", write_file(tmp_path / "other.json", other), repo / "tags" / "tmp")
    run("mv", repo / "tags" / "tmp", repo / "tags" / "latest")  # latest names other
    run("mv", repo / "tags" / "latest", repo / "tags" / "v2")  # latest gone for good
    bad = write_file(tmp_path / "bad.json", b'{"schemaVersion": 2}')
    assert run("cp", bad, repo / "tags" / "latest", check=False).returncode != 0
    assert ls(repo / "tags") == ["v2"]


# ----------------------------------------------- what the catalog costs (d966217)


def test_ls_of_a_namespace_on_s3_is_a_listing_not_a_request_per_repository(
    tmp_path, moto_server: MotoServer, s3_bucket, monkeypatch, mount
):
    # docs/scale-out.md: S3 lists 1,000 keys a request; test_s3.py's
    # test_ls_of_tags_asks_each_directory_once states `ls` of a namespace is one listing
    # (of one repository). A namespace of 10,000 is 10,000 requests at each cold `ls`
    # (after --tag-ttl too): ~10 s at 30 ms a request, 32 at once.
    for name, value in moto_server.environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    s3 = moto_server.client()
    for i in range(200):
        key = f"regroot/docker/registry/v2/repositories/many/r{i:05d}/_layers/sha256/{i:064x}/link"
        s3.put_object(Bucket=s3_bucket, Key=key, Body=f"sha256:{i:064x}".encode())
    with FaultServer(upstream=moto_server.url) as proxy:
        m = mount(f"s3://{s3_bucket}/regroot", "-o", f"s3_endpoint={proxy.url}")
        proxy.seen.clear()
        assert len(ls(m.path("many"))) == 200
        calls = [s3_call(seen) for seen in proxy.seen]
    assert len(calls) <= 3, f"{len(calls)} requests: {sorted(set(calls))}"


async def test_rm_r_of_many_small_namespaces_sleeps_for_none(tmp_path, mount):
    # ext4: rm -r of 30 directories is milliseconds. Tree._namespaces_emptied awaited
    # trio.sleep(0.1) for the kernel's listing above after each rmdir that emptied a
    # namespace: `rm -r org` of org/team00/r00000 … org/team29/r00000 slept 30+ times in a
    # row (rm waits for each rmdir). 0.51 s at b1621ff, 4.2 s at d966217 (load 4). It
    # waits now only for a listing the kernel read after the last rmdir it saw there
    # (KeptListings.may_hold): each namespace's own rmdir makes the kernel read org again.
    await build_root(tmp_path / "root", size=1000)
    for i in range(30):
        add_repositories(tmp_path / "root", f"org/team{i:02d}", 1)
    m = mount(tmp_path / "root", "--tag-ttl", "0")
    assert len(ls(m.path("org"))) == 30
    started = time.monotonic()
    run("rm", "-r", m.path("org"))
    took = time.monotonic() - started
    assert ls(m.path()) == ["library"]
    assert took < 2.0, f"rm -r took {took:.1f} s"
