"""Pipelined small requests (`RangeFetcher.pipelined`, under `RemoteClient.small_many`): a
walk's manifest GETs and blob HEADs go up to PIPELINE_DEPTH at a time on one kept-alive
connection. Against the real registry behind the recording proxy, every answer is its own
request's and each path is asked once; against a raw socket server, one that drops pipelined
requests or answers out of step never gets an answer taken for another request's."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from support.fault_server import Fault, FaultServer
from support.oci import image_manifest
from support.registry import RegistryServer, write_self_signed_cert

from storage.digests import digest_bytes
from storage.remote.client import RemoteClient
from storage.remote.ranges import (
    IN_FLIGHT_WAIT,
    INTERIM_MAX,
    PIPELINE_DEPTH,
    Answer,
    RangeFetcher,
)
from storage.remote.registry import ACCEPT

pytestmark = [pytest.mark.registry, pytest.mark.remote]


def push_tags(server: RegistryServer, name: str, tags: list[str]) -> list[str]:
    """A manifest per tag (the same config and layer, annotated with the tag): their
    digests."""
    client = server.client()
    layer = b"a shared layer\n"
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    client.push_blob(name, layer)
    client.push_blob(name, config)
    digests = []
    for tag in tags:
        manifest = image_manifest(config, [layer], annotations=[{"tag": tag}])
        client.put_manifest(name, tag, manifest)
        digests.append(str(digest_bytes(manifest)))
    return digests


async def test_a_batch_is_pipelined_and_each_answer_is_its_own(
    proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """40 manifest GETs: three connections (PIPELINE_DEPTH paths each at most), each path
    asked once, each answer the manifest of the tag it asked for."""
    tags = [f"t{i:02d}" for i in range(2 * PIPELINE_DEPTH + 8)]
    digests = push_tags(module_registry_server, "pipe/many", tags)
    paths = [f"/v2/pipe/many/manifests/{tag}" for tag in tags]
    async with RemoteClient(proxy.url, timeout=10) as client:
        batch = await client.small_many("GET", paths, headers={"Accept": ACCEPT})
    assert not batch.failed
    assert [str(digest_bytes(a.content)) if a else None for a in batch.answers] == digests
    seen = [s for s in proxy.seen if "/manifests/" in s.path]
    assert sorted(s.path for s in seen) == sorted(paths)
    per_connection = Counter(s.client for s in seen)
    assert sorted(per_connection.values()) == [8, PIPELINE_DEPTH, PIPELINE_DEPTH]


async def test_a_failure_midway_keeps_the_answers_already_asked_for(
    proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A 404 in the middle of a pipeline stops it: nothing more is asked, the answers to the
    requests already sent are read and kept (asked again, each would cost the registry
    twice), and the batch says it failed."""
    tags = [f"t{i:02d}" for i in range(PIPELINE_DEPTH)]
    digests = push_tags(module_registry_server, "pipe/gone", tags)
    paths = [f"/v2/pipe/gone/manifests/{tag}" for tag in tags]
    unknown = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
    proxy.inject(Fault(404, body=unknown, path=r"/pipe/gone/manifests/t05$"))
    async with RemoteClient(proxy.url, timeout=10) as client:
        batch = await client.small_many("GET", paths, headers={"Accept": ACCEPT})
    assert batch.failed
    got = [str(digest_bytes(a.content)) if a else None for a in batch.answers]
    assert got == [
        None if tag == "t05" else digest for tag, digest in zip(tags, digests, strict=True)
    ]
    assert Counter(s.path for s in proxy.seen) == {path: 1 for path in paths}


class RawServer:
    """A loopback server that answers what each read from a connection brings by `script`
    (the requests in that read, and how many came before on the connection): the bytes to
    send back. Stopped (every connection closed, every thread joined) on exit."""

    def __init__(self, script: Callable[[list[bytes], int], bytes]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._conns: list[socket.socket] = []
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        done = 0
        try:
            while data := conn.recv(1 << 16):
                asked = [r for r in data.split(b"\r\n\r\n") if r]
                self.requests.extend(asked)
                conn.sendall(self.script(asked, done))
                done += len(asked)
        except OSError:
            return

    def hang_up(self) -> None:
        """Close every connection from this end (an idle timeout)."""
        for conn in self._conns:
            with contextlib.suppress(OSError):  # hung up on before
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *_: object) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        self.hang_up()
        for conn in self._conns:
            conn.close()
        for thread in self._threads:
            thread.join(5)


