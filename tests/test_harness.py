"""Prove the test harness against the real registry, skopeo and umoci.

Also pins down, as executable facts, the registry behaviour regfs must match: the on-disk
layout after a push, the upload `_state` token, `startedat` and the saved hash states.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import socket
import ssl
import time
import uuid as uuidlib
from pathlib import Path

import httpx
import pytest
from support.loopback import LoopbackHandler, LoopbackHTTP
from support.mounts import wait_until
from support.oci import build_image, build_large_image, read_oci_layout, skopeo_pull, skopeo_push
from support.registry import (
    OCI_MANIFEST,
    TEST_SECRET,
    RegistryServer,
    blob_data_path,
    go_sha256_state,
    go_time,
    parse_state_token,
    repo_path,
    state_from_location,
    upload_path,
    upload_state_token,
    write_self_signed_cert,
)
from support.tools import digest_of

RFC3339_SECONDS = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def read_link(path: Path) -> str:
    """A link file's digest, asserting the exact `sha256:<64 hex>` form, no newline."""
    raw = path.read_bytes()
    assert re.fullmatch(rb"sha256:[0-9a-f]{64}", raw), (path, raw)
    return raw.decode()


# --------------------------------------------------------------------------- offline facts


@pytest.mark.storage
def test_token_known_vector() -> None:
    """A token taken from a real registry 2.8.2 (secret `test-secret`)."""
    token = upload_state_token(
        "test-secret", "a/b", "ba7b54ef-78f5-4e30-b5f0-606196e214f0", 100, "2026-11-23T03:00:31Z"
    )
    assert token == (
        "DBAmUoHrm1ORF_c45K_SMfAS_vioF3O2bD7-hHVtNUt7Ik5hbWUiOiJhL2IiLCJVVUlEIjoiYmE3YjU0ZWYtNzhm"
        "NS00ZTMwLWI1ZjAtNjA2MTk2ZTIxNGYwIiwiT2Zmc2V0IjoxMDAsIlN0YXJ0ZWRBdCI6IjIwMjYtMTEtMjNUMDM6"
        "MDA6MzFaIn0="
    )
    state = parse_state_token("test-secret", token)
    assert (state.name, state.offset, state.started_at) == ("a/b", 100, "2026-11-23T03:00:31Z")
    with pytest.raises(ValueError):
        parse_state_token("other-secret", token)


@pytest.mark.storage
def test_go_time_format() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    assert go_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert go_time(datetime(2026, 1, 2, 3, 4, 5, 120000, UTC)) == "2026-01-02T03:04:05.12Z"
    plus1 = datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    assert go_time(plus1) == "2026-01-02T03:04:05Z"


@pytest.mark.storage
def test_go_sha256_state_empty() -> None:
    """The fresh state: magic, SHA-256 initial words, empty block, length 0."""
    state = go_sha256_state(b"")
    assert len(state) == 108
    assert state[:4] == b"sha\x03"
    assert state[4:8] == bytes.fromhex("6a09e667") and state[32:36] == bytes.fromhex("5be0cd19")
    assert state[36:] == bytes(72)


@pytest.mark.storage
def test_no_test_module_imports_another() -> None:
    """What test modules share lives in tests/support/ (docs/testing.md): no module of the
    suite imports a test module or conftest.py, whose fixtures pytest hands out itself."""
    tests = Path(__file__).parent
    wrong = {}
    for path in sorted([*tests.glob("*.py"), *tests.glob("support/*.py")]):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        tops = {name.split(".")[0] for name in imported}
        if found := sorted(n for n in tops if n == "conftest" or n.startswith("test_")):
            wrong[str(path.relative_to(tests))] = found
    assert wrong == {}


# A part of a test file's name that says who wrote it when, not what it tests: a session
# (s25, stop25), a helper of one (h2, f1, r1, as26, h2s25, s26e), a review or the lead.
WRITER_CODE = re.compile(
    r"(?:[a-z]{0,2}\d{0,2}s\d{2}[a-z]?|[a-hr]\d{1,2}|stop\d+|review|lead)", re.I
)


def writer_codes(name: str) -> list[str]:
    """The parts of a test file's name (split at `_`) that name a session or helper."""
    stem = name.removesuffix(".py").removeprefix("test_")
    return [part for part in stem.split("_") if WRITER_CODE.fullmatch(part)]


