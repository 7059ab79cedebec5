"""Review (stop 22): hostile storage roots, registries and token servers, attacks not yet
tested elsewhere (docs/security.md has the threat model). Each test's comment says what
must hold and why: the rule the fix of a bug found here follows.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import re
import resource
import signal
import socket
import socketserver
import ssl
import subprocess
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from support.fault_server import Fault, FaultServer, Seen
from support.images import directory, file, layer_tar
from support.layers import MEDIA_TYPES, compress, estargz
from support.mounts import REGFS, Mount, mounted_at, wait_until
from support.oci import image_manifest, sha256_digest
from support.passes import Openings, timed_layer
from support.registry import blob_data_path, write_self_signed_cert
from support.roots import CONFIG, link_blobs, put_tagged
from support.users import OtherUser

from regfs.mountpoint import daemon_pids
from regfs.options import MountOptions
from regfs.sources import _open_remote
from storage.check import check
from storage.digests import Sha256State
from storage.drivers import FilesystemDriver
from storage.drivers.s3 import S3Driver
from storage.errors import AccessDenied, Busy, StorageError
from storage.hashstates import HashStates
from storage.paths import HashStatesDir, path_for
from storage.remote.auth import Authenticator, TokenCache
from storage.remote.client import RemoteClient
from storage.remote.credentials import Credentials
from storage.remote.registry import RemoteRegistry
from storage.remote.uploads import RemoteUpload, UploadRecord, UploadRecords
from storage.rootfs.cache import IndexCache
from storage.rootfs.errors import BadLayer, UnsafeCacheDir
from storage.rootfs.image import TOC_DIGEST
from storage.rootfs.index import Indexer, LayerRef

# --------------------------------------------------------------------------- index cache


async def _trusted_and_hostile(trusted: Path, hostile: Path) -> None:
    """`trusted`: library/app:v1, one gzip layer L holding etc/motd. `hostile` (its owner
    writes what they like): evil/img:v1 whose manifest names L's digest, with a
    `toc.digest` annotation, and whose blob file under that digest is an eStargz blob of
    other members (the owner overwrote it: a storage root's blob is never hashed on a
    random read)."""
    layer = compress(layer_tar([directory("etc"), file("etc/motd", b"trusted\n")]), "gzip")
    await link_blobs(trusted, "library/app", [CONFIG, layer])
    await put_tagged(
        trusted, "library/app", "v1", image_manifest(CONFIG, [layer], MEDIA_TYPES["gzip"])
    )
    planted, toc = estargz(layer_tar([directory("etc"), file("planted", b"from another root\n")]))
    await link_blobs(hostile, "evil/img", [CONFIG, layer])
    blob_data_path(hostile, sha256_digest(layer)).write_bytes(planted)
    # The manifest of the eStargz blob, naming it by L's digest.
    manifest = image_manifest(CONFIG, [planted], MEDIA_TYPES["gzip"], [{TOC_DIGEST: toc}])
    named = manifest.replace(sha256_digest(planted).encode(), sha256_digest(layer).encode())
    await put_tagged(hostile, "evil/img", "v1", named)


# A hostile source (a storage root's owner, or any registry the same user mounts) must not
# poison the index cache shared by every mount of the user: an eStargz TOC, checked only
# against the hostile manifest's own annotation, is kept per manifest annotation (or not
# kept), never served to a later mount for the layer digest alone.
@pytest.mark.mount
def test_a_toc_from_a_hostile_root_never_shows_in_another_roots_image(tmp_path: Path) -> None:
    trusted, hostile, cache = tmp_path / "trusted", tmp_path / "hostile", tmp_path / "xdg"
    trio.run(_trusted_and_hostile, trusted, hostile)
    with mounted_at(str(hostile), tmp_path / "h4-hostile", cache) as m:
        assert "planted" in os.listdir(m.path("evil", "img", "rootfs", "v1"))
    with mounted_at(str(trusted), tmp_path / "h4-trusted", cache) as m:
        shown = m.path("library", "app", "rootfs", "v1")
        assert sorted(os.listdir(shown)) == ["etc"]
        assert (shown / "etc" / "motd").read_bytes() == b"trusted\n"


# --------------------------------------------------------------------------- remote


@pytest.fixture
def https(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server-side TLS context and its self-signed certificate (its own CA)."""
    files = write_self_signed_cert(tmp_path / "h4.pem", tmp_path / "h4.key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert, files.key)
    return context, files.cert


def _client(url: str, **kw: Any) -> RemoteClient:
    return RemoteClient(url, timeout=3, retries=0, **kw)


# The registry is https: a `Link: next` it sends off https (plain http, where whoever is on
# that path could add or hide names) is refused, as a redirect to http is.
@pytest.mark.remote
async def test_a_next_page_never_leaves_https_for_plain_http(
    tmp_path: Path, https: tuple[ssl.SSLContext, Path]
) -> None:
    context, cert = https
    with FaultServer(tls=context) as registry, FaultServer() as plain:
        link = (("Link", f'<{plain.url}/v2/x/tags/list?n=1000&last=a>; rel="next"'),)
        page = json.dumps({"name": "x", "tags": ["a"]}).encode()
        registry.inject(Fault(200, headers=link, body=page, path="/tags/list"), times=4)
        async with _client(registry.url, ca_file=str(cert)) as client:
            with contextlib.suppress(StorageError):
                await RemoteRegistry(client, tmp_path).repository("x").tags.list()
    assert plain.seen == []


# An upload's `Location` from an https registry that is plain http (the layer's bytes in
# clear) is a RemoteError, nothing sent, as a redirect to http is.
@pytest.mark.remote
async def test_an_upload_never_leaves_https_for_plain_http(
    tmp_path: Path, https: tuple[ssl.SSLContext, Path]
) -> None:
    context, cert = https
    with FaultServer(tls=context) as registry, FaultServer() as plain:
        location = (("Location", f"{plain.url}/v2/x/blobs/uploads/u1"),)
        registry.inject(Fault(202, method="POST", headers=location))
        plain.inject(Fault(202, method="PATCH", headers=location), times=2)
        async with _client(registry.url, ca_file=str(cert)) as client:
            with contextlib.suppress(StorageError):
                upload = await RemoteUpload.start(client, UploadRecords(tmp_path / "r"), "x", None)
                await upload.write_at(0, b"secret layer bytes")
                await upload.flush()
    assert [s.method for s in plain.seen] == []


@dataclass
class Granted:
    """What the registry and the token server saw of `_token_then_tags`, and how it ended."""

    registry: list[Seen]
    tokens: list[Seen]
    error: Exception | None


async def _token_then_tags(token: str, expires_in: float = 300, asks: int = 1) -> Granted:
    """A registry that asks for a bearer token and a token server that grants `token` for
    `expires_in` seconds; then `asks` tags listings."""
    with FaultServer() as registry, FaultServer() as tokens:
        realm = (("WWW-Authenticate", f'Bearer realm="{tokens.url}/token",service="s"'),)
        registry.inject(Fault(401, headers=realm, path="/tags/"))
        body = json.dumps({"token": token, "expires_in": expires_in}).encode()
        tokens.inject(Fault(200, body=body, path="/token"), times=4)
        error = None
        async with _client(registry.url) as client:
            try:
                for _ in range(asks):
                    await client.request("GET", "/v2/x/tags/list")
            except Exception as exc:
                error = exc
        return Granted(list(registry.seen), list(tokens.seen), error)


# A token server's token that is not ASCII ("tök", which httpx cannot put in a header) is
# a RemoteError naming the token server, not an unexpected error with a traceback.
@pytest.mark.remote
async def test_a_token_that_is_no_header_value_is_a_remote_error() -> None:
    granted = await _token_then_tags("t\u00f6k")
    assert isinstance(granted.error, StorageError), repr(granted.error)


@pytest.mark.remote
async def test_a_token_cannot_add_a_header_of_its_own() -> None:
    """A token holding CR LF would end the Authorization line and add a header of its own:
    it is never sent (the request fails, as a registry's error)."""
    granted = await _token_then_tags("t\r\nX-Injected: 1")
    assert isinstance(granted.error, StorageError), repr(granted.error)
    assert "Bearer t" not in [s.authorization for s in granted.registry]


# `expires_in: NaN` (Python's json reads it) is no lifetime: one that is no finite positive
# number is the default (60 s), as 0 or a string is, so the token is valid and not fetched
# again at every request.
@pytest.mark.remote
async def test_a_token_lifetime_that_is_no_number_is_the_default() -> None:
    granted = await _token_then_tags("t", expires_in=float("nan"), asks=3)
    assert granted.error is None, repr(granted.error)
    assert len(granted.tokens) == 1


# --------------------------------------------------------------------------- storage root


# Names in a storage root are its owner's: a symlink or a file named with a newline is
# logged escaped (`a symbolic link ... not listed`, `no storage path name`), as server
# text is, so the owner writes no lines of their own into the daemon's log.
@pytest.mark.storage
async def test_names_in_a_root_cannot_forge_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "\n2026-11-30 12:00:00,000 ERROR regfs: forged"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f"file{forged}").write_bytes(b"")
    (tmp_path / "d" / f"link{forged}").symlink_to("/etc/passwd")
    driver = FilesystemDriver(tmp_path)
    await driver.list("/d")
    await driver.entries("/d")
    assert "forged" in caplog.text
    assert not [r for r in caplog.records if "\n" in r.getMessage()]


