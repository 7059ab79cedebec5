"""Blob range GETs on worker threads (storage/remote/ranges.py) against a stub server on
loopback: kept-alive connections, redirects that drop Authorization for another origin,
and every case that must hand the request back to RemoteClient (None), never wrong bytes;
and what a layer reader (storage/remote/reader.py) makes the server send."""

from __future__ import annotations

import os
import ssl
import threading
import time
from contextlib import nullcontext

import pytest
import trio
from support.loopback import LoopbackHandler, LoopbackHTTP

from storage.api import BlobInfo
from storage.digests import digest_bytes
from storage.errors import AccessDenied, CorruptEntry, RemoteUnavailable
from storage.remote.client import RemoteClient
from storage.remote.ranges import RangeFetcher
from storage.remote.reader import RESUMES, STREAM_AFTER, ReadAheadBudget, RemoteLayerReader

pytestmark = pytest.mark.remote

BLOB = os.urandom(16 << 20)
FLIPPED = BLOB[: 8 << 20] + bytes([BLOB[8 << 20] ^ 1]) + BLOB[(8 << 20) + 1 :]
PIECE = 64 << 10  # the stub writes bodies in pieces of this, and counts them
CUT_PAST = 1000  # a cut answer sends this many bytes past half its body, then hangs up


class Stub:
    """A blob server whose answers the test scripts: `mode` picks the misbehaviour."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.cuts = 0  # answers to cut (as mode "cut" does all), then whole ones
        self.seen: list[tuple[str, str | None, str | None]] = []  # path, Range, Authorization
        self.sent = 0  # body bytes handed to the socket, as a registry's access log counts
        self.connections: set[int] = set()
        self.release = threading.Event()  # mode "hold" answers once it is set
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
        if stub.mode == "hold":
            stub.release.wait(10)
        if stub.mode == "denied":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        asked = self.headers["Range"] or "bytes=0-"  # none: the whole blob, a 200
        first, last = asked.removeprefix("bytes=").split("-")
        blob = FLIPPED if stub.mode == "flipped" else BLOB
        body = blob[int(first) : int(last or len(blob) - 1) + 1]  # `bytes=N-`: to the end
        self.send_response(206 if self.headers["Range"] else 200)
        length = len(body) - 1 if stub.mode == "short-length" else len(body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if stub.mode == "cut" or stub.cuts:
            stub.cuts = max(stub.cuts - 1, 0)
            length = min(len(body) // 2 + CUT_PAST, len(body) - 1)
            self.close_connection = True
        for at in range(0, length, PIECE):
            stub.sent += min(PIECE, length - at)  # before the write: a reader can't outrun it
            self.wfile.write(body[at : min(at + PIECE, length)])


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


async def test_an_open_range_abandoned_on_cancel_closes_what_comes_after(stub):
    """`open_range(abandon=True)` (the rootfs pass's GET to the end): a cancel returns at
    once while the registry holds the answer back, and the response that comes after is
    closed on its thread, not left open with 16 MiB unread."""
    stub.mode = "hold"
    async with RemoteClient(stub.url, timeout=5) as client:
        started = time.monotonic()
        with trio.move_on_after(0.2):
            await client.open_range("/v2/a/blobs/x", 0, len(BLOB), abandon=True)
        assert time.monotonic() - started < 2
        assert stub.http.connections == 1
        stub.release.set()
        deadline = time.monotonic() + 5
        while stub.http.connections:
            assert time.monotonic() < deadline, "the late response was left open"
            await trio.sleep(0.02)
        assert stub.sent < len(BLOB)


def layer_reader(client: RemoteClient) -> RemoteLayerReader:
    info = BlobInfo(digest_bytes(BLOB), len(BLOB), 0)
    return RemoteLayerReader(client, "/v2/a/blobs/x", info, ReadAheadBudget())


async def test_two_adjacent_reads_then_a_jump_stream_nothing(stub):
    """The rootfs reader's pattern (64 KiB reads from a gzip seek point, then elsewhere): a
    run this short has not earned an open-ended GET, so the server sends a few windows, not
    the rest of the blob (bench.rootfs measured 12-13 MB per 100 KB file when it did)."""
    async with RemoteClient(stub.url, timeout=2, retries=0) as client:
        reader = layer_reader(client)
        for offset in (0, 64 << 10, 8 << 20):
            assert await reader.read_at(offset, 64 << 10) == BLOB[offset : offset + (64 << 10)]
        for window in reader._windows:
            await window.done.wait()  # the read-ahead too
        await reader.aclose()
    assert not [r for _, r, _ in stub.seen if r is not None and r.endswith("-")]
    # 64 KiB, then a window of 128 KiB and one of 256 KiB ahead, then 64 KiB.
    assert stub.sent == 512 << 10


@pytest.mark.parametrize("mode", ["ok", "flipped"])
async def test_a_whole_read_in_order_streams_once_and_is_checked(stub, mode):
    """`cat`: bounded windows until the run is STREAM_AFTER long, then one open response to
    the end; every byte is sent once, and hashed in order (docs/security.md): a registry
    that sends other bytes than the digest says fails the read that completes them."""
    stub.mode = mode
    got = bytearray()
    async with RemoteClient(stub.url, timeout=2, retries=0) as client:
        reader = layer_reader(client)
        with pytest.raises(CorruptEntry) if mode == "flipped" else nullcontext():
            for offset in range(0, len(BLOB), 128 << 10):
                got += await reader.read_at(offset, 128 << 10)
        assert reader._check.done and reader._check.claimed == len(BLOB)  # hashed whole
        if mode == "flipped":
            with pytest.raises(CorruptEntry):  # and every read after
                await reader.read_at(0, 1)
        await reader.aclose()
    streams = [int(r[6:-1]) for _, r, _ in stub.seen if r is not None and r.endswith("-")]
    assert len(streams) == 1 and STREAM_AFTER <= streams[0] <= 2 * STREAM_AFTER
    assert stub.sent == len(BLOB)
    assert got == BLOB if mode == "ok" else len(got) < len(BLOB)


@pytest.mark.parametrize("cuts", [0, 1, 2])
async def test_a_blob_read_in_order_is_one_plain_get_resumed_where_it_broke(stub, cuts):
    """The rootfs index pass's reads (`read_in_order`, 1 MiB at a time from the start): one
    GET without a Range (issue 16: "indexed from one streamed GET"). A connection that drops
    is opened again with `Range: bytes=N-` at the first byte not yet read, not from the
    start: every byte is sent once, but for what was in flight when it broke."""
    stub.cuts = cuts
    got = bytearray()
    async with RemoteClient(stub.url, timeout=2, retries=0) as client:
        reader = layer_reader(client)
        for offset in range(0, len(BLOB), 1 << 20):
            got += await reader.read_in_order(offset, 1 << 20)
        await reader.aclose()
    assert got == BLOB
    # A cut answer sends half its body and CUT_PAST bytes: the read of the MiB it cuts
    # fails, and the GET opens again at that MiB.
    assert [r for _, r, _ in stub.seen] == [None, "bytes=8388608-", "bytes=12582912-"][: cuts + 1]
    assert stub.sent == len(BLOB) + cuts * CUT_PAST


async def test_a_blob_read_in_order_from_a_registry_that_always_drops_fails(stub):
    """Each try that gets further resumes there; RESUMES tries in a row at one byte that
    all break hand the read to `read_at`, whose error (the client's) is the read's."""
    stub.mode = "cut"
    async with RemoteClient(stub.url, timeout=2, retries=0) as client:
        reader = layer_reader(client)
        with pytest.raises(RemoteUnavailable):
            for offset in range(0, len(BLOB), 1 << 20):
                assert await reader.read_in_order(offset, 1 << 20) == BLOB[offset:][: 1 << 20]
        await reader.aclose()
    ranges = [r for _, r, _ in stub.seen]
    # 16 MiB answers cut at 8, 12, 14 and 15 MiB and a bit: the MiB at 15 never comes.
    resumed = [f"bytes={n << 20}-" for n in (8, 12, 14)] + ["bytes=15728640-"] * RESUMES
    assert ranges[: 1 + len(resumed)] == [None, *resumed]
    assert set(ranges[1 + len(resumed) :]) == {"bytes=15728640-16777215"}  # read_at's
