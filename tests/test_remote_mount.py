"""Remote sources end to end: `regfs mount http(s)://HOST:PORT MNT` over the real registry.

Every test mounts with the real command line and drives the mount with real tools (`ls`,
`cat`, `cp`, `mv`, `dd`, `sha256sum`, `getfattr`, `skopeo`); the registry is Debian's
`docker-registry` on loopback, alone or behind the token server, Basic auth, TLS or the
fault-injecting proxy. Upload records go to a per-test XDG_STATE_HOME and credentials come
from a per-test DOCKER_CONFIG, so nothing leaks from or into the user's own.
The last section tests RemoteUpload's PATCH recovery against a scripted registry.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.credentials import credential_helper, docker_login
from support.fault_server import Fault, FaultServer
from support.mounts import REGFS, Mount, is_mounted, parse_getfattr, wait_until
from support.oci import build_image, build_large_image, run, skopeo_pull, skopeo_push
from support.registry import (
    RegistryServer,
    blob_data_path,
    htpasswd_auth,
    repo_path,
    started_registries,
    upload_path,
    write_htpasswd,
    write_self_signed_cert,
)
from support.servers import running
from support.token_server import TokenServer
from support.tools import (
    C_LOCALE,
    MIB,
    digest_of,
    errno_of,
    ls,
    sh,
    sha256sum,
)

from storage.digests import Digest
from storage.errors import DigestMismatch, RemoteUnavailable
from storage.remote.client import RemoteClient
from storage.remote.uploads import RemoteUpload, UploadRecord, UploadRecords

pytestmark = [pytest.mark.mount, pytest.mark.remote]

USER, PASSWORD = "alice", "s3cret-Pa55-remote"
SERVER_THREADS = ("token-server", "fault-server", "process_request_thread")


# --------------------------------------------------------------------------- helpers


def regfs_mount(
    tmp_path: Path, source: str, *args: str, password: str | None = None
) -> subprocess.CompletedProcess:
    """`regfs mount` expected to fail: returns its result, and makes sure nothing stays."""
    m = Mount(source, tmp_path / "mnt-refused", tmp_path / "regfs-refused.log", list(args))
    try:
        return subprocess.run(
            [REGFS, "mount", *args, "--log", str(m.log), source, str(m.mountpoint)],
            input=password + "\n" if password is not None else "",
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        mounted = is_mounted(m.mountpoint)
        m.stop()
        assert not mounted, "the mount was expected to fail"


@contextlib.contextmanager
def mounted_with_password(tmp_path: Path, source: str, *args: str) -> Iterator[Mount]:
    """A mount whose password arrives on stdin (--password-stdin); unmounted at the end."""
    m = Mount(source, tmp_path / "mnt-pw", tmp_path / "regfs-pw.log", list(args))
    try:
        result = subprocess.run(
            [REGFS, "mount", *args, "--password-stdin", "--log", str(m.log), source, m.mountpoint],
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr + m.log_text()
        yield m
    finally:
        m.stop()
    m.check_log()


def docker_config(host: str, user: str, password: str) -> None:
    """The login `docker login HOST` would leave, in this test's DOCKER_CONFIG."""
    docker_login(Path(os.environ["DOCKER_CONFIG"]), host, user, password)


def skopeo_push_auth(layout: Path, tag: str, host: str, repo: str, tls_verify: bool) -> None:
    """skopeo_push with credentials (registries that want a login to push)."""
    run(
        [
            "skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests",
            f"--dest-tls-verify={str(tls_verify).lower()}",
            "--dest-creds", f"{USER}:{PASSWORD}",
            f"oci:{layout}:{tag}", f"docker://{host}/{repo}:{tag}",
        ]
    )  # fmt: skip


def secrets_absent(m: Mount, secret: str) -> None:
    """Not in the log, nor in any daemon's command line (what `ps` shows) or environment."""
    assert secret not in m.log_text()
    pids = m.pids()
    assert pids, "no daemon"
    for pid in pids:
        for what in ("cmdline", "environ"):
            assert secret.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), what


# --------------------------------------------------------------------------- fixtures


class Images:
    """Built once per module: `demo` (3 layers), `big` (a 6 MiB layer), `fresh` (pushed only
    through the mount)."""

    def __init__(self, layout: Path) -> None:
        rng = random.Random(8)
        self.layout = layout
        self.demo = build_image(
            layout,
            "demo",
            {"etc/motd": b"remote\n", "bin/tool": rng.randbytes(300_000), "z/readme": b"z\n"},
            layers=3,
        )
        self.big = build_large_image(layout, "big", 6 * MIB, seed=8)
        self.fresh = build_image(
            layout, "fresh", {"app/main": rng.randbytes(200_000), "app/cfg": b"{}\n"}, layers=2
        )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Images:
    return Images(tmp_path_factory.mktemp("oci") / "layout")