# A directory removed (an upload's, `rm -r` through the mount, purge-uploads) is opened with
# O_NOFOLLOW (and O_NONBLOCK) level by level: a root's owner who swaps it for a symlink
# while it is removed (made here at the very moment, as a racing loop would) makes the
# daemon (root) open nothing outside the root (a FIFO there would hold the call, and a
# worker thread, for good).
@pytest.mark.storage
async def test_a_directory_swapped_for_a_link_while_removed_opens_nothing_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, fifo = tmp_path / "root", tmp_path / "outside-fifo"
    (root / "up" / "u1").mkdir(parents=True)
    (root / "up" / "u1" / "data").write_bytes(b"x")
    os.mkfifo(fifo)
    real_open = os.open
    swapped = threading.Event()

    def racing_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if path == "u1" and not swapped.is_set():  # the removal's open of the directory
            swapped.set()
            os.rename(root / "up" / "u1", root / "up" / "moved")
            os.symlink(fifo, root / "up" / "u1")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    released, done = threading.Event(), threading.Event()

    def release() -> None:
        """From 1.5 s on, open the FIFO's other end: a reader blocked opening it goes on."""
        done.wait(1.5)
        while not done.is_set():
            try:
                os.close(real_open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader (yet)
                done.wait(0.05)
                continue
            released.set()
            return

    watchdog = threading.Thread(target=release, name="h4-watchdog")
    monkeypatch.setattr(os, "open", racing_open)
    driver = FilesystemDriver(root)
    watchdog.start()
    try:
        with contextlib.suppress(OSError, StorageError):
            await driver.delete("/up/u1")
    finally:
        done.set()
        watchdog.join()
    assert swapped.is_set()
    assert not released.is_set(), "the daemon blocked opening a FIFO outside the root"


# --------------------------------------------------------------------------- index cache dir


# `$XDG_CACHE_HOME/regfs` planted as a symlink by whoever can write XDG_CACHE_HOME (a shared,
# sticky directory: the case test_rootfs_mount's unsafe-cache test plays): nothing is made
# through the link (root would make `index` wherever it points), and a link, dangling or
# not, is refused (UnsafeCacheDir), never a FileExistsError no caller expects.
@pytest.mark.storage
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-directory", "dangling"])
def test_a_planted_cache_link_makes_nothing_where_it_points(tmp_path: Path, dangling: bool) -> None:
    shared, elsewhere = tmp_path / "xdg", tmp_path / "elsewhere"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    if not dangling:
        elsewhere.mkdir()
    (shared / "regfs").symlink_to(elsewhere)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(shared))
        try:
            IndexCache().close()
        except UnsafeCacheDir:
            pass
        finally:
            made = (elsewhere / "index").exists()
    assert not made


