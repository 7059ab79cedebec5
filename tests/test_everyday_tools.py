"""Everyday tools on the write side (issue 14), through a real mount.

`rsync -a`, `cp -p`, `cp -a`, `install`, `chmod`, `chown`, `touch -d`, `sed -i`, `vim -e` and
shell redirections run as their own processes, as a user would run them. After each, the
storage root is checked, and where it matters the real registry serving the same root: what
the tools wrote is what a `docker pull` would get, and nothing else was left behind.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from support.registry import OCI_INDEX, RegistryClient, RegistryServer, blob_data_path, repo_path
from support.roots import build_root
from support.snapshots import snapshot
from support.tools import (
    bash,
    digest_of,
    ls,
    run,
    sha256sum,
)
from support.uploads import upload_uuids, write_file

pytestmark = pytest.mark.mount

NAME = "library/demo"
PAST = 1_000_000_000  # 2001-09-09: an mtime no upload has by itself


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def tag_dirs(root: Path) -> list[str]:
    """The tags in storage itself: a temporary tag a tool left behind would show here."""
    return sorted(os.listdir(repo_path(root, NAME) / "_manifests" / "tags"))


def source(tmp_path: Path, name: str, size: int, mode: int) -> tuple[Path, bytes]:
    """A file to copy in, with its own mode and an mtime in the past."""
    data = os.urandom(size)
    path = write_file(tmp_path / "src" / name, data)
    path.chmod(mode)
    os.utime(path, (PAST, PAST))
    return path, data


def edited(manifest: bytes, value: str) -> bytes:
    """The manifest with an annotation, as the sed and vim commands below write it."""
    return manifest.replace(b'"schemaVersion": 2', f'"schemaVersion": 2, "a": "{value}"'.encode())


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


# --------------------------------------------------------------------------- uploads/


@pytest.mark.registry
async def test_rsync_a_into_uploads_then_mv_to_layers(
    tmp_path, src, registry_server: RegistryServer, client: RegistryClient, mount
):
    """`rsync -a` writes `.NAME.XXXXXX`, sets its mode, owner and mtime, and renames it to
    NAME: each file arrives under its own name with the source's mode and mtime, a second
    run finds nothing to do, and `mv` to layers/ finishes each one. The registry on the
    same root then serves every blob."""
    root = registry_server.root
    await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    uploads, layers = m.path("library", "demo", "uploads"), m.path("library", "demo", "layers")
    files = {
        name: source(tmp_path, name, size, mode)
        for name, size, mode in (
            ("a", 70_000, 0o600),
            ("b", 3 * 1024 * 1024, 0o644),
            ("c", 1, 0o755),
        )
    }

    run("rsync", "-a", *(path for path, _ in files.values()), f"{uploads}/")
    assert ls(uploads) == ["a", "b", "c"]  # no `.a.XXXXXX` left
    for name, (path, data) in files.items():
        assert (uploads / name).read_bytes() == data
        st = os.stat(uploads / name)
        assert (stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (mode_of(path), PAST), name
    # Size and mtime match: rsync's quick check finds nothing to send.
    again = run("rsync", "-ai", *(path for path, _ in files.values()), f"{uploads}/")
    assert again.stdout == b""

    for name, (_, data) in files.items():
        run("mv", uploads / name, layers / digest_of(data))
    assert ls(uploads) == [] and upload_uuids(root, NAME) == []
    for name, (_, data) in files.items():
        digest = digest_of(data)
        assert mode_of(layers / digest) == 0o644, name  # a layer has the mount's mode
        assert sha256sum(blob_data_path(root, digest)) == digest
        assert client.get_blob(NAME, digest) == data


async def test_cp_p_cp_a_install_chmod_chown_touch_on_uploads(tmp_path, src, mount):
    """A mode, owner or mtime given to an upload is kept (in the daemon's memory) and shown
    while the upload lives; the layer it becomes has the mount's. `cp -p` of a digest-named
    upload finishes on close as a plain `cp` does."""
    root = tmp_path / "root"
    await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    uploads, layers = m.path("library", "demo", "uploads"), m.path("library", "demo", "layers")
    path, data = source(tmp_path, "f", 100_000, 0o600)

    run("cp", "-p", path, uploads / "p")
    run("cp", "-a", path, uploads / "a")
    run("install", "-m", "644", path, uploads / "i")
    run("install", path, uploads / "x")  # install's own mode: 755
    for name, mode in {"p": 0o600, "a": 0o600, "i": 0o644, "x": 0o755}.items():
        assert (uploads / name).read_bytes() == data, name
        assert mode_of(uploads / name) == mode, name
    assert int(os.stat(uploads / "p").st_mtime) == PAST

    run("chmod", "640", uploads / "i")
    run("chown", "1234:4321", uploads / "i")
    run("touch", "-d", "2002-02-02 02:02:02 UTC", uploads / "i")
    st = os.stat(uploads / "i")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 4321)
    assert int(st.st_mtime) == 1_012_615_322
    bash(f"printf more >> {uploads / 'i'}")  # a write moves the mtime on
    assert int(os.stat(uploads / "i").st_mtime) != 1_012_615_322

    # Named by its digest, `cp -p` finishes the upload on close, after setting mode and times.
    run("cp", "-p", path, uploads / digest_of(data))
    assert digest_of(data) not in ls(uploads)
    assert mode_of(layers / digest_of(data)) == 0o644
    run("mv", uploads / "i", layers / digest_of(data + b"more"))
    st = os.stat(layers / digest_of(data + b"more"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, os.getuid(), os.getgid())
    for digest in (digest_of(data), digest_of(data + b"more")):
        assert sha256sum(blob_data_path(root, digest)) == digest
    run("rm", uploads / "p", uploads / "a")

    # Kept in memory only: after a remount the upload shows the mount's mode again.
    m.stop()
    uploads = mount(root).path("library", "demo", "uploads")
    assert ls(uploads) == ["x"] and mode_of(uploads / "x") == 0o644
    assert (uploads / "x").read_bytes() == data
    run("rm", uploads / "x")
    assert upload_uuids(root, NAME) == []


async def test_chmod_chown_touch_elsewhere_no_op_or_eperm(tmp_path, mount):
    """Outside uploads/, what changes nothing succeeds and a real change is EPERM; a tag
    takes a mode, owner or times and ignores them (`cp -p` of a manifest file of mode 600).
    Nothing in storage changes."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    repo = m.path("library", "demo")
    files = [repo / "tags" / "latest", repo / "layers" / image["layer"]]
    files.append(repo / "manifests" / image["digest"])
    dirs = [m.mountpoint, m.path("library"), repo, repo / "tags"]
    owner = f"{os.getuid()}:{os.getgid()}"
    before = snapshot(root)
    for path, same in [(f, "644") for f in files] + [(d, "755") for d in dirs]:
        run("chmod", same, path)
        run("chown", owner, path)
        for args in (("chmod", "600"), ("chmod", "o-r"), ("chown", "1234")):
            result = run(*args, path, check=False)
            if path == files[0]:  # the tag
                assert result.returncode == 0, (args, result.stderr)
                continue
            assert result.returncode == 1, (args, path)
            assert b"Operation not permitted" in result.stderr, (args, path)
        assert mode_of(path) == int(same, 8)
    tag_mtime = os.stat(files[0]).st_mtime_ns
    run("touch", "-d", "2002-02-02", files[0])
    assert os.stat(files[0]).st_mtime_ns == tag_mtime  # when the tag last moved, still
    for path in files[1:]:
        result = run("touch", "-d", "2002-02-02", path, check=False)
        assert result.returncode == 1 and b"Operation not permitted" in result.stderr
    assert snapshot(root) == before
    assert "keeps the mount's mode 644" in m.log_text()


# --------------------------------------------------------------------------- tags/


@pytest.mark.registry
async def test_sed_i_and_vim_retag(
    tmp_path, registry_server: RegistryServer, client: RegistryClient, mount
):
    """`sed -i` writes a temporary tag and renames it over the tag: a retag, and the
    temporary tag is gone. vim saves in place, or (backupcopy=no) moves the tag to its
    backup and writes it anew. Each leaves only the edited tag, which the registry serves."""
    root = registry_server.root
    image = await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    tags = m.path("library", "demo", "tags")
    run("cp", "-p", tags / "latest", tags / "v1")

    run("sed", "-i", 's/"schemaVersion": 2/"schemaVersion": 2, "a": "sed"/', tags / "v1")
    want = edited(image["manifest"], "sed")
    assert ls(tags) == ["latest", "v1"] and tag_dirs(root) == ["latest", "v1"]
    assert (tags / "v1").read_bytes() == want
    assert client.tags(NAME) == ["latest", "v1"]
    assert client.get_manifest(NAME, "v1").body == want
    assert client.get_manifest(NAME, "v1").digest == digest_of(want)

    home = tmp_path / "home"
    home.mkdir()
    env = f"HOME={home}"
    previous = "sed"
    for count, setting in enumerate(
        (
            "",
            "backupcopy=auto backupskip=",
            "backupcopy=no backupskip=",
            "backupcopy=yes backupskip=",
        )
    ):
        value = f"vim{count}"
        command = f's/"a": "{previous}"/"a": "{value}"/'
        vim = ["vim", "-u", "NONE", "-N", "-e", "-s", "-c", f"set {setting}" if setting else ""]
        run("env", env, *vim, "-c", command, "-c", "wq", tags / "v1")
        want = edited(image["manifest"], value) + b"\n"  # vim ends the last line
        assert (tags / "v1").read_bytes() == want, setting
        assert ls(tags) == ["latest", "v1"] and tag_dirs(root) == ["latest", "v1"], setting
        assert sorted(os.listdir(home)) in ([], [".viminfo"]), setting  # no backup left
        assert client.get_manifest(NAME, "v1").body == want, setting
        previous = value
    assert (tags / "latest").read_bytes() == image["manifest"]

    # rsync's temporary `.v2.XXXXXX` is no tag name (EINVAL); --inplace writes the tag itself.
    manifest = write_file(tmp_path / "v2.json", image["manifest"])
    assert run("rsync", "-a", manifest, tags / "v2", check=False).returncode == 23
    run("rsync", "-a", "--inplace", manifest, tags / "v2")
    assert ls(tags) == ["latest", "v1", "v2"] and tag_dirs(root) == ["latest", "v1", "v2"]
    assert client.get_manifest(NAME, "v2").body == image["manifest"]


async def test_mv_within_tags_is_one_step_for_readers(tmp_path, mount):
    """`mv tags/tmp tags/v1` points v1 at tmp's manifest and removes tmp. Readers of v1 all
    the while find the old manifest or the new one: never no tag, never a third thing."""
    root = tmp_path / "root"
    image = await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    tags = m.path("library", "demo", "tags")
    versions = [image["manifest"], edited(image["manifest"], "b")]
    sources = [write_file(tmp_path / f"m{i}.json", v) for i, v in enumerate(versions)]
    run("cp", sources[0], tags / "v1")

    seen: list[bytes | str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append((tags / "v1").read_bytes())
            except OSError as exc:
                seen.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for turn in range(20):
            run("cp", sources[(turn + 1) % 2], tags / "tmp")
            run("mv", tags / "tmp", tags / "v1")
    finally:
        done.set()
        thread.join()
    assert len(seen) > 20
    assert [s for s in seen if s not in versions] == []
    assert ls(tags) == ["latest", "v1"] and tag_dirs(root) == ["latest", "v1"]
    assert (tags / "v1").read_bytes() == versions[0]


async def test_shell_redirect_of_a_refused_manifest(tmp_path, mount):
    """A shell's `echo "$M" > tags/x` returns 0 when the manifest is refused (shells ignore
    close(2)'s error): the log names the repository, the tag and why. `cp`, `tee` and
    `cat >` report it. Nothing is stored either way."""
    root = tmp_path / "root"
    await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    tags = m.path("library", "demo", "tags")
    bad = write_file(tmp_path / "bad.json", b'{"schemaVersion": 2}')
    before = snapshot(root)

    assert bash(f"echo '{{\"schemaVersion\": 2}}' > {tags / 'x'}").returncode == 0
    assert "tag library/demo:x not stored: " in m.log_text()
    for script in (
        f"cp {bad} {tags / 'y'}",
        f"tee {tags / 'y'} < {bad}",
        f"cat {bad} > {tags / 'y'}",
    ):
        result = bash(script, check=False)
        assert result.returncode != 0 and b"Invalid argument" in result.stderr, script
    assert "tag library/demo:y not stored: " in m.log_text()
    assert ls(tags) == ["latest"] and snapshot(root) == before


# --------------------------------------------------------------------------- manifests/


@pytest.mark.registry
async def test_index_pushed_after_its_children_by_digest(
    tmp_path, registry_server: RegistryServer, client: RegistryClient, mount
):
    """A multi-arch index needs its children stored first: `cp child.json
    manifests/<digest>` stores one, checked like a tag push, only under its own digest."""
    root = registry_server.root
    image = await build_root(root, size=10_000)
    m = mount(root, "--tag-ttl", "0")
    repo = m.path("library", "demo")
    base = json.loads(image["manifest"])
    children = [
        json.dumps({**base, "annotations": {"arch": arch}}).encode() for arch in ("amd64", "arm64")
    ]
    descriptors = [
        {"mediaType": base["mediaType"], "digest": digest_of(c), "size": len(c)} for c in children
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
    files = [write_file(tmp_path / f"child{i}.json", c) for i, c in enumerate(children)]
    index_file = write_file(tmp_path / "index.json", index.encode())

    before = snapshot(root)
    assert run("cp", index_file, repo / "tags" / "multi", check=False).returncode == 1
    wrong = run("cp", files[0], repo / "manifests" / digest_of(children[1]), check=False)
    assert wrong.returncode == 1 and b"Invalid argument" in wrong.stderr
    log = m.log_text()
    assert f"{digest_of(children[0])} does not match {digest_of(children[1])}" in log
    assert snapshot(root) == before

    for path, child, cp in zip(files, children, (["cp"], ["cp", "-p"]), strict=True):
        run(*cp, path, repo / "manifests" / digest_of(child))
        assert (repo / "manifests" / digest_of(child)).read_bytes() == child
    run("cp", index_file, repo / "tags" / "multi")
    assert ls(repo / "tags") == ["latest", "multi"]

    fetched = client.get_manifest(NAME, "multi")
    assert (fetched.body, fetched.media_type) == (index.encode(), OCI_INDEX)
    for child in children:
        assert client.get_manifest(NAME, digest_of(child)).body == child


# --------------------------------------------------------------------------- repositories


def test_rmdir_removes_an_empty_repository_only(tmp_path, mount):
    """`mkdir -p MNT/org/a\\ b` fails at `a b` (EINVAL) after making `org`; rmdir must be
    able to take `org` back, as on a local filesystem. A repository with anything in it,
    or a namespace holding one, stays (ENOTEMPTY), and so does a section with anything in
    it; an empty section "goes" as a no-op (see test_rm_r_of_a_repository_removes_it)."""
    root = tmp_path / "root"
    m = mount(root)
    failed = run("mkdir", "-p", m.path("org", "a b"), check=False)
    assert failed.returncode != 0 and b"Invalid argument" in failed.stderr
    assert ls(m.mountpoint) == ["org"]
    run("rmdir", m.path("org"))
    assert ls(m.mountpoint) == []
    assert os.listdir(root / "docker/registry/v2/repositories") == []

    run("mkdir", "-p", m.path("ns", "app"), m.path("full"))
    write_file(m.path("full", "uploads", "u1"), b"data")
    for busy in ("ns", "full"):
        result = run("rmdir", m.path(busy), check=False)
        assert b"Directory not empty" in result.stderr, result.stderr
    result = run("rmdir", m.path("full", "uploads"), check=False)
    assert b"Directory not empty" in result.stderr, result.stderr
    run("rmdir", m.path("full", "tags"))  # empty: "goes", and stays while `full` does
    assert ls(m.path("full")) == ["layers", "manifests", "rootfs", "tags", "uploads"]
    run("rmdir", m.path("ns", "app"), m.path("ns"))
    assert ls(m.mountpoint) == ["full"]
    assert m.path("full", "uploads", "u1").read_bytes() == b"data"
    assert not m.path("ns").exists()


@pytest.mark.registry
async def test_rm_r_of_a_repository_removes_it(
    registry_server: RegistryServer, client: RegistryClient, mount
):
    """`rm -r MNT/library/demo` as on a local directory: rm exits 0 and says nothing. It
    removes every layer link, the manifest (and its tag with it), the upload in progress,
    then each emptied section (a no-op: a section is part of its repository while that
    exists), then the repository. The registry on the same root answers 404 for the tag and
    the manifest and no longer lists the repository; the blobs stay (garbage collection's)."""
    root = registry_server.root
    image = await build_root(root, size=10_000)
    assert client.catalog() == [NAME]
    m = mount(root)
    repo = m.path(*NAME.split("/"))
    write_file(repo / "uploads" / "part", b"half a layer")

    removed = run("rm", "-r", repo, check=False)
    assert (removed.returncode, removed.stderr.decode()) == (0, ""), m.log_text()[-3000:]
    assert not repo.exists() and ls(m.path("library")) == []
    assert client.request("GET", f"/v2/{NAME}/manifests/latest").status_code == 404
    assert client.request("GET", f"/v2/{NAME}/manifests/{image['digest']}").status_code == 404
    assert client.catalog() == []
    assert upload_uuids(root, NAME) == []
    for digest in image["blobs"]:
        assert blob_data_path(root, digest).exists(), digest


def test_rmdir_on_a_read_only_mount_is_erofs(tmp_path, mount):
    root = tmp_path / "root"
    mount(root).path("org").mkdir()
    m = mount(root, "--read-only")
    result = run("rmdir", m.path("org"), check=False)
    assert b"Read-only file system" in result.stderr, result.stderr
    assert ls(m.mountpoint) == ["org"]