@pytest.fixture(scope="module")
def served(tmp_path_factory, images: Images) -> Iterator[RegistryServer]:
    """A plain-http registry holding `demo` as library/demo:v1 and :latest, and `big` as
    myorg/team/big:latest. Tests only add to it (new repositories)."""
    base = tmp_path_factory.mktemp("served")
    with RegistryServer(base / "root", workdir=base / "registry") as server:
        skopeo_push(images.layout, "demo", server.host, "library/demo", dest_tag="v1")
        skopeo_push(images.layout, "demo", server.host, "library/demo", dest_tag="latest")
        skopeo_push(images.layout, "big", server.host, "myorg/team/big", dest_tag="latest")
        yield server


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch) -> Iterator[None]:
    """Own upload records and Docker config (the daemons inherit the environment); and
    nothing left behind: no mount, no server thread, no registry but the module's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "docker").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    yield
    with open("/proc/mounts") as mounts:
        assert str(tmp_path) not in mounts.read()
    threads = [t.name for t in threading.enumerate() if any(n in t.name for n in SERVER_THREADS)]
    assert not threads, f"server threads left behind: {threads}"
    assert len(running(RegistryServer)) <= 1, "registry processes left behind"


@pytest.fixture
def servers(tmp_path) -> Iterator[Callable[..., RegistryServer]]:
    """start(**options) → a started RegistryServer on a fresh root; all stopped at teardown."""
    yield from started_registries(tmp_path)


# --------------------------------------------------------------------------- 1. reading


@pytest.mark.registry
def test_browse_and_read(served: RegistryServer, images: Images, mount) -> None:
    m = mount(served.url)
    assert ls(m.mountpoint) == ["library", "myorg"]
    assert ls(m.path("myorg")) == ["team"]
    assert ls(m.path("myorg", "team")) == ["big"]
    assert ls(m.path("library", "demo")) == ["layers", "manifests", "rootfs", "tags", "uploads"]
    assert ls(m.path("library", "demo", "tags")) == ["latest", "v1"]
    assert ls(m.path("library", "demo", "manifests")) == [images.demo.digest]
    assert ls(m.path("library", "demo", "layers")) == sorted(images.demo.blob_digests)
    assert ls(m.path("library", "demo", "uploads")) == []
    assert ls(m.path("myorg", "team", "big", "layers")) == sorted(images.big.blob_digests)

    for image, repo in ((images.demo, "library/demo"), (images.big, "myorg/team/big")):
        d = m.path(*repo.split("/"))
        tag = "v1" if image is images.demo else "latest"
        assert (d / "tags" / tag).read_bytes() == image.manifest
        assert (d / "manifests" / image.digest).read_bytes() == image.manifest
        assert os.stat(d / "tags" / tag).st_size == len(image.manifest)
        for digest in image.blob_digests:
            layer = d / "layers" / digest
            assert os.stat(layer).st_size == len(image.blob(digest))
            assert sha256sum(layer) == digest
        named = (d / "tags" / tag, d / "manifests" / image.digest)
        attrs = parse_getfattr(sh("getfattr", "-d", "--absolute-names", *named).stdout)
        for found in attrs.values():
            assert found == {
                "user.regfs.digest": image.digest,
                "user.regfs.mediatype": image.media_type,
            }
        layer = d / "layers" / image.layer_digests[0]
        found = parse_getfattr(sh("getfattr", "-d", "--absolute-names", layer).stdout)
        assert found == {str(layer): {"user.regfs.digest": image.layer_digests[0]}}

    # dd at random offsets: each is one Range request, never a read from the start.
    big = images.big.layer_digests[0]
    data = images.big.blob(big)
    path = m.path("myorg", "team", "big", "layers", big)
    rng = random.Random(1)
    for _ in range(6):
        block = rng.choice([512, 4096, 65536])
        skip = rng.randrange(len(data) // block)
        out = subprocess.run(
            ["dd", f"if={path}", f"bs={block}", f"skip={skip}", "count=3", "status=none"],
            capture_output=True,
            check=True,
        ).stdout
        assert out == data[skip * block : (skip + 3) * block]
    assert "Traceback" not in m.log_text()


@pytest.mark.registry
def test_read_ahead_survives_concurrent_reads(served: RegistryServer, images: Images, mount):
    """The kernel sends a `cat`'s reads several at a time; they must still be seen as
    sequential, or each 128-256 KiB read costs its own request (it did: 57 MB/s). A random
    `dd` of one block costs one request."""
    digest = images.big.layer_digests[0]
    size = len(images.big.blob(digest))
    with FaultServer(upstream=served.url) as proxy:
        m = mount(proxy.url)
        layer = m.path("myorg", "team", "big", "layers", digest)
        assert os.stat(layer).st_size == size

        def blob_gets() -> int:
            return sum(s.method == "GET" and "/blobs/" in s.path for s in proxy.seen)

        sh("dd", f"if={layer}", "bs=4096", f"skip={size // 4096 // 2}", "count=1", "of=/dev/null")
        assert blob_gets() == 1
        assert sha256sum(layer) == digest
        assert blob_gets() <= 10, f"{blob_gets()} GETs for {size} bytes"  # not size / 256 KiB
        m.stop()


# --------------------------------------------------------------------------- 2. writing


@pytest.mark.registry
def test_push_with_cp_then_pull_with_skopeo(
    served: RegistryServer, images: Images, mount, tmp_path
) -> None:
    image = images.fresh
    m = mount(served.url)
    repo = m.path("pushed", "team", "app")
    sh("mkdir", "-p", repo)
    first, second = image.layer_digests
    blob = images.layout / "blobs" / "sha256"
    sh("cp", blob / first[7:], repo / "uploads" / first)  # finishes on close
    sh("cp", blob / second[7:], repo / "uploads" / "second")
    sh("mv", repo / "uploads" / "second", repo / "layers" / second)
    sh("cp", blob / image.config_digest[7:], repo / "uploads" / "config")
    sh("mv", repo / "uploads" / "config", repo / "layers" / image.config_digest)
    assert ls(repo / "uploads") == []
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(image.manifest)
    sh("cp", manifest, repo / "tags" / "v1")
    assert ls(repo / "tags") == ["v1"]
    assert ls(repo / "layers") == sorted(image.blob_digests)
    assert (repo / "tags" / "v1").read_bytes() == image.manifest

    pulled = skopeo_pull(served.host, "pushed/team/app", "v1", tmp_path / "pulled")
    assert pulled.digest == image.digest and pulled.manifest == image.manifest
    assert pulled.blob_digests == image.blob_digests
    assert all(pulled.blob(d) == image.blob(d) for d in image.blob_digests)
    # rmdir: a pushed repository stays (ENOTEMPTY); one made here and left empty goes.
    refused = sh("rmdir", repo, check=False)
    assert refused.returncode != 0 and "Directory not empty" in refused.stderr
    sh("mkdir", m.path("pushed", "team", "empty"))
    sh("rmdir", m.path("pushed", "team", "empty"))
    listed = ls(m.path("pushed", "team"))
    assert "app" in listed and "empty" not in listed
    assert "pushed/team/app" in served.client().catalog()


@pytest.mark.registry
def test_a_commit_whose_answer_is_lost_still_finishes(served: RegistryServer, mount) -> None:
    """The PUT that commits lands, but its answer is lost: the client sends it again, the
    registry no longer knows the upload (404), and the blob it became proves the commit."""
    data = random.Random(11).randbytes(3 * MIB)
    digest = digest_of(data)
    with FaultServer(upstream=served.url) as proxy:
        m = mount(proxy.url)
        repo = m.path("lost", "answer")
        sh("mkdir", "-p", repo)
        (repo / "uploads" / "blob").write_bytes(data)
        proxy.inject(Fault(method="PUT", path="/blobs/uploads/", lose_answer=True))
        sh("mv", repo / "uploads" / "blob", repo / "layers" / digest)
        puts = [s for s in proxy.seen if s.method == "PUT"]
        assert [s.status for s in puts] == [None, 404]  # landed unanswered, then unknown
        assert ls(repo / "uploads") == []
        assert sha256sum(repo / "layers" / digest) == digest
        assert "commit was lost" in m.log_text()
        m.stop()
    assert served.client().get_blob("lost/answer", digest) == data


@pytest.mark.registry
def test_wrong_digest_and_write_below_the_end(
    served: RegistryServer, images: Images, mount
) -> None:
    """A wrong digest on mv is EINVAL and the upload stays, on the mount and on the
    registry (checked before committing: registry 2.8 keeps a refused upload with a stale
    state, see RemoteUpload.finish); a write below the end is EINVAL with a log line."""
    m = mount(served.url)
    repo = m.path("errors", "app")
    sh("mkdir", "-p", repo)
    config = images.fresh.blob(images.fresh.config_digest)
    (repo / "uploads" / "config").write_bytes(config)
    wait_until(lambda: os.stat(repo / "uploads" / "config").st_size == len(config), 10, "PATCH")
    uuid = os.getxattr(repo / "uploads" / "config", "user.regfs.uuid").decode()
    wrong = images.fresh.layer_digests[0]
    err = errno_of(lambda: os.rename(repo / "uploads" / "config", repo / "layers" / wrong))
    assert err == errno.EINVAL
    assert ls(repo / "uploads") == ["config"]
    assert os.stat(repo / "uploads" / "config").st_size == len(config)
    assert upload_path(served.root, "errors/app", uuid).is_dir()
    assert f"holds {images.fresh.config_digest}, not {wrong}" in m.log_text()
    # The same upload, named right, finishes.
    sh("mv", repo / "uploads" / "config", repo / "layers" / images.fresh.config_digest)
    assert served.client().get_blob("errors/app", images.fresh.config_digest) == config

    # A digest-named upload whose content does not match: close() fails (EIO), it stays.
    result = subprocess.run(
        ["cp", "/dev/stdin", repo / "uploads" / wrong],
        input=b"not that layer",
        capture_output=True,
        env=C_LOCALE,
    )
    assert result.returncode != 0 and b"Input/output error" in result.stderr
    wait_until(lambda: ls(repo / "uploads") == [wrong], 10, "the upload to stay")
    wait_until(lambda: os.stat(repo / "uploads" / wrong).st_size == 14, 10, "its PATCH")
    sh("rm", repo / "uploads" / wrong)
    assert ls(repo / "uploads") == []

    fd = os.open(repo / "uploads" / "sequential", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"x" * 1000) == 1000
        assert errno_of(lambda: os.pwrite(fd, b"y", 10)) == errno.EINVAL
        assert os.pwrite(fd, b"y", 1000) == 1  # at the end: fine
    finally:
        os.close(fd)
    assert "a remote upload is written in order; a write at 10 is not at its end" in m.log_text()
    wait_until(lambda: os.stat(repo / "uploads" / "sequential").st_size == 1001, 10, "PATCH")
    sh("rm", repo / "uploads" / "sequential")


@pytest.mark.registry
def test_resume_after_remount(served: RegistryServer, mount, tmp_path) -> None:
    """The upload's location lives in a local record: `cat rest >>` after a remount goes
    on where the first mount stopped, and the result is the whole blob."""
    data = random.Random(3).randbytes(3 * MIB + 123)
    cut = 2 * MIB + 7
    (tmp_path / "head").write_bytes(data[:cut])
    (tmp_path / "rest").write_bytes(data[cut:])
    first = mount(served.url)
    repo = first.path("resumed", "app")
    sh("mkdir", "-p", repo)
    sh("cp", tmp_path / "head", repo / "uploads" / "part")
    wait_until(lambda: os.stat(repo / "uploads" / "part").st_size == cut, 10, "the PATCH")
    first.stop()

    records = list((tmp_path / "state" / "regfs" / "uploads").rglob("*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["offset"] == cut
    second = mount(served.url)
    repo = second.path("resumed", "app")
    assert sh("ls", "-l", repo / "uploads").stdout.split("\n")[1].split()[4] == str(cut)
    sh("bash", "-c", f'cat "{tmp_path}/rest" >> "{repo}/uploads/part"')
    sh("mv", repo / "uploads" / "part", repo / "layers" / digest_of(data))
    assert served.client().get_blob("resumed/app", digest_of(data)) == data
    assert sha256sum(repo / "layers" / digest_of(data)) == digest_of(data)
    assert not list((tmp_path / "state" / "regfs" / "uploads").rglob("*.json"))


@pytest.mark.registry
def test_truncate_restarts_an_upload_under_its_name(
    served: RegistryServer, mount, tmp_path
) -> None:
    """`truncate -s 0`, `: >` and `cp` over it (O_TRUNC) restart an upload from zero, as
    they do on a storage root: the same name and uuid, the registry's upload begun again
    (the old one cancelled there), and what is written next finishes by mv."""
    data = random.Random(12).randbytes(MIB + 5)
    (tmp_path / "data").write_bytes(data)
    m = mount(served.url)
    repo = m.path("truncated", "app")
    sh("mkdir", "-p", repo)
    upload = repo / "uploads" / "part"
    upload.write_bytes(b"first try, thrown away")
    uuid = os.getxattr(upload, "user.regfs.uuid")
    wait_until(lambda: os.stat(upload).st_size == 22, 10, "the PATCH")
    first = upload_path(served.root, "truncated/app", uuid.decode()) / "data"
    assert first.stat().st_size == 22

    sh("truncate", "-s", "0", upload)
    assert os.stat(upload).st_size == 0
    assert os.getxattr(upload, "user.regfs.uuid") == uuid
    assert not first.exists()  # cancelled (registry 2.8 leaves its hashstates/ there)
    sh("bash", "-c", f'echo second try >> "{upload}"')
    assert os.stat(upload).st_size == 11
    sh("bash", "-c", f': > "{upload}"')
    assert os.stat(upload).st_size == 0
    sh("bash", "-c", f'echo third try >> "{upload}"')
    sh("cp", tmp_path / "data", upload)
    assert ls(repo / "uploads") == ["part"]
    assert os.getxattr(upload, "user.regfs.uuid") == uuid
    assert os.stat(upload).st_size == len(data)

    sh("mv", upload, repo / "layers" / digest_of(data))
    assert ls(repo / "uploads") == []
    assert served.client().get_blob("truncated/app", digest_of(data)) == data
    assert not list((tmp_path / "state" / "regfs" / "uploads").rglob("*.json"))


# --------------------------------------------------------------------------- 3. no catalog


@pytest.mark.registry
@pytest.mark.parametrize("status", [404, 401])
def test_without_catalog_repositories_are_reached_by_name(
    served: RegistryServer, images: Images, mount, status: int
) -> None:
    with FaultServer(upstream=served.url) as proxy:
        proxy.inject(Fault(status, path=r"^/v2/_catalog$"), times=10)
        m = mount(proxy.url)
        assert ls(m.mountpoint) == []
        demo = m.path("library", "demo")
        assert ls(demo) == ["layers", "manifests", "rootfs", "tags", "uploads"]
        assert ls(demo / "tags") == ["latest", "v1"]
        assert (demo / "tags" / "v1").read_bytes() == images.demo.manifest
        first = images.demo.layer_digests[0]
        assert sha256sum(demo / "layers" / first) == first
        # Without a catalog any name may lead to a repository: one that is none is empty.
        assert ls(m.path("library", "nothing")) == []
        assert "has no usable _catalog" in m.log_text()
        m.stop()


@pytest.mark.registry
def test_a_catalog_longer_than_the_registrys_page_limit(servers, mount) -> None:
    """The registry refuses pages above its catalog.maxentries (1000 by default) with 400
    PAGINATION_NUMBER_INVALID: the listing asks for smaller pages and follows their links."""
    server = servers()
    names = [f"r{i:04d}" for i in range(1200)]
    for name in names:
        (repo_path(server.root, f"ns/{name}") / "_layers").mkdir(parents=True)
    assert server.client().request("GET", "/v2/_catalog", params={"n": 100_000}).status_code == 400
    m = mount(server.url)
    assert ls(m.path("ns")) == names
    m.stop()


# --------------------------------------------------------------------------- 4. Basic auth


@pytest.mark.registry
def test_basic_auth(tmp_path, servers, images: Images, mount) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    server = servers(auth=htpasswd_auth(htpasswd))
    skopeo_push_auth(images.layout, "demo", server.host, "library/demo", tls_verify=False)
    layers = images.demo.layer_digests

    with mounted_with_password(tmp_path, server.url, "--username", USER) as m:
        assert (m.path("library/demo/tags/demo")).read_bytes() == images.demo.manifest
        assert sha256sum(m.path("library/demo/layers", layers[0])) == layers[0]
        secrets_absent(m, PASSWORD)

    wrong = regfs_mount(tmp_path, server.url, "--username", USER, "--password-stdin", password="x")
    assert wrong.returncode != 0
    assert "credentials of user 'alice' were refused" in wrong.stderr and "401" in wrong.stderr
    none = regfs_mount(tmp_path, server.url)
    assert none.returncode != 0 and "needs credentials" in none.stderr

    # Credentials from the Docker config; then the registry restarts with a new password.
    docker_config(server.host, USER, PASSWORD)
    m = mount(server.url)
    assert (m.path("library/demo/tags/demo")).read_bytes() == images.demo.manifest
    secrets_absent(m, PASSWORD)
    port = server.port
    server.stop()
    write_htpasswd(htpasswd, {USER: "changed-" + PASSWORD})
    server.start()
    assert server.port == port
    assert errno_of(lambda: m.path("library/demo/layers", layers[1]).read_bytes()) == errno.EACCES
    assert errno_of(lambda: os.listdir(m.path("library/demo/layers"))) == errno.EACCES
    assert m.pids() and "were refused" in m.log_text()
    secrets_absent(m, PASSWORD)


@pytest.mark.registry
def test_basic_auth_from_a_credential_helper(
    tmp_path, monkeypatch, servers, images: Images, mount
) -> None:
    """`credsStore` in the Docker config: the login comes from `docker-credential-<name>`."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD})
    server = servers(auth=htpasswd_auth(htpasswd))
    skopeo_push_auth(images.layout, "demo", server.host, "library/demo", tls_verify=False)
    credential_helper(monkeypatch, tmp_path / "bin", "regfstest", {server.host: (USER, PASSWORD)})
    path = Path(os.environ["DOCKER_CONFIG"]) / "config.json"
    path.write_text(json.dumps({"credsStore": "regfstest", "auths": {server.host: {}}}))
    m = mount(server.url)
    assert (m.path("library/demo/tags/demo")).read_bytes() == images.demo.manifest
    secrets_absent(m, PASSWORD)