# --------------------------------------------------------------------------- S3


# An S3 endpoint (MinIO or any other that someone else runs) whose truncated listing names
# the same continuation token again is refused (EIO), as the remote registry's listing
# stops at a loop (_Listing), and so are pages past a cap: asked for ever, it would hold a
# worker thread and the `ls`, and fresh tokens would grow the listing without bound.
@pytest.mark.storage
async def test_an_s3_listing_whose_next_page_loops_back_stops(moto_server, s3_bucket) -> None:
    loops = 30  # then the requests reach moto, which ends the listing its way
    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, "/r", client=moto_server.client(proxy.url))
        await driver.put_content("/a/b", b"hello")
        entry = (
            b"<Key>r/a/b</Key><Size>5</Size><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
        )
        page = (
            b"<ListBucketResult><Contents>%s</Contents><IsTruncated>true</IsTruncated>"
            b"<NextContinuationToken>again</NextContinuationToken></ListBucketResult>" % entry
        )
        proxy.inject(Fault(200, body=page, method="GET", path=f"^/{s3_bucket}$"), times=loops)
        driver.forget()
        with contextlib.suppress(StorageError):
            await driver.list("/a")
        pages = [s for s in proxy.seen if "list-type=2" in s.path]
    assert len(pages) <= 2, f"{len(pages)} requests for the same page"


# A listing whose every next page has a fresh token is no loop, and was followed for ever,
# growing what the caller collects. Now it stops at a cap: a directory's (with a delimiter)
# at the remote registry's cap on names (LISTING_NAMES_MAX), ListMultipartUploads (no
# delimiter) at LISTING_KEYS_MAX; both made small here.
@pytest.mark.storage
@pytest.mark.parametrize("listing", ["objects", "uploads"])
async def test_an_s3_listing_of_fresh_pages_for_ever_stops_at_a_cap(
    moto_server, s3_bucket, monkeypatch, listing: str
) -> None:
    monkeypatch.setattr("storage.drivers.s3.LISTING_NAMES_MAX", 10)
    monkeypatch.setattr("storage.drivers.s3.LISTING_KEYS_MAX", 10)
    entry = b"<Key>r/a/b</Key><Size>5</Size><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
    upload = "/docker/registry/v2/repositories/x/_uploads/0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, "/r", client=moto_server.client(proxy.url))
        await driver.put_content("/a/b", b"hello")
        for i in range(30):  # then the requests reach moto, which ends the listing its way
            if listing == "objects":
                page = (
                    b"<ListBucketResult><Contents>%s</Contents><IsTruncated>true</IsTruncated>"
                    b"<NextContinuationToken>t%d</NextContinuationToken></ListBucketResult>"
                    % (entry, i)
                )
            else:
                page = (
                    b'<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult>'
                    b"<Bucket>%s</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>"
                    b"<NextKeyMarker>k%d</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker>"
                    b"<MaxUploads>1000</MaxUploads><IsTruncated>true</IsTruncated><Upload>"
                    b"<Key>r/other</Key><UploadId>u</UploadId>"
                    b"<Initiated>2026-01-01T00:00:00.000Z</Initiated>"
                    b"</Upload></ListMultipartUploadsResult>" % (s3_bucket.encode(), i)
                )
            proxy.inject(Fault(200, body=page, method="GET", path=f"^/{s3_bucket}$"))
        driver.forget()
        with pytest.raises(StorageError, match="goes on past"):
            if listing == "objects":
                await driver.list("/a")
            else:
                await driver.stat(f"{upload}/data")
        pages = [
            s
            for s in proxy.seen
            if ("list-type=2" if listing == "objects" else "uploads") in s.path
        ]
    assert len(pages) <= 11, f"{len(pages)} pages read"