@pytest.mark.storage
def test_test_files_are_named_for_what_they_test() -> None:
    """A test file is named for what it tests: tests/test_<module>.py, or test_<topic>_*.py
    for end-to-end tests (docs/testing.md), never for the session or helper that wrote it,
    which the next engineer looking for a module's tests cannot guess."""
    examples = {
        "test_h2s25_statahead.py": ["h2s25"],
        "test_review_s26e.py": ["review", "s26e"],
        "test_as26_tag_contents.py": ["as26"],
        "test_lead_s25_rmdir.py": ["lead", "s25"],
        "test_h10_closes_review.py": ["h10", "review"],
        "test_s3_driver.py": [],
        "test_pyfuse3_loop.py": [],
    }
    assert {name: writer_codes(name) for name in examples} == examples
    tests = Path(__file__).parent
    wrong = {
        path.name: codes for path in tests.glob("test_*.py") if (codes := writer_codes(path.name))
    }
    assert wrong == {}, (
        "name these test files for what they test (the module or topic: tests/test_<module>.py,"
        " test_<topic>_*.py; docs/testing.md), not for the session or helper that wrote them:"
        f" {wrong}"
    )


OUTSIDE = re.compile(r"\.\./shared|\b(?:ROOTFS|S3|SPEC|LAYOUT|PERF|STYLE)\.md\b")


@pytest.mark.storage
def test_no_word_points_outside_the_project() -> None:
    """Code, tests and docs name only what the project holds: the facts they rest on are in
    docs/, not in files a clone does not have (the planning notes beside the checkout)."""
    project = Path(__file__).parent.parent
    files = [project / name for name in ("README.md", "CHANGELOG.md", "Makefile", "pyproject.toml")]
    for top in ("storage", "regfs", "tests", "bench", "docs", "third_party"):
        files += [p for p in (project / top).rglob("*") if p.suffix in {".py", ".md", ".toml"}]
    found = [
        f"{path.relative_to(project)}:{number}"
        for path in files
        if "results" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line) and path.name != "test_harness.py"
    ]
    assert found == []


# --------------------------------------------------------------------------- the server


@pytest.mark.registry
def test_server_lifecycle(tmp_path: Path) -> None:
    server = RegistryServer(tmp_path / "root")
    with server:
        assert server.running
        assert server.url == f"http://127.0.0.1:{server.port}" and server.host in server.url
        config = server.config_path.read_text()
        assert "enabled: false" in config and TEST_SECRET in config
        assert not server.config_path.is_relative_to(server.root)
        assert httpx.get(f"{server.url}/v2/").status_code == 200
        proc = server._proc
        assert proc is not None
    assert not server.running and proc.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/v2/", timeout=1)
    with server:  # restartable on the same root
        assert httpx.get(f"{server.url}/v2/").status_code == 200
    assert not server.running
    assert not (tmp_path / "root" / "config.yml").exists()


@pytest.mark.registry
def test_server_start_failure_reports_log(tmp_path: Path) -> None:
    server = RegistryServer(tmp_path / "root", log_level="nonsense")
    with pytest.raises(RuntimeError, match=r"exited with .*\n.*nonsense"):
        server.start()
    assert not server.running


@pytest.mark.registry
def test_server_retries_taken_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with RegistryServer(tmp_path / "root", port=taken) as server:
            assert server.port != taken and server.running