def ok(n: int, body: bytes | None = None) -> bytes:
    body = f"answer {n}".encode() if body is None else body
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def run(
    fetcher: RangeFetcher, url: str, n: int, authorization: str | None = None
) -> tuple[bool, dict[int, bytes]]:
    kept: dict[int, bytes] = {}

    def keep(index: int, answer: Answer) -> bool:
        kept[index] = answer.body
        return True

    urls = [f"{url}/v2/a/manifests/t{i}" for i in range(n)]
    return fetcher.pipelined("GET", urls, {}, authorization, 1 << 20, keep), kept


def test_a_server_that_drops_pipelined_requests_is_asked_one_at_a_time() -> None:
    """A server (or a proxy on the way) that answers only the first request of what it
    reads: the answers that never come end the exchange at the timeout, the fetcher sends
    one request at a time from then on, and every answer is still its own request's."""
    fetcher = RangeFetcher(ssl.create_default_context(), timeout=0.5, user_agent="test")
    with RawServer(lambda asked, done: ok(done)) as server:
        done, kept = run(fetcher, server.url, 6)
        assert not done and fetcher.pipeline_depth == 1
        assert kept == {i: f"answer {i}".encode() for i in range(len(kept))}
        assert len(kept) >= 2  # the first alone, then the first of those sent ahead
        done, kept = run(fetcher, server.url, 6)
        assert done and kept == {i: f"answer {i}".encode() for i in range(6)}
    fetcher.close()


def test_the_first_answers_sent_ahead_are_waited_for_briefly() -> None:
    """Until one answer to requests sent ahead came, it is waited for `probe_wait`
    (PIPELINE_PROBE_WAIT), not the registry's timeout: a proxy that drops pipelined requests
    costs the first listing seconds, not 30 s; from then on one at a time."""
    fetcher = RangeFetcher(
        ssl.create_default_context(), timeout=30, user_agent="test", probe_wait=0.3
    )
    with RawServer(lambda asked, done: ok(done)) as server:
        started = time.monotonic()
        done, kept = run(fetcher, server.url, 6)
        waited = time.monotonic() - started
        assert not done and fetcher.pipeline_depth == 1 and waited < 5
        done, kept = run(fetcher, server.url, 6)
        assert done and kept == {i: f"answer {i}".encode() for i in range(6)}
    fetcher.close()


def test_an_answer_out_of_step_ends_the_exchange() -> None:
    """An answer longer than its Content-Length says: what follows cannot be told apart
    from the next answer, so nothing after it is kept and the exchange fails (asked again
    through the client)."""

    def script(asked: list[bytes], done: int) -> bytes:
        return b"".join(
            ok(done + i, b"body") + b"-and-more" if done + i == 1 else ok(done + i)
            for i in range(len(asked))
        )

    fetcher = RangeFetcher(ssl.create_default_context(), timeout=2, user_agent="test")
    with RawServer(script) as server:
        done, kept = run(fetcher, server.url, 8)
    fetcher.close()
    assert not done and kept == {0: b"answer 0", 1: b"body"}


def test_answers_in_flight_held_back_are_not_waited_for_long() -> None:
    """A 404 stops a pipeline whose other answers the server holds back: they are waited
    for IN_FLIGHT_WAIT, not the registry's timeout (a batch's thread must not linger)."""

    def script(asked: list[bytes], done: int) -> bytes:
        if done == 0:
            return ok(0)
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"  # and nothing more

    fetcher = RangeFetcher(ssl.create_default_context(), timeout=30, user_agent="test")
    with RawServer(script) as server:
        started = time.monotonic()
        done, kept = run(fetcher, server.url, 6)
        waited = time.monotonic() - started
    fetcher.close()
    assert not done and kept == {0: b"answer 0"}
    assert IN_FLIGHT_WAIT <= waited < IN_FLIGHT_WAIT + 5
    assert fetcher.pipeline_depth == PIPELINE_DEPTH  # the server did not drop them: it failed


def test_a_header_that_would_add_a_line_is_never_sent() -> None:
    """A token (from a token server) holding a line break would add a header of its own to
    every pipelined request: none is sent, and the caller asks through the client."""
    fetcher = RangeFetcher(ssl.create_default_context(), timeout=2, user_agent="test")
    with RawServer(lambda asked, done: ok(done)) as server:
        done, kept = run(fetcher, server.url, 3, "Bearer x\r\nX-Evil: 1")
        assert not done and not kept and not server.requests
    fetcher.close()


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </v2/>; rel=preload\r\n\r\n"