# --------------------------------------------------------------------------- upload records


# Upload records hold signed upload locations and hash states (docs/security.md: "private"):
# `$XDG_STATE_HOME/regfs` planted as a symlink (a shared XDG_STATE_HOME, as the cache test
# above) is refused as IndexCache refuses its directory (ours, reached without a link,
# writable by nobody else), and no record is written or read back where it points.
@pytest.mark.storage
async def test_upload_records_are_not_kept_through_a_planted_link(tmp_path: Path) -> None:
    shared, elsewhere = tmp_path / "xdg-state", tmp_path / "elsewhere"
    shared.mkdir()
    shared.chmod(0o1777)
    elsewhere.mkdir()
    (shared / "regfs").symlink_to(elsewhere)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(shared))
        registry = _open_remote(MountOptions("http://127.0.0.1:9", "/nowhere"))
        with contextlib.suppress(StorageError, OSError):
            registry.records.save(
                UploadRecord("org/app", "u1", "http://127.0.0.1:9/x?_state=s", None)
            )
        await registry.client.aclose()
    assert not list(elsewhere.rglob("*.json"))


# --------------------------------------------------------------------------- logs


@pytest.mark.remote
@pytest.mark.mount
def test_a_debug_log_holds_no_password_and_no_token(tmp_path: Path) -> None:
    """`--debug` logs every request: neither the password (nor its Basic header), nor the
    bearer token a token server grants, nor a signed redirect's query may be in it."""
    password, token, signature = "pw-h4-s3cret", "tok-h4-s3cret", "sig-h4-s3cret"
    basic = base64.b64encode(f"alice:{password}".encode()).decode()
    with FaultServer() as registry, FaultServer() as tokens, FaultServer() as storage:
        realm = (("WWW-Authenticate", f'Bearer realm="{tokens.url}/token",service="s"'),)
        registry.inject(Fault(401, headers=realm, path="^/v2/$"))
        tokens.inject(Fault(200, body=json.dumps({"token": token}).encode()), times=20)
        catalog = json.dumps({"repositories": ["org/app"]}).encode()
        registry.inject(Fault(200, body=catalog, path="_catalog"), times=20)
        tags = json.dumps({"name": "org/app", "tags": ["v1"]}).encode()
        registry.inject(Fault(200, body=tags, path="/tags/list"), times=20)
        signed = (("Location", f"{storage.url}/m?X-Amz-Signature={signature}"),)
        registry.inject(Fault(307, headers=signed, path="/manifests/"), times=20)
        m = Mount(registry.url, tmp_path / "h4-mnt", tmp_path / "regfs.log")
        try:
            login = ["--username", "alice", "--password-stdin", "--log", str(m.log)]
            result = subprocess.run(
                [REGFS, "mount", "--debug", *login, registry.url, str(m.mountpoint)],
                input=password + "\n",
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr + m.log_text()
            assert os.listdir(m.path("org", "app")) != []
            with contextlib.suppress(OSError):
                os.listdir(m.path("org", "app", "tags"))
                os.stat(m.path("org", "app", "tags", "v1"))
        finally:
            m.stop()
    assert any(s.authorization == f"Bearer {token}" for s in registry.seen)
    assert storage.seen, "the signed redirect was not followed"
    text = m.log_text()
    for secret in (password, basic, token, signature):
        assert secret not in text, secret


# --------------------------------------------------------------------------- local users


# `regfs umount` waits only for the mount's daemon: a process of the mount's own user (or
# one that holds the mount's /dev/fuse). Another user's look-alike (`exec -a regfs sh -c
# 'sleep 600; :' --foreground MNT`, a command line with `regfs` first, `--foreground` and
# the mountpoint last) does not make root's umount wait its 30 s and exit 1.
@pytest.mark.mount
def test_another_users_look_alike_is_never_taken_for_the_daemon(
    tmp_path: Path, other_user: OtherUser
) -> None:
    with Mount("inmemory:", tmp_path / "h4-mnt", tmp_path / "regfs.log") as m:
        script = f'exec -a regfs sh -c "sleep 600; :" --foreground {m.mountpoint}'
        impostor = subprocess.Popen(
            other_user.command("bash", "-c", script), start_new_session=True
        )
        try:
            with contextlib.suppress(AssertionError):  # not taken for a daemon in 2 s
                wait_until(lambda: len(daemon_pids(str(m.mountpoint))) > 1, 2, "a look-alike")
            found = daemon_pids(str(m.mountpoint))
        finally:
            os.killpg(impostor.pid, signal.SIGKILL)  # its sleep too
            impostor.wait()
    assert impostor.pid not in found


# --------------------------------------------------------------------------- endless headers


class _EndlessHeaders(socketserver.BaseRequestHandler):
    """Answers every request with a status line and header lines that never end (one long
    line, or line after line), counting the bytes it got out before the client hung up."""

    server: _HeaderFlood

    def handle(self) -> None:
        self.request.recv(65536)
        line = b"X-" + b"a" * 4094 + b"\r\n" if self.server.many else b"a" * 4096
        try:
            self.request.sendall(b"HTTP/1.1 200 OK\r\nX-Long: ")
            while not self.server.stopping.is_set() and self.server.sent < 1 << 30:
                self.request.sendall(line)
                self.server.sent += len(line)
        except OSError:
            pass  # hung up on


class _HeaderFlood(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, many: bool) -> None:
        super().__init__(("127.0.0.1", 0), _EndlessHeaders)
        self.many = many
        self.sent = 0
        self.stopping = threading.Event()


@pytest.mark.remote
@pytest.mark.parametrize("many", [False, True], ids=["one-endless-line", "endless-lines"])
async def test_endless_headers_are_not_read(many: bool) -> None:
    """A registry whose answer's headers never end (one endless line, or line after line):
    both request paths (http.client on a thread, httpx) give up within a bounded read, and
    the request fails as a registry's error."""
    server = _HeaderFlood(many)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="h4-flood")
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        async with _client(url) as client:
            with pytest.raises(StorageError):
                await client.small("GET", "/v2/x/manifests/a")
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert 0 < server.sent < 32 << 20, server.sent  # loopback buffers hold a few MB