# --------------------------------------------------------------------------- 5. token auth


@pytest.mark.registry
def test_token_auth(tmp_path, monkeypatch, servers, images: Images, mount) -> None:
    with TokenServer(tmp_path / "tokens") as tokens:
        server = servers(auth=tokens.registry_auth())
        skopeo_push(images.layout, "demo", server.host, "library/demo", dest_tag="v1")
        first = images.demo.layer_digests[0]

        m = mount(server.url)  # anonymous: the token server grants pulls to anyone
        assert ls(m.path("library/demo/tags")) == ["v1"]
        assert (m.path("library/demo/tags/v1")).read_bytes() == images.demo.manifest
        assert sha256sum(m.path("library/demo/layers", first)) == first
        scopes = {s for r in tokens.requests for s in r.scopes}
        assert "repository:library/demo:pull" in scopes
        m.stop()

        tokens.users = {USER: PASSWORD}
        refused = regfs_mount(tmp_path, server.url)
        assert refused.returncode != 0
        assert "token server 127.0.0.1 refused anonymous (401" in refused.stderr

        before = len(tokens.requests)
        docker_config(server.host, USER, PASSWORD)
        m = mount(server.url)
        assert (m.path("library/demo/tags/v1")).read_bytes() == images.demo.manifest
        assert sha256sum(m.path("library/demo/layers", first)) == first
        assert {r.account for r in tokens.requests[before:]} == {USER}
        secrets_absent(m, PASSWORD)
        assert not any(r.token in m.log_text() for r in tokens.requests if r.token)
        m.stop()

        # A web sign-in leaves an identity token in the credential helper: it is traded for
        # access tokens by the OAuth2 refresh grant (POST), the only way to use one.
        identity = "idt-" + PASSWORD
        tokens.refresh_tokens[identity] = USER
        credential_helper(
            monkeypatch, tmp_path / "bin", "regfsweb", {server.host: ("<token>", identity)}
        )
        config = {"credHelpers": {server.host: "regfsweb"}}
        (Path(os.environ["DOCKER_CONFIG"]) / "config.json").write_text(json.dumps(config))
        before = len(tokens.requests)
        m = mount(server.url)
        assert ls(m.path("library/demo/tags")) == ["v1"]
        assert sha256sum(m.path("library/demo/layers", first)) == first
        grants = tokens.requests[before:]
        assert grants and all(r.grant_type == "refresh_token" and r.granted for r in grants)
        assert {r.account for r in grants} == {USER}
        secrets_absent(m, identity)
        assert not any(r.token in m.log_text() for r in grants)


