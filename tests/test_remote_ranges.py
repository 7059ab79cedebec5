"""Blob range GETs on worker threads (storage/remote/ranges.py) against a stub server on
loopback: kept-alive connections, redirects that drop Authorization for another origin,
and every case that must hand the request back to RemoteClient (None), never wrong bytes."""

from __future__ import annotations

import os
import ssl

import pytest
from support.loopback import LoopbackHandler, LoopbackHTTP

from storage.errors import AccessDenied, RemoteUnavailable
from storage.remote.client import RemoteClient
from storage.remote.ranges import RangeFetcher

pytestmark = pytest.mark.remote

BLOB = os.urandom(3 << 20)


class Stub:
    """A blob server whose answers the test scripts: `mode` picks the misbehaviour."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: list[tuple[str, str | None, str | None]] = []  # path, Range, Authorization
        self.connections: set[int] = set()
        self.http = LoopbackHTTP(StubHandler, self, "ranges-stub")
        self.url = f"http://127.0.0.1:{self.http.port}"


class StubHandler(LoopbackHandler):
    server: object

    def do_GET(self) -> None:
        stub: Stub = self.server.owner  # type: ignore[attr-defined]
        stub.seen.append((self.path, self.headers["Range"], self.headers["Authorization"]))
        stub.connections.add(self.client_address[1])
        if self.path.startswith(("/redirect/", "/redirect-to/")):
            if self.path.startswith("/redirect-to/"):
                port, rest = self.path.removeprefix("/redirect-to/").split("/", 1)
                location = f"http://127.0.0.1:{port}/{rest}"
            else:
                location = self.path.removeprefix("/redirect")
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if stub.mode == "denied":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        first, last = (int(n) for n in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = BLOB[first : last + 1]
        self.send_response(206)
        length = len(body) - 1 if stub.mode == "short-length" else len(body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if stub.mode == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[:length])


@pytest.fixture
def stub():
    s = Stub()
    try:
        yield s
    finally:
        s.http.stop()


def fetcher() -> RangeFetcher:
    return RangeFetcher(ssl.create_default_context(), timeout=5, user_agent="test")


def test_ranges_come_whole_over_one_kept_alive_connection(stub):
    f = fetcher()
    try:
        for start, end in [(0, 1 << 20), (1 << 20, 3 << 20), (5, 6)]:
            assert f.get(f"{stub.url}/v2/a/blobs/x", start, end, "Bearer t") == BLOB[start:end]
    finally:
        f.close()
    assert [s[1] for s in stub.seen] == ["bytes=0-1048575", "bytes=1048576-3145727", "bytes=5-5"]
    assert {s[2] for s in stub.seen} == {"Bearer t"}
    assert len(stub.connections) == 1


def test_a_redirect_to_another_origin_drops_authorization(stub):
    """Registries redirect blob GETs to object storage: the token is the registry's only."""
    other = Stub()
    f = fetcher()
    try:
        assert f.get(f"{stub.url}/redirect/v2/a/blobs/x", 0, 10, "Bearer t") == BLOB[:10]
        assert stub.seen[-1] == ("/v2/a/blobs/x", "bytes=0-9", "Bearer t")  # same origin
        url = f"{stub.url}/redirect-to/{other.http.port}/v2/a/blobs/x"
        assert f.get(url, 5, 15, "Bearer t") == BLOB[5:15]
        assert other.seen == [("/v2/a/blobs/x", "bytes=5-14", None)]
    finally:
        f.close()
        other.http.stop()


@pytest.mark.parametrize("mode", ["denied", "short-length", "cut"])
def test_anything_but_a_whole_206_is_handed_back(stub, mode):
    stub.mode = mode
    f = fetcher()
    try:
        assert f.get(f"{stub.url}/v2/a/blobs/x", 0, 1 << 20, None) is None
    finally:
        f.close()


def test_an_unreachable_registry_is_handed_back():
    f = fetcher()
    assert f.get("http://127.0.0.1:9/v2/a/blobs/x", 0, 10, None) is None


async def test_the_client_falls_back_to_httpx_and_its_errors(stub):
    """RemoteClient.get_range: the thread's answer when whole; else the httpx path, which
    owns auth challenges, retries and the error a user sees."""
    async with RemoteClient(stub.url, timeout=2, retries=0) as client:
        assert await client.get_range("/v2/a/blobs/x", 10, 20) == BLOB[10:20]
        assert len(stub.seen) == 1
        stub.mode = "denied"
        with pytest.raises(AccessDenied):
            await client.get_range("/v2/a/blobs/x", 0, 10)
        assert len(stub.seen) == 3  # the thread's try, then the client's
        stub.mode = "cut"
        with pytest.raises(RemoteUnavailable):
            await client.get_range("/v2/a/blobs/x", 0, 1 << 20)