# A tree is removed (removal.remove_tree) whatever its depth, within a bounded number of
# descriptors: one deeper than the daemon's descriptor limit (RLIMIT_NOFILE, soft 1024
# under a stock systemd unit) would otherwise fail EMFILE every time, failing every other
# open of the daemon meanwhile, and leave an upload that no rm -r nor purge-uploads
# removes.
@pytest.mark.storage
async def test_a_tree_deeper_than_the_descriptor_limit_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "up").mkdir(parents=True)
    fd = os.open(root / "up", os.O_RDONLY)
    for _ in range(300):  # deeper than PATH_MAX allows by name: made through descriptors
        os.mkdir("d", dir_fd=fd)
        fd, above = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(above)
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))  # new ones take the lowest free numbers
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 128, hard))  # 300 levels: past it
    failed = None
    try:
        await FilesystemDriver(root).delete("/up")
    except OSError as exc:
        failed = exc
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert failed is None and not (root / "up").exists(), failed


# --------------------------------------------------------------------------- token locks


# A bearer token is fetched under a lock per scope (Authenticator._locks), which goes when
# no fetch holds or waits for it, so memory stays within the token cache's bound: a
# registry that lists other names at each listing (1,000,000 a listing, its cap) does not
# grow the daemon by ~0.4 KB per repository a walk ever touched.
@pytest.mark.remote
async def test_token_fetches_of_many_repositories_keep_memory_bounded() -> None:
    granted = httpx.Response(200, json={"token": "t" * 40, "expires_in": 300})

    async def grant(
        method: str, url: httpx.URL, headers: dict[str, str], content: bytes | None, expect: Any
    ) -> httpx.Response:
        return granted

    auth = Authenticator(httpx.URL("https://registry.test/"), None, False, grant)
    auth.tokens = TokenCache(max_bytes=1 << 10)  # a token or two: what grows is the rest
    challenge = httpx.Response(
        401, headers={"WWW-Authenticate": 'Bearer realm="https://registry.test/token"'}
    )
    await auth.on_challenge(challenge, "GET", httpx.URL("https://registry.test/v2/"), None, None)
    repositories = 1_500
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(repositories):
            target = httpx.URL(f"https://registry.test/v2/org/repo-{i:06d}/tags/list")
            await auth.authorization("GET", target)
        gc.collect()  # what the loop left in cycles
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Dropping each lock once its fetch is done leaves ~30 KB here (1,500 kept: ~700 KB).
    assert grown < 128 << 10, f"{grown / repositories:.0f} bytes kept per repository"


# ListMultipartUploads (`_uploads`, through boto3: a stat or a listing of an upload) whose
# marker comes back is refused, as a looping ListObjectsV2 is (b27ae8d), never followed
# for ever.
@pytest.mark.storage
async def test_an_s3_uploads_listing_whose_next_page_loops_back_stops(
    moto_server, s3_bucket
) -> None:
    loops = 30  # then the requests reach moto, which ends the listing its way
    page = (
        b'<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult>'
        b"<Bucket>%s</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>"
        b"<NextKeyMarker>k</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker>"
        b"<MaxUploads>1000</MaxUploads><IsTruncated>true</IsTruncated><Upload>"
        b"<Key>r/other</Key><UploadId>u</UploadId><Initiated>2026-01-01T00:00:00.000Z</Initiated>"
        b"</Upload></ListMultipartUploadsResult>" % s3_bucket.encode()
    )
    upload = "/docker/registry/v2/repositories/x/_uploads/0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, "/r", client=moto_server.client(proxy.url))
        proxy.inject(Fault(200, body=page, method="GET", path=f"^/{s3_bucket}$"), times=loops)
        with contextlib.suppress(StorageError):
            await driver.stat(f"{upload}/data")
        pages = [s for s in proxy.seen if "uploads" in s.path]
    assert len(pages) <= 2, f"{len(pages)} requests for the same page"