class _Hello(LoopbackHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")


@pytest.mark.storage
@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_loopback_server_hangs_up_on_its_clients_at_stop(tmp_path: Path, https: bool) -> None:
    """LoopbackHTTP (the stubs', the token server's and the fault proxy's) stops at once
    with clients still connected: one idle in a client's pool of kept connections, one
    that stopped in the middle of a request. Each held a handler thread, which stop joins,
    for the handler's timeout (5 s), or for good while its client went on sending."""
    server_tls = client_tls = None
    if https:
        tls = write_self_signed_cert(tmp_path / "cert.pem", tmp_path / "key.pem")
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(tls.cert, tls.key)
        client_tls = ssl.create_default_context(cafile=tls.cert)
    http = LoopbackHTTP(_Hello, None, "hello", server_tls)
    url = f"{'https' if https else 'http'}://127.0.0.1:{http.port}/"
    stalled = socket.create_connection(("127.0.0.1", http.port))
    if client_tls is not None:
        stalled = client_tls.wrap_socket(stalled, server_hostname="127.0.0.1")
    try:
        with httpx.Client(verify=client_tls or True) as client:
            assert client.get(url).content == b"hello"  # its connection stays in the pool
            stalled.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # no end of the headers
            wait_until(lambda: http.connections == 2, 5, "the server to see both clients")
            start = time.monotonic()
            http.stop()
            assert time.monotonic() - start < 2
            assert http.connections == 0
            stalled.settimeout(5)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert stalled.recv(1) == b""  # hung up on, not answered
            with pytest.raises(httpx.TransportError):
                client.get(url, timeout=1)
    finally:
        stalled.close()
        http.stop()


# --------------------------------------------------------------------------- push and pull


@pytest.mark.registry
def test_push_pull_roundtrip(tmp_path: Path, registry_server: RegistryServer) -> None:
    files = {
        "etc/hello": b"hello\n",
        "usr/share/doc/a.txt": b"a" * 1000,
        "bin/tool": os.urandom(5000),
        "var/empty": b"",
    }
    image = build_image(tmp_path / "layout", "v1", files, layers=3)
    assert len(image.layer_digests) == 3 and len(set(image.layer_digests)) == 3
    assert image.media_type == OCI_MANIFEST

    name = "regfs/test/app"
    skopeo_push(tmp_path / "layout", "v1", registry_server.host, name, "v1")
    client = registry_server.client()

    # HTTP: the manifest and every blob are byte-identical to the layout's.
    got = client.get_manifest(name, "v1")
    assert got.body == image.manifest
    assert got.digest == image.digest == digest_of(got.body)
    assert got.media_type == OCI_MANIFEST
    assert client.get_manifest(name, image.digest).body == image.manifest
    for digest in image.blob_digests:
        data = client.get_blob(name, digest)
        assert digest_of(data) == digest and data == image.blob(digest)
    assert client.tags(name) == ["v1"]
    assert client.catalog() == [name]

    # Disk: the layout described in docs/layout.md.
    root = registry_server.root
    for digest in (image.digest, *image.blob_digests):
        assert blob_data_path(root, digest).read_bytes() == image.blob(digest)
    repo = repo_path(root, name)
    layer_links = {read_link(p) for p in repo.glob("_layers/sha256/*/link")}
    assert layer_links == set(image.blob_digests)  # config + layers, not the manifest
    for p in repo.glob("_layers/sha256/*/link"):
        assert read_link(p) == "sha256:" + p.parent.name
    revisions = [read_link(p) for p in repo.glob("_manifests/revisions/sha256/*/link")]
    assert revisions == [image.digest]
    tag_dir = repo / "_manifests/tags/v1"
    assert read_link(tag_dir / "current/link") == image.digest
    hexd = image.digest.removeprefix("sha256:")
    assert read_link(tag_dir / "index/sha256" / hexd / "link") == image.digest
    assert not any((repo / "_uploads").glob("*"))  # finished uploads leave nothing

    # Pull back into a fresh layout: same digests, same bytes.
    pulled = skopeo_pull(registry_server.host, name, "v1", tmp_path / "pulled", "copy")
    assert (pulled.digest, pulled.manifest) == (image.digest, image.manifest)
    assert pulled.blob_digests == image.blob_digests
    for digest in pulled.blob_digests:
        assert pulled.blob(digest) == image.blob(digest)
    assert read_oci_layout(tmp_path / "pulled", "copy") == pulled


@pytest.mark.registry
def test_large_image(tmp_path: Path, registry_server: RegistryServer) -> None:
    size = 3 * 1024 * 1024 + 123
    image = build_large_image(tmp_path / "layout", "big", size, seed=7)
    big = image.layer_digests[0]
    assert len(image.blob(big)) > size  # random data does not compress
    # skopeo 1.9 keeps the manifest byte for byte even without --preserve-digests.
    skopeo_push(
        tmp_path / "layout",
        "big",
        registry_server.host,
        "big/one",
        "latest",
        preserve_digests=False,
    )
    client = registry_server.client()
    assert client.get_manifest("big/one", "latest").digest == image.digest
    assert client.get_blob("big/one", big) == image.blob(big)
    resp = client.request("GET", f"/v2/big/one/blobs/{big}", headers={"Range": "bytes=1000-1999"})
    assert resp.status_code == 206 and resp.content == image.blob(big)[1000:2000]


# --------------------------------------------------------------------------- uploads


@pytest.mark.registry
def test_state_token_matches_registry(registry_server: RegistryServer) -> None:
    """Tokens we derive are byte-identical to the registry's and are accepted by it."""
    client, name, secret = registry_server.client(), "tok/en", registry_server.secret
    location, uuid = client.start_upload(name)
    first = state_from_location(location)
    state = parse_state_token(secret, first)
    assert (state.name, state.uuid, state.offset) == (name, uuid, 0)
    # The POST's token carries the in-memory start time, with nanoseconds.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", state.started_at)
    assert upload_state_token(secret, name, uuid, 0, state.started_at) == first

    chunk1, chunk2 = os.urandom(100), os.urandom(70)
    location = client.patch_chunk(location, chunk1, 0)
    started = (upload_path(registry_server.root, name, uuid) / "startedat").read_text()
    mine = upload_state_token(secret, name, uuid, 100, started)
    assert state_from_location(location) == mine  # later tokens: startedat, whole seconds

    # Use our own token for the next chunk and for the final PUT.
    url = f"{registry_server.url}/v2/{name}/blobs/uploads/{uuid}"
    location = client.patch_chunk(str(httpx.URL(url, params={"_state": mine})), chunk2, 100)
    assert state_from_location(location) == upload_state_token(secret, name, uuid, 170, started)
    digest = digest_of(chunk1 + chunk2)
    mine = upload_state_token(secret, name, uuid, 170, started)
    resp = client.finish_upload(str(httpx.URL(url, params={"_state": mine})), digest)
    assert resp.headers["Docker-Content-Digest"] == digest
    assert client.get_blob(name, digest) == chunk1 + chunk2


@pytest.mark.registry
def test_finish_upload_written_in_storage(registry_server: RegistryServer) -> None:
    """An upload made directly on disk (no hash states) is finished over HTTP."""
    root, name, uuid = registry_server.root, "disk/made", str(uuidlib.uuid4())
    data = os.urandom(200_000)
    updir = upload_path(root, name, uuid)
    updir.mkdir(parents=True)
    (updir / "data").write_bytes(data)
    (updir / "startedat").write_bytes(b"2026-01-01T00:00:00Z")
    # The registry needs _layers to list the repo, not to finish an upload into it.
    token = upload_state_token(TEST_SECRET, name, uuid, len(data), "2026-01-01T00:00:00Z")
    url = httpx.URL(
        f"{registry_server.url}/v2/{name}/blobs/uploads/{uuid}", params={"_state": token}
    )
    digest = digest_of(data)
    registry_server.client().finish_upload(str(url), digest)
    assert blob_data_path(root, digest).read_bytes() == data
    hexd = digest.removeprefix("sha256:")
    assert read_link(repo_path(root, name) / "_layers/sha256" / hexd / "link") == digest
    assert not updir.exists()


@pytest.mark.registry
def test_state_token_rejections(registry_server: RegistryServer) -> None:
    """Bad MAC, wrong UUID, unknown upload, wrong offset: all 404, nothing deleted."""
    client, name = registry_server.client(), "re/ject"
    location, uuid = client.start_upload(name)
    location = client.patch_chunk(location, b"x" * 10, 0)
    started = parse_state_token(TEST_SECRET, state_from_location(location)).started_at
    url = f"{registry_server.url}/v2/{name}/blobs/uploads/{uuid}"

    def status(token: str) -> tuple[int, str]:
        resp = client.request("GET", url, params={"_state": token})
        codes = [e["code"] for e in resp.json()["errors"]] if resp.content else []
        return resp.status_code, ",".join(codes)

    assert status(upload_state_token(TEST_SECRET, name, uuid, 10, started))[0] == 204
    assert status(upload_state_token("wrong", name, uuid, 10, started)) == (
        404,
        "BLOB_UPLOAD_INVALID",
    )
    other = str(uuidlib.uuid4())
    assert status(upload_state_token(TEST_SECRET, name, other, 0, started))[1] == (
        "BLOB_UPLOAD_INVALID"  # UUID in token != UUID in URL
    )
    ghost = f"{registry_server.url}/v2/{name}/blobs/uploads/{other}"
    resp = client.request(
        "GET", ghost, params={"_state": upload_state_token(TEST_SECRET, name, other, 0, started)}
    )
    assert resp.status_code == 404 and "BLOB_UPLOAD_UNKNOWN" in resp.text
    updir = upload_path(registry_server.root, name, uuid)
    assert updir.exists()
    assert status(upload_state_token(TEST_SECRET, name, uuid, 9, started)) == (
        404,
        "BLOB_UPLOAD_INVALID",
    )
    # blobupload.go means to cancel the upload on an offset mismatch, but its deferred
    # Close runs first, so the Cancel fails ("already closed") and the upload survives.
    assert (updir / "data").read_bytes() == b"x" * 10
    assert status(upload_state_token(TEST_SECRET, name, uuid, 10, started))[0] == 204


@pytest.mark.registry
def test_registry_hash_states_and_startedat(registry_server: RegistryServer) -> None:
    """Record what the registry itself writes under `_uploads/<uuid>`."""
    client, name = registry_server.client(), "hash/states"
    location, uuid = client.start_upload(name)
    updir = upload_path(registry_server.root, name, uuid)
    states = updir / "hashstates/sha256"

    # At POST: empty data, startedat (RFC 3339, UTC, whole seconds, no newline), state 0.
    assert (updir / "data").read_bytes() == b""
    started = (updir / "startedat").read_bytes()
    assert RFC3339_SECONDS.fullmatch(started) and len(started) == 20
    in_token = parse_state_token(TEST_SECRET, state_from_location(location)).started_at
    assert in_token[:19] == started.decode()[:19]  # same instant, token has the fraction
    assert sorted(p.name for p in states.iterdir()) == ["0"]
    assert (states / "0").read_bytes() == go_sha256_state(b"")
    # Any request that resumes the upload saves the state of what it hashed: a GET, nothing.
    (states / "0").write_bytes(b"junk")
    assert client.request("GET", location).status_code == 204
    assert (states / "0").read_bytes() == go_sha256_state(b"")

    # After each chunk: a state named by the decimal byte count; older ones stay.
    chunk1, chunk2 = os.urandom(100), os.urandom(130)
    location = client.patch_chunk(location, chunk1, 0)
    location = client.patch_chunk(location, chunk2, 100)
    assert sorted(int(p.name) for p in states.iterdir()) == [0, 100, 230]
    one = (states / "100").read_bytes()
    assert len(one) == 108 and one.startswith(b"sha\x03")
    assert one == go_sha256_state(chunk1)
    assert one[36:100] == chunk1[64:] + bytes(28)  # pending bytes, zero padded
    assert int.from_bytes(one[100:], "big") == 100  # length in bytes, not bits
    assert (states / "230").read_bytes() == go_sha256_state(chunk1 + chunk2)
    assert (updir / "startedat").read_bytes() == started  # never rewritten

    client.finish_upload(location, digest_of(chunk1 + chunk2))
    assert not updir.exists()


@pytest.mark.registry
def test_registry_hash_states_after_gap(registry_server: RegistryServer) -> None:
    """A PATCH onto data with no state at its size: the registry hashes only the new bytes
    and saves that state under their count, not the offset. Such states do not describe
    the data's prefix, so regfs must not resume from them; commit still re-reads all."""
    client, name, uuid = registry_server.client(), "gap/py", str(uuidlib.uuid4())
    updir = upload_path(registry_server.root, name, uuid)
    updir.mkdir(parents=True)
    old, new = os.urandom(1000), os.urandom(100)
    (updir / "data").write_bytes(old)
    (updir / "startedat").write_bytes(b"2026-01-01T00:00:00Z")
    token = upload_state_token(TEST_SECRET, name, uuid, len(old), "2026-01-01T00:00:00Z")
    url = httpx.URL(
        f"{registry_server.url}/v2/{name}/blobs/uploads/{uuid}", params={"_state": token}
    )
    location = client.patch_chunk(str(url), new, len(old))
    states = updir / "hashstates/sha256"
    assert [p.name for p in states.iterdir()] == ["100"]
    assert (states / "100").read_bytes() == go_sha256_state(new)  # not old + new
    client.finish_upload(location, digest_of(old + new))
    assert blob_data_path(registry_server.root, digest_of(old + new)).read_bytes() == old + new
