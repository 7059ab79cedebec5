"""A hostile or broken registry (issue 13): each test plays one attack from a loopback stub
and proves regfs refuses it for that call only, with a log line, never a dead daemon.

- upload ids that would name a record file outside the records directory;
- bodies, listings and caches that would grow the daemon's memory without bound;
- 401 challenges from a redirect target, which must never get credentials;
- blob bytes that do not match their digest, and https → http redirects;
- server text with newlines in the log, signed URLs in the debug log, `insecure` beyond
  the registry's own host.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import trio
from support.fault_server import Fault, FaultServer
from support.loopback import LoopbackHandler, LoopbackHTTP
from support.registry import (
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryServer,
    blob_data_path,
    write_self_signed_cert,
)
from support.tools import MIB

import storage.remote.registry as remote_registry
from storage.api import BlobInfo, Manifest
from storage.digests import digest_bytes
from storage.errors import AccessDenied, CorruptEntry, RemoteUnavailable
from storage.remote.auth import Token, TokenCache
from storage.remote.client import RemoteClient, RemoteError, RemoteTooLarge, TLSError
from storage.remote.credentials import Credentials
from storage.remote.reader import InOrderDigest, ReadAheadBudget, RemoteLayerReader
from storage.remote.registry import RemoteRegistry
from storage.remote.untrusted import MANIFEST_MAX, RANGE_SKIP_MAX, ByteCache, shown
from storage.remote.uploads import RemoteUpload, UnsafeUploadId, UploadRecords

pytestmark = [
    pytest.mark.remote,
    # Where the client stops reading at a cap (what these tests prove), it closes its own body
    # generator and httpx's `aiter_raw`, but the generators nested inside httpx and httpcore
    # cannot be closed from outside: they are left to the garbage collector, and trio warns
    # (encode/httpx#3686, unreleased in httpx 0.28.1 / httpcore 1.0.9). Only those are let by.
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(httpx|httpcore)\..*' was garbage collected:ResourceWarning"
    ),
]

UPLOADS = "/v2/x/blobs/uploads/"
BLOB = "/v2/x/blobs/sha256:" + "0" * 64
SLACK = 32 * MIB  # what loopback socket buffers and receives may hold beyond a cap
USER, PASSWORD = "alice", "s3cret-hostile"


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def tls(tmp_path: Path) -> Callable[[str], tuple[ssl.SSLContext, Path]]:
    """tls(name) → (a server context, its self-signed certificate, which is its own CA)."""

    def make(name: str) -> tuple[ssl.SSLContext, Path]:
        files = write_self_signed_cert(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key)
        return context, files.cert

    return make


@dataclass(eq=False)
class Stub:
    """A registry stub whose answers each test scripts (`respond`), that counts the body
    bytes it sent and sees a client hang up on an answer it was still sending."""

    respond: Callable[[BaseHTTPRequestHandler], None]
    paths: list[str] = field(default_factory=list)
    sent: int = 0
    hung_up: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    http: LoopbackHTTP | None = None

    @property
    def url(self) -> str:
        assert self.http is not None
        return f"http://127.0.0.1:{self.http.port}"

    def answer(self, h: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
        h.send_response(status)
        named = {key.replace("_", "-"): value for key, value in headers.items()}
        named.setdefault("Content-Length", str(len(body)))
        for key, value in named.items():
            h.send_header(key, value)
        h.end_headers()
        if h.command != "HEAD":
            self.send(h, body)

    def flood(
        self, h: BaseHTTPRequestHandler, status: int, most: int = 1 << 30, **headers: str
    ) -> None:
        """`status`, then a body of `a`s that goes on until the client hangs up (or `most`);
        without a Content-Length it ends only when the connection does."""
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key.replace("_", "-"), value)
        if "Content_Length" not in headers:
            h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        chunk = b"a" * (64 << 10)
        left = most
        while left > 0 and not self.stopping.is_set() and self.send(h, chunk[:left]):
            left -= len(chunk)

    def send(self, h: BaseHTTPRequestHandler, data: bytes) -> bool:
        """Whether `data` went out; False once the client has hung up."""
        try:
            h.wfile.write(data)
            h.wfile.flush()
        except OSError:
            self.hung_up.set()
            return False
        self.sent += len(data)
        return True


class StubHandler(LoopbackHandler):
    def _handle(self) -> None:
        stub: Stub = self.server.owner  # type: ignore[attr-defined]
        stub.paths.append(self.path)
        stub.respond(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


@pytest.fixture
def stub() -> Iterator[Callable[[Callable[[BaseHTTPRequestHandler], None]], Stub]]:
    """stub(respond) → a started Stub; all stopped at teardown."""
    started: list[Stub] = []

    def start(respond: Callable[[BaseHTTPRequestHandler], None]) -> Stub:
        s = Stub(respond)
        s.http = LoopbackHTTP(StubHandler, s, "hostile-stub")
        started.append(s)
        return s

    yield start
    for s in started:
        s.stopping.set()
        assert s.http is not None
        s.http.stop()


def client_of(url: str, **kw: object) -> RemoteClient:
    return RemoteClient(url, timeout=3, retries=0, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- upload ids


@pytest.mark.parametrize("given", ["../../../victim", "a/b", "..", ".hidden", "x" * 129, ""])
async def test_an_upload_id_never_names_a_file_outside_the_records(
    tmp_path: Path, fault_server: FaultServer, caplog: pytest.LogCaptureFixture, given: str
) -> None:
    """`Docker-Upload-UUID: ../../../victim` once overwrote, and later deleted, a file
    outside the state directory. It is refused with a log line, the upload is cancelled
    at the registry, and nothing is written anywhere."""
    records = UploadRecords(tmp_path / "state" / "uploads" / "host")
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    fault_server.inject(
        Fault(
            202,
            method="POST",
            headers=(("Docker-Upload-UUID", given), ("Location", UPLOADS + "u1")),
        )
    )
    async with RemoteClient(fault_server.url, timeout=2, retries=0) as client:
        with pytest.raises(UnsafeUploadId, match="not a safe file name"):
            await RemoteUpload.start(client, records, "x", "label")
    assert victim.read_text() == "precious"
    assert not records.directory.exists() or not any(records.directory.iterdir())
    assert [s.method for s in fault_server.seen] == ["POST", "DELETE"]
    assert "refusing the upload id" in caplog.text


async def test_uuid_ids_are_kept_and_a_missing_one_is_named_here(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    records = UploadRecords(tmp_path / "records")
    uuid = "0f6d3a8e-6a37-4c43-9a52-2f1c8f7e5b10"
    fault_server.inject(
        Fault(
            202, method="POST", headers=(("Docker-Upload-UUID", uuid), ("Location", UPLOADS + uuid))
        ),
        Fault(202, method="POST", headers=(("Location", UPLOADS + "other"),)),
    )
    async with RemoteClient(fault_server.url, timeout=2, retries=0) as client:
        first = await RemoteUpload.start(client, records, "x", None)
        second = await RemoteUpload.start(client, records, "x", None)
        for upload in (first, second):  # its writer's lock file goes; the record stays
            await upload.close()
    assert first.uuid == uuid
    assert sorted(p.name for p in records.directory.iterdir()) == sorted(
        [f"{uuid}.json", f"{second.uuid}.json"]
    )


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("declared", [True, False])
async def test_a_huge_manifest_is_not_read(tmp_path: Path, stub, declared: bool) -> None:
    """A manifest answered with a 10 TB Content-Length (or a body that never ends) once
    grew the daemon past a GB from `ls tags/`: the fetch fails at the 4 MiB cap, having
    read no further, and the registry is hung up on."""
    length = {"Content_Length": str(10 << 40)} if declared else {}
    s = stub(lambda h: s.flood(h, 200, Content_Type="application/json", **length))
    async with client_of(s.url) as client:
        manifests = RemoteRegistry(client, tmp_path).repository("x").manifests
        with pytest.raises(RemoteTooLarge, match=f"over the {MANIFEST_MAX} bytes"):
            await manifests.fetch("v1")
    assert s.hung_up.wait(10)
    assert s.sent < (SLACK if declared else MANIFEST_MAX + SLACK)


@pytest.mark.parametrize("status", [400, 404, 500, 401, 307])
async def test_an_endless_error_body_is_not_read(stub, status: int) -> None:
    """Error, challenge and redirect bodies are read to ~64 KiB for their message only."""
    headers = {"WWW_Authenticate": 'Basic realm="r"'} if status == 401 else {}
    if status == 307:
        headers["Location"] = "/v2/elsewhere"
    s = stub(lambda h: s.flood(h, status, **headers))
    async with client_of(s.url, credentials=Credentials(USER, PASSWORD)) as client:
        with pytest.raises((RemoteError, RemoteUnavailable, AccessDenied)):
            await client.request("GET", "/v2/x/tags/list", follow_redirects=False)
    assert s.hung_up.wait(10)
    assert s.sent < SLACK


def endless_pages(
    s: Stub, names_per_page: int, loop: bool = False
) -> Callable[[BaseHTTPRequestHandler], None]:
    """A `_catalog` whose `Link: next` never ends (or leads back to the same page)."""

    def respond(h: BaseHTTPRequestHandler) -> None:
        page = len(s.paths)
        names = [f"r{page:06d}-{i:05d}" for i in range(names_per_page)]
        last = 0 if loop else page
        link = f'</v2/_catalog?n=100000&last=r{last:06d}>; rel="next"'
        s.answer(h, 200, json.dumps({"repositories": names}).encode(), Link=link)

    return respond


@pytest.mark.parametrize(
    ("cap", "names_per_page", "loop", "error", "pages"),
    [
        ("LISTING_PAGES_MAX", 1, False, "past 30 pages", 30),
        ("LISTING_NAMES_MAX", 1000, False, "past 2500 names", 3),
        ("LISTING_BYTES_MAX", 1000, False, "past 50000 bytes", 3),
        (None, 1, True, "loops back", 2),
    ],
)
async def test_a_listing_that_never_ends_stops_at_its_caps(
    tmp_path: Path, stub, monkeypatch, cap, names_per_page, loop, error, pages
) -> None:
    """An endless `_catalog` once reached 5.2 GB: pages, names and bytes of one listing
    are capped, and a `Link` back to a page already read ends it."""
    monkeypatch.setattr(remote_registry, "LISTING_PAGES_MAX", 30)
    monkeypatch.setattr(remote_registry, "LISTING_NAMES_MAX", 2500)
    monkeypatch.setattr(remote_registry, "LISTING_BYTES_MAX", 50_000)
    if cap == "LISTING_BYTES_MAX":
        monkeypatch.setattr(remote_registry, "LISTING_NAMES_MAX", 10**6)
    s = stub(lambda h: None)
    s.respond = endless_pages(s, names_per_page, loop)
    async with client_of(s.url) as client:
        catalog = RemoteRegistry(client, tmp_path).catalog
        with pytest.raises(RemoteError, match=error):
            await catalog.children("")
    assert len(s.paths) == pages


async def test_a_listing_page_over_its_cap_is_not_read(tmp_path: Path, stub) -> None:
    s = stub(lambda h: s.flood(h, 200, Content_Type="application/json"))
    async with client_of(s.url) as client:
        with pytest.raises(RemoteTooLarge):
            await RemoteRegistry(client, tmp_path).repository("x").tags.list()
    assert s.hung_up.wait(10)
    assert s.sent < remote_registry.PAGE_MAX + SLACK


async def test_a_listing_that_is_not_one_is_an_error(tmp_path: Path, stub) -> None:
    s = stub(lambda h: s.answer(h, 200, b'{"tags": [1, {"x": 2}]}'))
    async with client_of(s.url) as client:
        with pytest.raises(RemoteError, match="not a listing of tags"):
            await RemoteRegistry(client, tmp_path).repository("x").tags.list()


async def test_the_catalog_is_sorted_once_per_change(tmp_path: Path, stub) -> None:
    names = ["b/c", "a", "a-b", "a/x/y", "z"]
    s = stub(lambda h: s.answer(h, 200, json.dumps({"repositories": names}).encode()))
    async with client_of(s.url) as client:
        registry = RemoteRegistry(client, tmp_path, listing_ttl=60)
        catalog = registry.catalog
        first = await catalog._all()
        assert first == sorted(names)
        assert await catalog._all() is first  # not sorted again
        assert await catalog.children("") == ["a", "a-b", "b", "z"]
        assert await catalog.children("a") == ["x"]
        assert await catalog.exists("a/x") and await catalog.exists("b")
        assert not await catalog.exists("a/x/y/z") and not await catalog.exists("y")
        assert await catalog.is_repository("a-b") and not await catalog.is_repository("b")
        assert await catalog.repositories(2, last="a") == ["a-b", "a/x/y"]
        await registry.create_repository("m/n")
        assert await catalog.children("") == ["a", "a-b", "b", "m", "z"]
    assert len(s.paths) == 1


def index_chain(depth: int) -> dict[str, bytes]:
    """OCI indexes by digest, each naming the next (`depth` deep), and `v1` for the top."""
    manifests: dict[str, bytes] = {}
    below: list[dict[str, object]] = []
    for _ in range(depth):
        data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": below}).encode()
        digest = str(digest_bytes(data))
        manifests[digest] = manifests["v1"] = data
        below = [{"mediaType": OCI_INDEX, "digest": digest, "size": len(data)}]
    return manifests


async def test_a_deep_index_is_walked_only_so_far(tmp_path: Path, stub, monkeypatch) -> None:
    """layers/ reads the manifests that tags lead to: indexes of indexes end at a cap."""
    monkeypatch.setattr(remote_registry, "MANIFESTS_WALKED_MAX", 3)
    manifests = index_chain(5)

    def respond(h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/v2/x/tags/list"):
            s.answer(h, 200, b'{"tags": ["v1"]}')
            return
        data = manifests[h.path.rpartition("/")[2]]
        s.answer(
            h, 200, data, Content_Type=OCI_INDEX, Docker_Content_Digest=str(digest_bytes(data))
        )

    s = stub(respond)
    async with client_of(s.url) as client:
        layers = RemoteRegistry(client, tmp_path).repository("x").layers
        with pytest.raises(RemoteTooLarge, match="over 3 manifests"):
            await layers.list()


def test_tokens_are_bounded_in_bytes() -> None:
    """A token server picks the size of its tokens (up to the 1 MiB body cap), one per
    repository used: the cache keeps what fits."""
    cache = TokenCache(max_bytes=4 * MIB)
    for i in range(100):
        cache.put(f"repository:r{i}:pull", Token("t" * MIB, time.monotonic() + 300))
    assert len(cache) == 3 and cache.get("repository:r99:pull") is not None
    assert cache.get("repository:r0:pull") is None


async def test_a_head_is_not_held_to_a_body_cap(tmp_path: Path, stub) -> None:
    """A HEAD's Content-Length is the blob's size, not a body to read."""
    s = stub(lambda h: s.answer(h, 200, b"", Content_Length=str(10 << 30)))
    async with client_of(s.url) as client:
        layers = RemoteRegistry(client, tmp_path).repository("x").layers
        assert (await layers.stat(digest_bytes(b""))).size == 10 << 30


def test_caches_are_bounded_in_bytes(tmp_path: Path) -> None:
    """256 manifests of 4 MiB were 1 GiB: the cache holds what fits in its bytes."""
    cache: ByteCache[str, bytes] = ByteCache(10 * MIB, lambda _, v: len(v))
    for i in range(20):
        cache.put(str(i), bytes(MIB))
    assert cache.used == 10 * MIB and len(cache) == 10 and cache.get("19") is not None
    cache.put("huge", bytes(11 * MIB))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.used <= 10 * MIB
    registry = RemoteRegistry(RemoteClient("http://127.0.0.1:9"), tmp_path)
    manifest = Manifest(digest_bytes(b"m"), "application/json", bytes(MANIFEST_MAX))
    for i in range(256):
        registry.manifest_cache.put((f"r{i}", manifest.digest), manifest)
    assert registry.manifest_cache.used <= registry.manifest_cache.max_bytes <= 64 * MIB


async def test_a_registry_that_ignores_range_is_never_read_whole(stub) -> None:
    """A 200 with the whole blob to a Range request: only the bytes up to the range are
    read (the registry is hung up on); past RANGE_SKIP_MAX the read fails (EIO) at once."""
    size = 1 << 30
    s = stub(lambda h: s.flood(h, 200, most=size, Content_Length=str(size)))
    async with client_of(s.url) as client:
        assert await client.get_range(BLOB, 10, 20) == b"a" * 10
        assert s.hung_up.wait(10)
        assert s.sent < SLACK
        s.hung_up.clear()
        s.sent = 0
        with pytest.raises(RemoteError, match="ignores Range"):
            await client.get_range(BLOB, RANGE_SKIP_MAX + 1, RANGE_SKIP_MAX + 100)
    assert s.hung_up.wait(10)
    assert s.sent < SLACK


# --------------------------------------------------------------------------- credentials


async def test_a_redirect_targets_401_gets_no_credentials() -> None:
    """A blob GET redirected to host B, whose 401 names B's own token realm: regfs once
    sent the user's Basic credentials there and used B's token for the registry. B gets
    no Authorization and no token request, and the registry keeps its own auth."""
    with FaultServer() as registry, FaultServer() as other:
        realm = f'Bearer realm="{other.url}/token",service="evil"'
        other.inject(Fault(401, headers=(("WWW-Authenticate", realm),), path="/blob"), times=4)
        registry.inject(
            Fault(401, headers=(("WWW-Authenticate", 'Basic realm="r"'),), path="^/v2/$")
        )
        registry.inject(
            Fault(307, headers=(("Location", f"{other.url}/blob?sig=1"),), path="/blobs/"), times=4
        )
        async with client_of(registry.url, credentials=Credentials(USER, PASSWORD)) as client:
            await client.ping()
            with pytest.raises(AccessDenied, match="sends credentials to the registry only"):
                await client.get_range(BLOB, 0, 10)
            with pytest.raises(AccessDenied):
                await client.request("GET", BLOB)
            assert client._auth.scheme == "basic" and client._auth.realm is None
    assert [s.authorization for s in other.seen] == [None] * 3  # the thread's try, 2 clients
    assert not [s for s in other.seen if s.path.startswith("/token")]
    blob_gets = [s for s in registry.seen if "/blobs/" in s.path]
    assert blob_gets and all(s.authorization.startswith("Basic ") for s in blob_gets)


async def test_a_redirect_loop_ends(fault_server: FaultServer) -> None:
    fault_server.inject(Fault(307, headers=(("Location", BLOB),), path="/blobs/"), times=20)
    async with client_of(fault_server.url) as client:
        with pytest.raises(RemoteError, match="over 10 redirects"):
            await client.request("GET", BLOB)
    assert len(fault_server.seen) == 11


async def token_request(
    client: RemoteClient,
    method: str,
    url: str,
    authorization: str | None,
    content: bytes | None = None,
) -> None:
    """A request as RemoteClient sends one to a token server (its own Authorization)."""
    await client._send(
        method,
        url,
        headers={"Authorization": authorization} if authorization else None,
        params=None,
        content=content,
        expect=(200,),
        follow_redirects=True,
        retry_unsafe=True,
        stream=False,
        authenticate=False,
    )


async def test_a_caller_authorization_stays_with_its_origin() -> None:
    """A token request carries Basic credentials to the token server: a redirect from
    there to another host does not take them along."""
    with FaultServer() as tokens, FaultServer() as other:
        tokens.inject(Fault(302, headers=(("Location", f"{other.url}/t"),), path="/token"))
        async with client_of(tokens.url) as client:
            await token_request(client, "GET", f"{tokens.url}/token", "Basic c2VjcmV0")
    assert [s.authorization for s in tokens.seen] == ["Basic c2VjcmV0"]
    assert [s.authorization for s in other.seen] == [None]


async def test_an_identity_token_grant_is_not_redirected_elsewhere() -> None:
    """The refresh-token grant carries the identity token in its body: a 307 to another
    host would send it there again; refused."""
    with FaultServer() as tokens, FaultServer() as other:
        tokens.inject(Fault(307, headers=(("Location", f"{other.url}/t"),), path="/token"))
        async with client_of(tokens.url) as client:
            with pytest.raises(RemoteError, match="with the login in its body; refused"):
                grant = b"grant_type=refresh_token&refresh_token=idt-secret"
                await token_request(client, "POST", f"{tokens.url}/token", None, grant)
    assert other.seen == []


# --------------------------------------------------------------------------- blob bytes


def range_server(s: Stub, data: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    """A blob server that honours `Range` (206) and HEAD, for `data`."""

    def respond(h: BaseHTTPRequestHandler) -> None:
        wanted = h.headers.get("Range")
        if not wanted:
            s.answer(h, 200, data)
            return
        first, _, last = wanted.removeprefix("bytes=").partition("-")
        end = int(last) + 1 if last else len(data)
        body = data[int(first) : end]
        s.answer(h, 206, body, Content_Range=f"bytes {first}-{end - 1}/{len(data)}")

    return respond


async def read_whole(reader: RemoteLayerReader, size: int, step: int) -> bytes:
    """The blob read as `cat` reads it: in order, several reads in flight at once."""
    out: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        out[offset] = bytes(await reader.read_at(offset, step))

    for batch in range(0, size, step * 8):
        async with trio.open_nursery() as nursery:
            for offset in range(batch, min(batch + step * 8, size), step):
                nursery.start_soon(read, offset)
    return b"".join(out[o] for o in sorted(out))


@pytest.mark.parametrize("tampered", [False, True])
async def test_layer_bytes_are_checked_against_the_digest(
    stub, caplog: pytest.LogCaptureFixture, tampered: bool
) -> None:
    """A registry that sends other bytes for `layers/sha256:...` is not believed: the read
    that completes an in-order read of the blob fails (EIO), the log names both digests."""
    data = bytes(range(256)) * (12 << 12)  # 12 MiB
    sent = data[:-1] + b"!" if tampered else data
    s = stub(lambda h: None)
    s.respond = range_server(s, sent)
    async with client_of(s.url) as client:
        info = BlobInfo(digest_bytes(data), len(data), 0)
        reader = RemoteLayerReader(client, BLOB, info, ReadAheadBudget())
        try:
            if not tampered:
                assert await read_whole(reader, len(data), 128 << 10) == data
                return
            with pytest.raises(ExceptionGroup) as failed:
                await read_whole(reader, len(data), 128 << 10)
            assert failed.group_contains(CorruptEntry, match=digest_bytes(sent).hex)
            with pytest.raises(CorruptEntry):  # and every read after
                await reader.read_at(0, 10)
        finally:
            await reader.aclose()
    assert f"{digest_bytes(sent).hex}" in caplog.text and str(digest_bytes(data)) in caplog.text


def test_in_order_digest_takes_reads_out_of_order(monkeypatch) -> None:
    """Concurrent reads finish in any order (and some twice): the digest is still that of
    the blob in order; a reader that jumps too far ahead leaves the blob unchecked."""
    data = bytes(range(256)) * 64
    check = InOrderDigest(len(data))
    parts = [(o, data[o : o + 1000]) for o in range(0, len(data), 1000)]
    order = [1, 0, 3, 2, 2, 5, 4, *range(6, len(parts))]
    completes = []
    for i in order:
        pieces, complete = check.claim(*parts[i])
        check.hash(pieces)
        completes.append(complete)
    assert completes == [False] * (len(order) - 1) + [True]
    assert check.hexdigest() == digest_bytes(data).hex
    # A shorter window parked at the start of a longer one (a window fetched again after a
    # failure, or a read's own): the longer one's bytes stay parked, or the check would
    # wait forever for bytes it had (seen as a tampered blob read without a refusal).
    again = InOrderDigest(len(data))
    for offset, end in [(2000, 6000), (2000, 3000), (6000, len(data)), (0, 2000)]:
        pieces, complete = again.claim(offset, data[offset:end])
        again.hash(pieces)
    assert complete and again.hexdigest() == digest_bytes(data).hex
    monkeypatch.setattr(InOrderDigest, "AHEAD_MAX", 100)
    skipped = InOrderDigest(len(data))
    assert skipped.claim(5000, data[5000:6000]) == ([], False) and skipped.done


async def test_https_never_redirects_to_http(tls) -> None:
    """A blob redirected from https to plain http: refused, nothing is sent in clear."""
    context, cert = tls("registry")
    with FaultServer(tls=context) as registry, FaultServer() as plain:
        location = (("Location", f"{plain.url}/blob?sig=x"),)
        registry.inject(Fault(302, headers=location, path="/blobs/"), times=3)
        async with client_of(registry.url, ca_file=str(cert)) as client:
            with pytest.raises(RemoteError, match="https only leads to https"):
                await client.get_range(BLOB, 0, 10)
    assert plain.seen == []


# --------------------------------------------------------------------------- logs and TLS


async def test_server_text_cannot_forge_log_lines(
    fault_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "bad\n2026-11-29 12:00:00,000 ERROR regfs: forged\r"
    body = json.dumps({"errors": [{"code": "DENIED\nX", "message": forged}]}).encode()
    fault_server.inject(Fault(400, body=body), Fault(500, body=forged.encode(), headers=()))
    async with client_of(fault_server.url) as client:
        with pytest.raises(RemoteError) as refused:
            await client.request("GET", "/v2/x/tags/list")
        with pytest.raises(RemoteUnavailable) as failed:
            await client.request("GET", "/v2/x/tags/list")
    for message in (str(refused.value), str(failed.value)):
        assert "\n" not in message and "\r" not in message and "forged" in message
    assert "\\n2026" in str(refused.value)
    assert not [r for r in caplog.records if "\n" in r.getMessage()]
    assert shown("a\nb" + "c" * 300, 10) == "a\\nb" + "c" * 7 + "…"


async def test_signed_redirect_urls_are_logged_without_their_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--debug logged object storage's signed URLs whole: the query (its signature) is
    dropped from every line, on the range threads' path and on the client's."""
    caplog.set_level(logging.DEBUG)
    with FaultServer() as registry, FaultServer() as storage:
        signed = f"{storage.url}/blob?X-Amz-Signature=SIGNED-SECRET"
        registry.inject(Fault(307, headers=(("Location", signed),), path="/blobs/"), times=2)
        storage.inject(Fault(200, body=b"x" * 100, path="/blob"), times=2)  # ignores Range
        async with client_of(registry.url) as client:
            assert await client.get_range(BLOB, 0, 10) == b"x" * 10
    assert [s.path for s in storage.seen] == ["/blob?X-Amz-Signature=SIGNED-SECRET"] * 2
    # regfs's own lines (the daemon keeps httpx's and httpcore's at WARNING).
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("storage.")]
    assert any("/blob" in line for line in ours)
    assert not [line for line in ours if "SIGNED-SECRET" in line]