# A hash state's offset is its file name when that is an ASCII decimal number: a name such
# as "²" or "١٢" (`str.isdigit()` holds, int() refuses it) is passed over (logged), so a
# state the root's owner names so makes no resume of that upload an unexpected error.
@pytest.mark.storage
async def test_a_hash_state_whose_name_is_no_ascii_number_is_passed_over(tmp_path: Path) -> None:
    uuid = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
    driver = FilesystemDriver(tmp_path)
    states = HashStates(driver, "org/app", uuid)
    await states.save(0, Sha256State().marshal())
    directory = tmp_path / path_for(HashStatesDir("org/app", uuid)).lstrip("/")
    (directory / "\u00b2").write_bytes(b"")
    assert await states.offsets() == [0]


# --------------------------------------------------------------------------- non-ASCII headers


# A header byte past ASCII in any answer read through httpx (a UTF-8 `X-Note: café` from a
# CDN, a latin-1 one) does not break the request: the answer is read, its headers kept as
# bytes (`_with_body` rebuilt it from headers httpx encodes back as ASCII:
# UnicodeEncodeError). A number that is no ASCII number (`Retry-After: ²` on a 503, an
# upload's `Range: 0-²`, where "²".isdigit() holds and int() refuses it) is the registry's
# garbage (RemoteError, or Retry-After ignored), as registry._size checks (isascii).
@pytest.mark.remote
@pytest.mark.parametrize(
    ("status", "header", "value"),
    [(204, "X-Note", "caf\u00e9"), (503, "Retry-After", "\u00b2"), (204, "Range", "0-\u00b2")],
    ids=["any-header", "retry-after", "range"],
)
async def test_a_header_byte_past_ascii_is_no_unexpected_error(
    tmp_path: Path, status: int, header: str, value: str
) -> None:
    uuid = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
    with FaultServer() as registry:
        location = f"{registry.url}/v2/x/blobs/uploads/{uuid}"
        records = UploadRecords(tmp_path / "state" / "uploads", tmp_path / "state")
        records.save(UploadRecord("x", uuid, location, "2026-11-30T00:00:00Z", offset=3))
        registry.inject(Fault(status, headers=((header, value),)))  # sent as latin-1
        async with RemoteClient(registry.url, timeout=3, retries=1) as client:
            with contextlib.suppress(StorageError):  # the registry's error: fine
                await RemoteUpload.resume(client, records, uuid)


# The same on the range threads' path, apart from _with_body: a listing's second page asked
# through `small` (http.client reads the header as latin-1) whose `Link` is past ASCII is
# followed (percent-encoded) or refused as RemoteError, never a UnicodeEncodeError from
# the httpx.Response built to parse it (_next_page).
@pytest.mark.remote
async def test_a_next_page_link_past_ascii_is_no_unexpected_error(tmp_path: Path) -> None:
    page = json.dumps({"name": "x", "tags": ["a"]}).encode()
    link = '</v2/x/tags/list?n=1000&last=a&note=caf\u00e9>; rel="next"'
    with FaultServer() as registry:
        registry.inject(Fault(200, body=page, path="/tags/list"))  # the page size learnt
        registry.inject(Fault(200, body=page, headers=(("Link", link),), path="/tags/list"))
        async with _client(registry.url) as client:
            for listing in ("first", "second"):  # the second through `small`
                registry_view = RemoteRegistry(client, tmp_path / listing, listing_ttl=0)
                with contextlib.suppress(StorageError):
                    await registry_view.repository("x").tags.list()


# --------------------------------------------------------------------------- decompression bombs


