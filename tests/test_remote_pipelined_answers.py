"""Review of pipelined listing requests (`RangeFetcher.pipelined`, under `small_many`) against
servers that are not hostile but unusual: each answer a listing keeps must be its own
request's, since nothing checks it afterwards (a tag's manifest has no digest to check it by,
a blob's HEAD gives the size `ls -l` shows).

An informational answer (`103 Early Hints`, sent by CDNs and proxies in front of a registry
before the real answer) is taken by http.client's `begin()` as a final answer of no body
(it skips `100 Continue` only): the pipelined reader passes over it (`ranges._final`, ae8f868),
or would take the real answer that follows for the next request's."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx
import pytest
from support.fault_server import Fault, FaultServer
from support.mounts import Mount, wait_until
from support.oci import image_manifest
from support.registry import RegistryServer
from support.tools import run, sha256sum

from storage.digests import digest_bytes
from storage.errors import RemoteError
from storage.remote.client import RemoteClient
from storage.remote.ranges import PIPELINE_DEPTH, Answer, RangeFetcher
from storage.remote.registry import RemoteRegistry

pytestmark = [pytest.mark.registry, pytest.mark.remote]

EARLY_HINTS = Fault(interim=103, headers=(("Link", "</v2/>; rel=preload"),))


@dataclass(frozen=True)
class Pushed:
    """A repository of tags t00.., each an image of its own config and layer (of its own
    size): the manifests' digests and the layers, tag by tag."""

    name: str
    tags: list[str]
    digests: list[str]
    layers: list[bytes]


@pytest.fixture(scope="module")
def pushed(module_registry_server: RegistryServer) -> Pushed:
    client = module_registry_server.client()
    name, count = "review/pipelined", PIPELINE_DEPTH + 4
    tags, digests, layers = [f"t{i:02d}" for i in range(count)], [], []
    for i, tag in enumerate(tags):
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": i}).encode()
        layer = b"layer %d\n" % i * (i + 1)
        client.push_blob(name, config)
        client.push_blob(name, layer)
        manifest = image_manifest(config, [layer])
        client.put_manifest(name, tag, manifest)
        digests.append(str(digest_bytes(manifest)))
        layers.append(layer)
    return Pushed(name, tags, digests, layers)


async def test_every_tag_resolved_in_a_batch_is_its_own(
    proxied: RemoteRegistry, pushed: Pushed
) -> None:
    """Without interim answers: each tag of a pipelined batch resolves to its own manifest
    (the reference the tests below break)."""
    found = await proxied.repository(pushed.name).manifests.fetch_many(pushed.tags)
    assert {tag: str(d) for tag, d in found.items()} == dict(
        zip(pushed.tags, pushed.digests, strict=True)
    )


async def test_a_103_never_gives_a_tag_another_tags_manifest(
    proxied: RemoteRegistry, proxy: FaultServer, pushed: Pushed
) -> None:
    """A 103 before the answer to t03's GET: t03 is asked again or left unresolved, and no
    tag resolves to another tag's manifest (with the 103 taken for an answer, t04 resolved
    to t03's, t05 to t04's...)."""
    proxy.inject(replace(EARLY_HINTS, path=r"/manifests/t03$"))
    found = await proxied.repository(pushed.name).manifests.fetch_many(pushed.tags)
    by_tag = dict(zip(pushed.tags, pushed.digests, strict=True))
    assert {tag: str(d) for tag, d in found.items() if str(d) != by_tag[tag]} == {}


async def test_a_103_never_gives_a_blob_another_blobs_size(
    proxied: RemoteRegistry, proxy: FaultServer, pushed: Pushed
) -> None:
    """Blob HEADs (`layers.stats`) with a 103 before one answer: every size kept is the
    blob's own (with the 103 taken for an answer, the blobs after it got the size of the one
    before). A mount asks
    HEADs only of blobs no manifest descriptor sizes (a layers/ listing takes the sizes its
    digest-checked manifests give), so this reaches few listings."""
    digests = [digest_bytes(layer) for layer in pushed.layers]
    proxy.inject(replace(EARLY_HINTS, path=rf"/blobs/{digests[3]}$"))
    stats = await proxied.repository(pushed.name).layers.stats(digests)
    sizes = {str(d): s.size for d, s in zip(digests, stats, strict=True) if s is not None}
    assert sizes == {str(d): len(b) for d, b in zip(digests, pushed.layers, strict=True)}