async def test_insecure_is_for_the_registrys_host_only(tls) -> None:
    """`insecure` turned TLS checks off for every host: a redirect target or a token
    server with an untrusted certificate is now refused, on both request paths."""
    registry_tls, _ = tls("registry")
    other_tls, _ = tls("other")
    with FaultServer(tls=registry_tls) as registry, FaultServer(tls=other_tls) as other:
        registry.inject(
            Fault(307, headers=(("Location", f"{other.url}/blob"),), path="/blobs/"), times=2
        )
        realm = (("WWW-Authenticate", f'Bearer realm="{other.url}/token"'),)
        registry.inject(Fault(401, headers=realm, path="/tags/"))
        async with client_of(registry.url, insecure=True) as client:
            await client.ping()  # the registry's own self-signed certificate is let through
            with pytest.raises(TLSError, match=r"127\.0\.0\.1"):
                await client.get_range(BLOB, 0, 10)
            with pytest.raises(TLSError):
                await client.request("GET", "/v2/x/tags/list")
    assert other.seen == []


# --------------------------------------------------------------------------- through a mount


def push_image(server: RegistryServer, name: str, layer: bytes) -> tuple[str, str]:
    """A config and one layer under `name:v1` in a real registry: (layer digest, manifest
    digest)."""
    client = server.client()
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    blobs = [(client.push_blob(name, data), len(data)) for data in (config, layer)]
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": blobs[0][0], "size": blobs[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": blobs[1][0], "size": blobs[1][1]}],
        }
    ).encode()  # fmt: skip
    put = client.request(
        "PUT", f"/v2/{name}/manifests/v1", content=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert put.status_code == 201, put.text
    return blobs[1][0], str(digest_bytes(manifest))


def read_errno(path: Path) -> int | None:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno
    return None


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch) -> None:
    """The daemon's upload records and Docker config stay in the test's directory."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "docker").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))


@pytest.mark.registry
@pytest.mark.mount
def test_tampered_layer_bytes_are_eio_through_the_mount(
    tmp_path: Path, registry_server: RegistryServer, mount, isolated
) -> None:
    """The registry serves a blob whose bytes on its disk were swapped: `cat` gets EIO on
    the read that completes the layer, the log names both digests, the mount lives on."""
    layer = os.urandom(3 * MIB)
    digest, _ = push_image(registry_server, "hostile/app", layer)
    tampered = bytearray(layer)
    tampered[len(layer) // 2] ^= 0xFF
    blob_data_path(tmp_path / "root", digest).write_bytes(tampered)
    m = mount(registry_server.url)
    path = m.path("hostile", "app", "layers", digest)
    assert os.stat(path).st_size == len(layer)
    assert read_errno(path) == errno.EIO
    log = m.log_text()
    assert digest in log and str(digest_bytes(bytes(tampered))) in log
    assert os.listdir(m.path("hostile", "app", "tags")) == ["v1"]


@pytest.mark.registry
@pytest.mark.mount
def test_a_huge_manifest_is_eio_through_the_mount(
    registry_server: RegistryServer, mount, isolated
) -> None:
    """A manifest answered with a 10 TB Content-Length: EIO for that file and one clear log
    line; the daemon is not grown, and goes on answering."""
    _, manifest_digest = push_image(registry_server, "hostile/app", b"layer")
    with FaultServer(upstream=registry_server.url) as proxy:
        huge = (("Content-Length", str(10 << 40)), ("Content-Type", OCI_MANIFEST))
        proxy.inject(
            Fault(200, headers=huge, body=b"{", method="GET", path="/manifests/"), times=20
        )
        m = mount(proxy.url)
        tags = m.path("hostile", "app", "tags")
        assert read_errno(tags / "v1") == errno.EIO
        listed = subprocess.run(["ls", "-l", tags], capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0 or "Input/output error" in listed.stderr
        assert os.listdir(m.mountpoint) == ["hostile"]
        proxy.clear()
        assert str(digest_bytes((tags / "v1").read_bytes())) == manifest_digest
        m.stop()
    over = [line for line in m.log_text().splitlines() if "over the 4194304 bytes" in line]
    assert over and all("(EIO)" in line for line in over)