def _zstd_zeros_tar(size: int) -> bytes:
    """A tar of one file of `size` zeros as one zstd frame of RLE blocks, written by hand:
    4 bytes of blob per 128 KiB of tar (a 256 KiB blob holds 8 GiB)."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    header = info.tobuf(tarfile.USTAR_FORMAT)

    def block(kind: int, length: int, last: bool = False) -> bytes:  # RFC 8878 3.1.1.2
        return ((length << 3) | (kind << 1) | last).to_bytes(3, "little")

    zeros = size + (-size % 512) + 1024  # the data, its padding, the end of the archive
    full, rest = divmod(zeros, 1 << 17)
    frame = b"\x28\xb5\x2f\xfd\x00\x38" + block(0, len(header)) + header  # magic, 128 KiB window
    return frame + (block(1, 1 << 17) + b"\0") * full + block(1, rest, last=True) + b"\0"


# The indexer makes one pass at a time, so a layer's pass is bounded in what it
# decompresses per byte of blob (LayerTooLarge): a 256 KiB zstd layer of 8 GiB of zeros
# (RLE blocks) would hold every other image's first listing back for its whole pass (3.2 s
# CPU, 7.5 s wall at load 4.9; 1 TB from a 32 MB layer: ~7 min, which a cancel or an
# unmount does not stop), and any image's author could so stall rootfs/ of a mount for
# everyone reading it.
@pytest.mark.storage
async def test_a_decompression_bomb_holds_no_other_layer_back(tmp_path: Path) -> None:
    cache = IndexCache(tmp_path / "index")
    indexer = Indexer(cache, subprocess=False)
    bomb = timed_layer(_zstd_zeros_tar((1 << 33) - 4096), "zstd", Openings())
    small = timed_layer(compress(layer_tar([file("f", b"x\n")]), "zstd"), "zstd", Openings())
    took: dict[str, float] = {}
    refused: set[str] = set()

    async def index(name: str, layer: LayerRef, start: float) -> None:
        try:
            await indexer.index(layer)
        except BadLayer:  # LayerTooLarge: the bound
            refused.add(name)
        took[name] = trio.current_time() - start

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(index, "bomb", bomb, trio.current_time())
            await trio.sleep(0.1)  # its pass under way
            nursery.start_soon(index, "small", small, trio.current_time())
    finally:
        cache.close()
    # The bomb is cut at its bound (Limits.expansion: ~1 GiB of zeros, 0.3-0.4 s quiet), and
    # the small layer's pass waits at most that long: 1.2 s under a CI run's load, against
    # the whole 8 GiB (7.5 s at load 4.9) before the bound.
    assert refused == {"bomb"}, took
    assert took["small"] < 3.0, took


# `regfs check` prints one line per finding, the path of a symlink escaped as the log's
# lines are (30348de): a link named with a newline or a terminal escape writes no lines of
# its owner's into the report an administrator reads (a forged "no findings", a cleared
# screen).
@pytest.mark.storage
async def test_names_in_a_root_cannot_forge_check_report_lines(tmp_path: Path) -> None:
    tree = tmp_path / "docker" / "registry" / "v2"
    tree.mkdir(parents=True)
    (tree / "x\n0 findings, 0 damage\x1b[2J").symlink_to("/etc/passwd")
    findings = await check(FilesystemDriver(tmp_path))
    assert [f.kind for f in findings] == ["symlink"]
    assert all(str(f).isprintable() for f in findings), [str(f) for f in findings]


# An S3 writer lock's holder is read from the lock object: `owner` is `host:pid`, and a
# holder of this host whose pid is gone is taken over (_dead_here). A pid that is no plain
# number in range ("²": int() refuses it; 99999999999999999999: os.kill overflows) is a
# live holder of another host (Busy after LOCK_WAIT), so whoever can write the bucket makes
# no writer of that file an unexpected error.
@pytest.mark.storage
@pytest.mark.parametrize("pid", ["\u00b2", "99999999999999999999"], ids=["superscript", "huge"])
async def test_an_s3_lock_owner_that_is_no_pid_is_a_live_holder(
    moto_server, s3_bucket, pid: str
) -> None:
    driver = S3Driver(s3_bucket, "/r", client=moto_server.client())
    path = "/docker/registry/v2/repositories/x/_uploads/0f1e2d3c-aaaa-bbbb-cccc-123456789abc/data"
    owner = {"owner": f"{socket.gethostname()}:{pid}", "token": "t", "ttl": 60}
    moto_server.client().put_object(
        Bucket=s3_bucket, Key=driver.key(path) + ".regfs-lock", Body=json.dumps(owner).encode()
    )
    with pytest.raises(Busy):
        await driver.writer(path)


# --------------------------------------------------------------------------- deep JSON


# JSON nested deeper than Python's parser goes ("[" 5,000 times: a RecursionError) is the
# registry's garbage wherever a registry, token server or bucket sends JSON, a RemoteError
# (or an error without detail), as a body that is no JSON is: an error answer's body
# (error_detail, error_codes: every 4xx, a redirect target's too), a listing page
# (_Listing.add), a token grant (Token.from_response), an S3 lock object's body
# (_Lock._holder reads 4,096 bytes), an eStargz TOC (estargz.read_toc), registry._errors;
# manifest_format catches it for manifests.
@pytest.mark.remote
@pytest.mark.parametrize("answer", ["error", "listing", "token"])
async def test_json_nested_too_deep_is_a_registry_error(tmp_path: Path, answer: str) -> None:
    deep = b"[" * 5000
    # Faults twice: a listing's page goes by `small` first, which asks again by `request`.
    with FaultServer() as registry:
        if answer == "error":
            registry.inject(Fault(400, body=deep), times=2)
        elif answer == "listing":
            registry.inject(Fault(200, body=deep, path="/tags/list"))
        else:
            realm = (("WWW-Authenticate", f'Bearer realm="{registry.url}/token"'),)
            registry.inject(Fault(401, headers=realm, path="/tags/list"), times=2)
            registry.inject(Fault(200, body=b'{"token": ' + deep, path="/token"))
        async with _client(registry.url) as client:
            with pytest.raises(StorageError):
                await RemoteRegistry(client, tmp_path).repository("x").tags.list()


# --------------------------------------------------------------------------- slow answers


class _Drip(socketserver.BaseRequestHandler):
    """A 200 whose body of 1 MB (or a 206 of the range asked) comes a byte every 0.2 s: each
    read is within any timeout."""

    server: _DripServer

    def handle(self) -> None:
        asked = re.search(rb"Range: bytes=(\d+)-(\d+)", self.request.recv(65536))
        status, length = (b"206", int(asked[2]) - int(asked[1]) + 1) if asked else (b"200", 10**6)
        try:
            self.request.sendall(b"HTTP/1.1 %s x\r\nContent-Length: %d\r\n\r\n" % (status, length))
            while not self.server.stopping.wait(0.2):
                self.request.sendall(b"a")
        except OSError:
            with self.server.lock:
                self.server.hung_up += 1


class _DripServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Drip)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.hung_up = 0


@contextlib.contextmanager
def _dripping() -> Iterator[_DripServer]:
    """A started _DripServer; stopped (its answers ended) at the end."""
    server = _DripServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="h4-drip")
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


async def _hang_ups(server: _DripServer, wanted: int, within: float = 3) -> int:
    """The connections the client has hung up on, once `wanted` or after `within` s."""
    with trio.move_on_after(within):
        while server.hung_up < wanted:
            await trio.sleep(0.05)
    return server.hung_up


# A manifest GET (`small`, on a range thread) given up at its deadline shuts its thread's
# connection down, as a batch given up does (InUse, docs/security.md), and so do
# `get_range` and `open_range`: a registry that drips, a byte within each read's timeout,
# would otherwise hold one of the 8 range threads for as long as it likes, and 8 such
# answers make every blob read wait a whole deadline (150 s by default) for a thread.
@pytest.mark.remote
async def test_a_request_given_up_at_its_deadline_leaves_no_thread_reading() -> None:
    with _dripping() as server:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        async with RemoteClient(url, timeout=1, retries=0, deadline=1) as client:
            with pytest.raises(StorageError):
                await client.small("GET", "/v2/x/manifests/a")  # the thread's, then httpx's
            hung_up = await _hang_ups(server, 2)
    assert hung_up == 2, "the range thread still reads from the registry"


# A range thread left behind is shut down whatever ended the wait: its own deadline
# (83a702f) or a cancel from outside (a read-ahead let go, a caller's own deadline, an
# unmount: abandon_on_cancel), so it reads on from no registry that drips, holding one of
# the 8 range threads.
@pytest.mark.remote
@pytest.mark.parametrize("call", ["small", "get_range"])
async def test_a_request_cancelled_from_outside_leaves_no_thread_reading(call: str) -> None:
    with _dripping() as server:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        async with RemoteClient(url, timeout=5, retries=0, deadline=30) as client:
            with trio.move_on_after(1):  # the caller's own limit, well before the client's
                if call == "small":
                    await client.small("GET", "/v2/x/manifests/a")
                else:
                    await client.get_range("/v2/x/blobs/sha256:" + "0" * 64, 0, 1000)
            hung_up = await _hang_ups(server, 1)
    assert hung_up == 1, "the range thread still reads from the registry"


# An open response (a sequential reader's one GET to the blob's end, the index pass's GET)
# was read on a range thread that a cancel waited for: a registry that drips held the
# reader's cancel (an interrupted read, an unmount) and one of the 8 range threads for as
# long as it liked. Now a cancel closes the body, which wakes its thread (docs/security.md).
@pytest.mark.remote
async def test_an_open_body_cancelled_from_outside_leaves_no_thread_reading() -> None:
    with _dripping() as server:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        async with RemoteClient(url, timeout=5, retries=0, deadline=30) as client:
            body = await client.open_range("/v2/x/blobs/sha256:" + "0" * 64, 0, 10**6)
            assert body is not None
            started = trio.current_time()
            with trio.move_on_after(1):
                await client.read_open(body, 1000)  # 200 s of drip
            assert trio.current_time() - started < 3, "the cancel waited for the thread"
            hung_up = await _hang_ups(server, 1)
    assert hung_up == 1, "the range thread still reads from the registry"


# A redirect to anything but http(s) is refused on the range threads' path (ranges._follow)
# as the client refuses it (urls.leaves_https), from a plain-http registry too (loopback,
# --insecure): a blob redirected to gopher://host:port/ (or file:///x: host "", which
# connects to this host's port 80) is never asked there, and the user sees the client's
# error.
@pytest.mark.remote
async def test_a_blob_redirect_to_another_scheme_is_refused_on_every_path() -> None:
    blob = "/v2/x/blobs/sha256:" + "0" * 64
    with FaultServer() as registry, FaultServer() as other:
        elsewhere = other.url.replace("http://", "gopher://") + "/blob"
        registry.inject(Fault(307, headers=(("Location", elsewhere),), path="/blobs/"), times=4)
        content_range = (("Content-Range", "bytes 0-9/10"),)
        other.inject(Fault(206, body=b"x" * 10, headers=content_range), times=4)
        async with _client(registry.url) as client:
            with contextlib.suppress(StorageError):
                await client.get_range(blob, 0, 10)
    assert other.seen == []


@pytest.mark.remote
@pytest.mark.parametrize(
    ("realm", "refusal"),
    [("file:///etc/passwd", "is not http"), ("http://192.0.2.1/token", "is plain http")],
    ids=["file-realm", "plain-http-realm"],
)
async def test_a_token_realm_off_http_s_gets_no_login(
    https: tuple[ssl.SSLContext, Path], realm: str, refusal: str
) -> None:
    """A challenge whose realm is a file:// URL, or plain http on another host than the
    registry's (192.0.2.1: TEST-NET, never reached), is refused before any request: the
    login never goes there."""
    context, cert = https
    with FaultServer(tls=context) as registry:
        challenge = (("WWW-Authenticate", f'Bearer realm="{realm}",service="s"'),)
        registry.inject(Fault(401, headers=challenge, path="/tags/"))
        login = Credentials("alice", "pw-h4")
        async with _client(registry.url, ca_file=str(cert), credentials=login) as client:
            with pytest.raises(AccessDenied, match=refusal):
                await client.request("GET", "/v2/x/tags/list")