async def test_a_blob_answer_naming_another_blob_gives_no_size(
    proxied: RemoteRegistry, proxy: FaultServer, pushed: Pushed
) -> None:
    """A HEAD of a blob answered for another (Docker-Content-Digest names another blob: a
    proxy out of step, a lying registry): its size is not kept from a batch (`stats`: a
    size of 0 before), and asked alone it is an error that names the other blob."""
    digests = [digest_bytes(layer) for layer in pushed.layers]
    other = Fault(status=200, headers=(("Docker-Content-Digest", str(digests[0])),), body=b"")
    proxy.inject(replace(other, method="HEAD", path=rf"/blobs/{digests[3]}$"))
    layers = proxied.repository(pushed.name).layers
    stats = await layers.stats(digests)
    sizes = {str(d): s.size for d, s in zip(digests, stats, strict=True) if s is not None}
    assert str(digests[3]) not in sizes
    assert sizes == {
        str(d): len(b) for d, b in zip(digests, pushed.layers, strict=True) if d != digests[3]
    }
    proxy.inject(replace(other, method="HEAD", path=rf"/blobs/{digests[3]}$"))
    with pytest.raises(RemoteError, match=str(digests[0])):
        await layers.stat(digests[3])
    assert (await layers.stat(digests[3])).size == len(pushed.layers[3])


def test_a_103_never_shows_a_tag_another_tags_image(
    remote_mount: Callable[..., Mount], proxy: FaultServer, pushed: Pushed
) -> None:
    """Through a mount: after `ls -l` of tags/ with a 103 before t03's answer, `sha256sum` of
    every tags/<tag> is that tag's own manifest's digest (with the 103 taken for an answer,
    tags/t04 showed t03's manifest, and so on)."""
    proxy.inject(replace(EARLY_HINTS, path=r"/manifests/t03$"))
    tags = remote_mount(via=proxy.url).path(*pushed.name.split("/"), "tags")
    run("ls", "-l", tags)  # resolves the tags in a batch (`ls` of tags/ asks nothing)
    shown = {tag: sha256sum(tags / tag) for tag in pushed.tags}
    assert shown == dict(zip(pushed.tags, pushed.digests, strict=True))


def test_early_hints_fault_answers_after_its_interim(proxy: FaultServer) -> None:
    """The support fault itself: the 103 goes first, then the answer httpx (h11) sees."""
    proxy.inject(replace(EARLY_HINTS, path=r"^/v2/$"))
    with httpx.Client() as client:
        assert client.get(f"{proxy.url}/v2/").status_code == 200


def test_a_redirect_in_a_pipeline_takes_the_authorization_to_its_own_origin_only() -> None:
    """Pipelined GETs with the registry's Authorization: an answer that redirects to another
    origin (another port of the same host) is followed without it, one that redirects
    within the registry's origin with it; every answer is still its own request's."""
    with FaultServer() as registry, FaultServer() as other:
        registry.inject(
            Fault(307, headers=(("Location", f"{other.url}/elsewhere/t3"),), path=r"/t3$"),
            Fault(307, headers=(("Location", "/v2/a/moved/t5"),), path=r"/t5$"),
        )
        fetcher = RangeFetcher(ssl.create_default_context(), timeout=5, user_agent="review")
        kept: dict[int, int] = {}

        def keep(index: int, answer: Answer) -> bool:
            kept[index] = answer.status
            return True

        urls = [f"{registry.url}/v2/a/manifests/t{i}" for i in range(8)]
        try:
            assert fetcher.pipelined("GET", urls, {}, "Bearer secret", 1 << 20, keep)
        finally:
            fetcher.close()
        assert kept == dict.fromkeys(range(8), 200)
        assert [(s.path, s.authorization) for s in other.seen] == [("/elsewhere/t3", None)]
        assert {s.authorization for s in registry.seen} == {"Bearer secret"}
        assert "/v2/a/moved/t5" in [s.path for s in registry.seen]