@pytest.mark.parametrize("hints", [1, INTERIM_MAX + 1])
def test_interim_answers_go_before_an_answer_never_in_its_place(hints: int) -> None:
    """103 Early Hints before the second answer: passed over, every answer its request's
    (taken for an answer, each after it went to the next request); more interim answers
    before one than INTERIM_MAX end the exchange, nothing after them kept."""

    def script(asked: list[bytes], done: int) -> bytes:
        return b"".join(
            EARLY_HINTS * hints * (done + i == 1) + ok(done + i) for i in range(len(asked))
        )

    fetcher = RangeFetcher(ssl.create_default_context(), timeout=2, user_agent="test")
    with RawServer(script) as server:
        done, kept = run(fetcher, server.url, 6)
    fetcher.close()
    if hints <= INTERIM_MAX:
        assert done and kept == {i: f"answer {i}".encode() for i in range(6)}
    else:
        assert not done and kept == {0: b"answer 0"}


def echo_and_close(asked: list[bytes], done: int) -> bytes:
    """The first request's path as the body, and `Connection: close` (an HTTP/1.0 proxy)."""
    path = asked[0].split(b" ")[1]
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(path)
    return head + path


async def test_a_registry_that_hangs_up_after_each_answer_is_asked_each_path_once() -> None:
    """A batch goes on, on a new connection, with what one that was closed left: every path
    answered in the one batch, each asked once."""
    paths = [f"/v2/a/manifests/t{i}" for i in range(2 * PIPELINE_DEPTH + 3)]
    with RawServer(echo_and_close) as server:
        async with RemoteClient(server.url, timeout=5) as client:
            batch = await client.small_many("GET", paths)
        asked = sorted(request.split(b" ")[1].decode() for request in server.requests)
    assert not batch.failed
    assert [a.content.decode() if a else None for a in batch.answers] == paths
    assert asked == sorted(paths)


def test_a_kept_connection_the_server_hung_up_on_is_not_used() -> None:
    """A registry that closed an idle kept-alive connection: the next exchange opens a new
    one (a connection that can be read before anything was asked is done for), instead of
    failing its batch on the old one."""
    fetcher = RangeFetcher(ssl.create_default_context(), timeout=2, user_agent="test")
    with RawServer(lambda asked, done: b"".join(ok(done + i) for i in range(len(asked)))) as server:
        assert run(fetcher, server.url, 3) == (True, {i: f"answer {i}".encode() for i in range(3)})
        server.hang_up()
        assert run(fetcher, server.url, 3) == (True, {i: f"answer {i}".encode() for i in range(3)})
    fetcher.close()


def test_pipelined_over_tls(tmp_path: Path) -> None:
    """The same exchanges over https (the registry's certificate checked): one connection
    for both (what TLS sends after its handshake does not make a kept connection look hung
    up on), each answer its own request's."""
    files = write_self_signed_cert(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(files.cert, files.key)
    fetcher = RangeFetcher(ssl.create_default_context(cafile=files.cert), 5, "test")
    with FaultServer(tls=server_side) as server:
        for _ in range(2):
            for i in range(20):
                server.inject(Fault(200, body=f"answer {i}".encode(), path=rf"/t{i}$"))
            done, kept = run(fetcher, server.url, 20)
            assert done and kept == {i: f"answer {i}".encode() for i in range(20)}
    fetcher.close()
    assert len(server.seen) == 40 and len({seen.client for seen in server.seen}) == 1


async def test_a_redirect_in_a_batch_to_another_scheme_is_never_followed() -> None:
    """A pipelined answer that redirects to anything but http(s) (`gopher://` of a host
    that serves HTTP) is refused on the range threads, as every other path refuses it
    (urls.leaves_https): nothing is asked there, and the client's answer is the refusal."""
    with FaultServer() as registry, FaultServer() as other:
        elsewhere = other.url.replace("http://", "gopher://") + "/m"
        registry.inject(Fault(302, headers=(("Location", elsewhere),), path="/manifests/"), times=8)
        other.inject(Fault(200, body=b"{}"), times=8)
        async with RemoteClient(registry.url, timeout=3, retries=0) as client:
            with contextlib.suppress(Exception):
                await client.small_many("GET", ["/v2/x/manifests/a", "/v2/x/manifests/b"])
    assert other.seen == []