# --------------------------------------------------------------------------- 6. TLS


@pytest.mark.registry
def test_tls(tmp_path, servers, images: Images, mount) -> None:
    tls = write_self_signed_cert(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = servers(tls=tls)
    skopeo_push(images.layout, "demo", server.host, "library/demo", dest_tag="v1")

    refused = regfs_mount(tmp_path, server.url)
    assert refused.returncode != 0
    assert "TLS certificate verification failed" in refused.stderr
    assert "self-signed" in refused.stderr

    for args in (["--ca-file", str(tls.cert)], ["--insecure"]):
        m = mount(server.url, *args)
        assert (m.path("library/demo/tags/v1")).read_bytes() == images.demo.manifest
        first = images.demo.layer_digests[0]
        assert sha256sum(m.path("library/demo/layers", first)) == first
        m.stop()


# --------------------------------------------------------------------------- 7. faults


@pytest.mark.registry
def test_registry_stopped_mid_read(servers, mount) -> None:
    """EIO within the retries' bound (not ENOENT, no hang), the daemon lives on, and the
    same open file reads on once the registry is back on its port. The blob is larger than
    what the read-ahead may hold (4 windows of 8 MiB), so the stop is always felt."""
    server = servers()
    data = random.Random(7).randbytes(48 * MIB)
    digest = server.client().push_blob("big", data)
    m = mount(server.url)
    got = bytearray()
    with open(m.path("big", "layers", digest), "rb", buffering=0) as f:
        got += f.read(MIB)
        server.stop()
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            while chunk := f.read(128 << 10):  # as cat does, until the read-ahead runs out
                got += chunk
        elapsed = time.monotonic() - started
        assert err.value.errno == errno.EIO, err.value
        assert elapsed < 10, elapsed  # 4 retries: 1.5 s of backoff per request
        assert got == data[: len(got)] and len(got) < len(data)
        assert m.pids() and is_mounted(m.mountpoint)
        assert errno_of(lambda: os.listdir(m.path("big", "tags"))) == errno.EIO

        server.start()
        f.seek(len(got))
        got += f.read()
    assert got == data
    assert sha256sum(m.path("big", "layers", digest)) == digest
    assert "ConnectError" in m.log_text()


@pytest.mark.registry
def test_a_blob_deleted_on_the_registry_mid_read_is_eio(servers, mount) -> None:
    """An open layer whose blob the registry's storage loses (a GC, a hand) reads on from
    what was fetched, then fails with EIO and a log line: an I/O error, as a disk gives,
    not ENOENT (the name is still there; a read cannot say it is not)."""
    server = servers()
    data = random.Random(8).randbytes(48 * MIB)
    digest = server.client().push_blob("gone", data)
    m = mount(server.url)
    with open(m.path("gone", "layers", digest), "rb", buffering=0) as f:
        assert f.read(MIB) == data[:MIB]
        blob_data_path(server.root, digest).unlink()
        with pytest.raises(OSError) as err:
            f.seek(40 * MIB)  # past what the read-ahead may hold
            f.read(MIB)
        assert err.value.errno == errno.EIO, err.value
    assert "read: " in m.log_text() and "(EIO)" in m.log_text()
    assert m.pids() and is_mounted(m.mountpoint)


@pytest.mark.registry
def test_slow_registry_is_eio_within_the_timeout(served: RegistryServer, images: Images, mount):
    """`-o timeout=0.5`: each try ends after 0.5 s, the request after 5 tries (2.5 s)."""
    digest = images.big.layer_digests[0]
    with FaultServer(upstream=served.url) as proxy:
        m = mount(proxy.url, "-o", "timeout=0.5")
        layer = m.path("myorg", "team", "big", "layers", digest)
        assert os.stat(layer).st_size == len(images.big.blob(digest))  # HEAD before the fault
        proxy.inject(Fault(200, delay=30, method="GET", path="/blobs/"), times=50)
        started = time.monotonic()
        assert errno_of(lambda: layer.read_bytes()) == errno.EIO
        elapsed = time.monotonic() - started
        assert 2.0 < elapsed < 8, elapsed
        assert "ReadTimeout" in m.log_text()
        proxy.clear()
        assert sha256sum(layer) == digest
        m.stop()


def test_timeout_option_is_checked(tmp_path) -> None:
    for bad in ("0", "-1", "nan", "soon"):
        result = regfs_mount(tmp_path, "http://127.0.0.1:9", "-o", f"timeout={bad}")
        assert result.returncode == 2 and f"-o timeout: bad value '{bad}'" in result.stderr


@pytest.mark.registry
def test_patch_failing_with_500_is_resumed(served: RegistryServer, mount, tmp_path) -> None:
    """A 500 on a PATCH in the middle of a `cp`: regfs asks the registry how far the upload
    got (GET) and sends the rest; the cp succeeds and the blob is whole."""
    data = random.Random(5).randbytes(12 * MIB)  # over the 8 MiB a PATCH carries
    source = tmp_path / "blob"
    source.write_bytes(data)
    with FaultServer(upstream=served.url) as proxy:
        m = mount(proxy.url)
        repo = m.path("faults", "app")
        sh("mkdir", "-p", repo)
        proxy.inject(Fault(500, method="PATCH"))
        sh("cp", source, repo / "uploads" / digest_of(data))
        assert ls(repo / "layers") == [digest_of(data)]
        calls = [(s.method, s.status) for s in proxy.seen if "/blobs/uploads/" in s.path]
        assert calls == [("POST", 202), ("PATCH", 500), ("GET", 204), ("PATCH", 202), ("PUT", 201)]
        assert "asking how far it got" in m.log_text()
        m.stop()
    assert served.client().get_blob("faults/app", digest_of(data)) == data


# --------------------------------------------------------------------------- PATCH recovery


class ScriptedRegistry:
    """One upload held in memory, answering like registry 2.8 minus `_state`; `on_patch`
    decides what each PATCH does: "ok", "500", "drop" (nothing lands, the connection dies),
    a fraction ("0.5": that much lands, then the connection dies), or "stale" (it all
    lands, the connection dies, and the registry refuses the old location from then on)."""

    def __init__(self, *on_patch: str) -> None:
        self.on_patch = list(on_patch)
        self.data = bytearray()
        self.stale = False
        self.calls: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        method, url = request.method, request.url
        what = request.headers.get("Content-Range", "")
        self.calls.append((method, what))
        location = {"Location": "/v2/x/blobs/uploads/u1", "Docker-Upload-UUID": "u1"}
        if method == "POST":
            return httpx.Response(202, headers=location)
        if self.stale:
            body = {"errors": [{"code": "BLOB_UPLOAD_INVALID", "message": "stale"}]}
            return httpx.Response(404, json=body)
        if method == "GET":
            last = max(len(self.data) - 1, 0)
            return httpx.Response(204, headers={**location, "Range": f"0-{last}"})
        if method == "PATCH":
            body = request.read()
            start = int(what.split("-")[0])
            assert start == len(self.data), f"PATCH at {start}, the upload has {len(self.data)}"
            action = self.on_patch.pop(0) if self.on_patch else "ok"
            if action == "500":
                return httpx.Response(500)
            if action == "drop":
                raise httpx.ReadError("connection reset")
            if action == "stale":
                self.data += body
                self.stale = True
                raise httpx.ReadError("connection reset")
            if action != "ok":
                self.data += body[: int(len(body) * float(action))]
                raise httpx.ReadError("connection reset")
            self.data += body
            return httpx.Response(202, headers={**location, "Range": f"0-{len(self.data) - 1}"})
        if method == "PUT":
            assert url.params["digest"] == digest_of(bytes(self.data + request.read()))
            return httpx.Response(201)
        return httpx.Response(405)


async def upload_through(script: ScriptedRegistry, tmp_path: Path, data: bytes) -> RemoteUpload:
    client = RemoteClient("http://127.0.0.1:9", timeout=1, retries=3)
    client._http = httpx.AsyncClient(transport=httpx.MockTransport(script))
    records = UploadRecords(tmp_path / "records")
    upload = await RemoteUpload.start(client, records, "x", "label")
    try:
        await upload.write_at(0, data)
        await upload.close()
        await upload.finish(Digest.parse(digest_of(data)))
    finally:
        await client.aclose()
    return upload


def test_upload_repositories_are_read_again_only_when_records_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog asks where uploads were started at every lookup: the records are read
    once, then again only after one is written or deleted, here or by another mount."""
    records, other = UploadRecords(tmp_path / "records"), UploadRecords(tmp_path / "records")
    assert records.repositories() == frozenset()
    record = UploadRecord("org/a", "u1", "/v2/org/a/blobs/uploads/u1", "2026-11-30T00:00:00")
    records.save(record)
    loads: list[str] = []
    load = UploadRecords.load

    def counted(self: UploadRecords, uuid: str) -> UploadRecord:
        loads.append(uuid)
        return load(self, uuid)

    monkeypatch.setattr(UploadRecords, "load", counted)
    for _ in range(100):
        assert records.repositories() == {"org/a"}
    assert loads == ["u1"]
    other.save(UploadRecord("org/b", "u2", "/v2/org/b/blobs/uploads/u2", record.started_at))
    assert records.repositories() == {"org/a", "org/b"}  # another mount's, seen at once
    other.delete("u1")
    assert records.repositories() == {"org/b"}
    records.delete("u2")
    assert records.repositories() == frozenset()


@pytest.mark.parametrize(
    ("on_patch", "resent"),
    [
        (["500"], ["0-999", "0-999"]),
        (["drop", "500"], ["0-999", "0-999", "0-999"]),
        (["0.25"], ["0-999", "250-999"]),  # a quarter landed: only the rest again
        (["1.0"], ["0-999"]),  # all landed, the answer was lost: nothing again
    ],
)
async def test_patch_recovery_sends_only_what_is_missing(
    tmp_path, on_patch: list[str], resent: list[str]
) -> None:
    data = bytes(range(250)) * 4
    script = ScriptedRegistry(*on_patch)
    await upload_through(script, tmp_path, data)
    assert bytes(script.data) == data
    assert [r for m, r in script.calls if m == "PATCH"] == resent
    assert [m for m, _ in script.calls].count("GET") == len(on_patch)


async def test_patch_recovery_gives_up_clearly(tmp_path) -> None:
    """A PATCH that landed while the old location went stale (registry 2.8's `_state`):
    the upload cannot go on, and the error says so (EIO, never ENOENT); persistent 500s
    end after the client's retries."""
    with pytest.raises(RemoteUnavailable, match="cannot go on"):
        await upload_through(ScriptedRegistry("stale"), tmp_path, b"x" * 100)
    script = ScriptedRegistry(*["500"] * 10)
    with pytest.raises(RemoteUnavailable, match="500"):
        await upload_through(script, tmp_path, b"x" * 100)
    assert [m for m, _ in script.calls].count("PATCH") == 4  # 1 + retries


@pytest.mark.registry
async def test_refused_commit_keeps_the_upload(served: RegistryServer, tmp_path) -> None:
    """When regfs cannot check the digest itself (the hash state was lost), the registry
    refuses the PUT, and registry 2.8 keeps the upload (its cancel fails after a commit):
    so does regfs, and the right digest then finishes it."""
    data = b"the content " * 100
    records = UploadRecords(tmp_path / "records")
    async with RemoteClient(served.url, timeout=5) as client:
        upload = await RemoteUpload.start(client, records, "refused/app", "x")
        await upload.write_at(0, data)
        await upload.close()
        record = records.load(upload.uuid)
        record.hash_state = None
        records.save(record)
        resumed = await RemoteUpload.resume(client, records, upload.uuid)
        with pytest.raises(DigestMismatch):
            await resumed.finish(Digest.parse(digest_of(b"other")))
        await resumed.close()  # as regfs does after a refused finish: the writer lets go
        assert [r.uuid for r in records.of("refused/app")] == [upload.uuid]
        resumed = await RemoteUpload.resume(client, records, upload.uuid)
        await resumed.finish(Digest.parse(digest_of(data)))
    assert served.client().get_blob("refused/app", digest_of(data)) == data
    assert not records.of("refused/app")