class ScriptedServer(socketserver.ThreadingTCPServer):
    """A loopback server that reads each request on a connection in turn and has
    `answer(server, connection, path)` send what it answers, which may take its time
    (`stopping` is set on exit). `open` counts the connections no one hung up yet. Every
    connection and thread ends on exit (each connection is shut down, each handler joined)."""

    block_on_close = True

    def __init__(self, answer: Callable[[ScriptedServer, socket.socket, bytes], None]) -> None:
        super().__init__(("127.0.0.1", 0), _Scripted)
        self.answer = answer
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.release, self.sent = threading.Event(), threading.Event()
        self.stopping = threading.Event()
        self.open = 0
        self.conns: list[socket.socket] = []
        self.counting = threading.Lock()
        self._loop = threading.Thread(target=self.serve_forever, daemon=True)
        self._loop.start()

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.release.set()
        self.shutdown()
        for conn in self.conns:
            with contextlib.suppress(OSError):  # hung up on before
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self._loop.join(5)


class _Scripted(socketserver.StreamRequestHandler):
    server: ScriptedServer

    def handle(self) -> None:
        with self.server.counting:
            self.server.open += 1
            self.server.conns.append(self.connection)
        try:
            with contextlib.suppress(OSError):  # hung up on
                while line := self.rfile.readline():
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass  # the request's headers
                    self.server.answer(self.server, self.connection, line.split(b" ")[1])
        finally:
            with self.server.counting:
                self.server.open -= 1


def answer(conn: socket.socket, body: bytes, with_body: bool = True) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    conn.sendall(head + body if with_body else head)


FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"


def head_with_body(server: ScriptedServer, conn: socket.socket, path: bytes) -> None:
    """Each path as its answer's body, but `/v2/a/blobs/forging` answered with a body too
    (a HEAD's: an RFC 9110 violation some servers and proxies commit) sent once `release`
    is set, after the headers were read: a whole answer of its own, as a blob's bytes may
    be."""
    if not path.endswith(b"/forging"):
        answer(conn, path)
        return
    answer(conn, FORGED, with_body=False)
    if server.release.wait(5):
        conn.sendall(FORGED)
        server.sent.set()


def dripping(server: ScriptedServer, conn: socket.socket, path: bytes) -> None:
    """The first tag's answer at once, every other a byte each 50 ms (each byte well within
    a read timeout), until the server stops."""
    if path.endswith(b"/t0"):
        answer(conn, path)
        return
    body = path * 20
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    for at in range(len(whole)):
        if server.stopping.wait(0.05):
            return
        conn.sendall(whole[at : at + 1])


def test_bytes_left_on_a_kept_connection_are_never_the_next_answer() -> None:
    """A HEAD answered with a body leaves it unread on the kept-alive connection (a HEAD's
    answer has none). The next `small` on that connection must not take it for its answer
    (a tag's manifest forged by whoever chose a blob's bytes): `_connection` closes a kept
    connection that can be read before anything was asked (without it, "forged" here)."""
    fetcher = RangeFetcher(ssl.create_default_context(), timeout=5, user_agent="review")
    try:
        with ScriptedServer(head_with_body) as server:
            head = fetcher.small("HEAD", f"{server.url}/v2/a/blobs/forging", {}, None, 1 << 20)
            assert head is not None and head.body == b""
            server.release.set()  # the HEAD's body, on the connection kept idle
            assert server.sent.wait(5)
            got = fetcher.small("GET", f"{server.url}/v2/a/manifests/t0", {}, None, 1 << 20)
            assert got is None or got.body == b"/v2/a/manifests/t0"
    finally:
        fetcher.close()


async def test_a_batch_past_its_deadline_leaves_no_thread_reading() -> None:
    """A registry that drips its pipelined answers (a byte well within each read timeout):
    the batch ends at its deadline, and its worker threads must not go on reading (each
    holds one of RANGE_THREADS, which every range GET and `small` then waits for up to its
    own deadline): small_many shuts their sockets down (25f7d7b; before, they read on until
    the answers ended: minutes here)."""
    with ScriptedServer(dripping) as server:
        async with RemoteClient(server.url, timeout=1, retries=0) as client:
            batch = await client.small_many("GET", [f"/v2/a/manifests/t{i}" for i in range(20)])
            assert batch.failed and batch.answers[0] is not None
            wait_until(lambda: server.open == 0, 3, "the batch's connections to be closed")
