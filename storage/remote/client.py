"""The request core for the OCI distribution API: TLS, caps, redirects, retries, deadlines.

Each request goes through here once, so these rules hold for every one; how to authenticate
is auth.py's (`Authenticator` gives each request to the registry its header and learns from
each 401), where a login comes from is credentials.py's, and layer reads are reader.py's.

`storage/remote/registry.py` builds the repository view on top of `RemoteClient`; it sees
either a response whose status it listed in `expect`, or one typed error:

- `AccessDenied` (storage.errors): 401 or 403 once authentication has been tried;
- `RemoteNotFound` (a LookupError): 404 not listed in `expect`, with the registry's codes
  (`BLOB_UNKNOWN`, `MANIFEST_UNKNOWN`, `NAME_UNKNOWN`, ...) to map to the right kind;
- `RemoteUnavailable` (storage.errors): 429, 5xx, refused connections and timeouts that
  persisted through the retries or the request's deadline; `TLSError`, its subclass, when
  the server's certificate is not trusted (not retried: it will not change by itself);
- `RemoteError`: any other status the caller did not expect (400, 409, 416, ...);
  `RemoteTooLarge`, its subclass, for an answer over the cap of its kind
  (storage/remote/untrusted.py), and a redirect from https to plain http.

Credentials go to the registry's own origin only: a redirect target (object storage) gets
no `Authorization`, and its 401 challenge is not acted on. `insecure` turns TLS checks off
for the registry's host alone; token servers and redirect targets are verified.

Requests run on one `httpx.AsyncClient` (HTTP/1.1, keep-alive), which httpx drives through
anyio, so it works inside trio. Every request has a total deadline on top of httpx's
connect/read/write timeouts, so no caller waits forever.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import httpcore._async.http11 as _http11
import httpx
import trio

from storage import jsontext
from storage.errors import RemoteError, RemoteUnavailable
from storage.nurseries import open_nursery
from storage.remote.auth import Authenticator, Token
from storage.remote.credentials import Credentials, docker_config_credentials
from storage.remote.ranges import (
    PIPELINE_DEPTH,
    Answer,
    InUse,
    OpenBody,
    RangeFetcher,
    origin_of,
)
from storage.remote.retry import IDEMPOTENT, NOT_SENT, pause
from storage.remote.untrusted import (
    BODY_MAX,
    ERROR_BODY_MAX,
    RANGE_SKIP_MAX,
    SMALL_MANY_BYTES,
    error_detail,
    shown,
)
from storage.remote.urls import (
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_API,
    is_loopback,
    leaves_https,
    loggable,
    origin,
)

__all__ = [
    "RemoteClient",
    "RemoteError",
    "RemoteNotFound",
    "RemoteTooLarge",
    "TLSError",
]

log = logging.getLogger(__name__)

USER_AGENT = "regfs (httpx)"
MAX_REDIRECTS = 10
T = TypeVar("T")
RANGE_THREADS = 8  # blob range GETs at once on worker threads (read-ahead caps the bytes)

RECV_SIZE = 1 << 20
"""Bytes httpcore asks the socket for at a time (its default is 64 KiB). Every receive
costs a trip through h11 and trio, so at 64 KiB a blob comes in at ~300 MB/s on a fast
machine; at 1 MiB, over 700 MB/s. httpcore has no setting for it: its class attribute is
raised once here (the daemon's only HTTP client is this one)."""
if hasattr(_http11.AsyncHTTP11Connection, "READ_NUM_BYTES"):
    _http11.AsyncHTTP11Connection.READ_NUM_BYTES = max(
        _http11.AsyncHTTP11Connection.READ_NUM_BYTES, RECV_SIZE
    )


# --------------------------------------------------------------------------- errors


class RemoteNotFound(RemoteError, LookupError):
    """404: the caller maps it, by `codes` and by call, to UnknownLayer/UnknownManifest/..."""


class RemoteTooLarge(RemoteError):
    """An answer larger than regfs reads of its kind: not read further, the connection hung
    up, so a hostile registry cannot grow the daemon's memory."""


class TLSError(RemoteUnavailable):
    """The TLS handshake failed, typically an untrusted (self-signed) certificate."""


def error_codes(resp: httpx.Response) -> tuple[str, ...]:
    """The `code`s of a distribution error body; empty if the body is not one (or unread)."""
    try:
        errors = jsontext.loads(resp.content).get("errors")
        return tuple(str(e["code"]) for e in errors if isinstance(e, dict) and "code" in e)
    except (ValueError, AttributeError, TypeError, KeyError, httpx.ResponseNotRead):
        return ()


# --------------------------------------------------------------------------- helpers


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error behind an httpx connect error, if any (httpcore chains it as cause)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _describe(exc: BaseException) -> str:
    """`ReadTimeout` or `ConnectError: [Errno 111] Connection refused`, for logs (a protocol
    error may quote what the server sent: escaped)."""
    text = shown(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reason(resp: httpx.Response) -> str:
    """`404 Not Found`: the status and the server's reason phrase, escaped."""
    return f"{resp.status_code} {shown(resp.reason_phrase)}"


async def _read_body(
    resp: httpx.Response, limit: int, *, prefix: bool = False
) -> tuple[bytes, bool]:
    """At most `limit` bytes of a streamed body, and whether it holds more. The response is
    closed: one with bytes left unread is hung up on, never read to its end. A declared
    `Content-Length` over the limit is not read at all, unless the caller wants the body's
    `prefix`. Raw bytes: the client asks for no content coding, and a compressed body could
    inflate past any limit. (A HEAD's Content-Length is the size of what a GET would
    send: it has no body.)"""
    try:
        declared = resp.headers.get("Content-Length", "")
        if resp.request.method == "HEAD":
            declared = ""
        if not prefix and declared.isdigit() and int(declared) > limit:
            return b"", True
        body = bytearray()
        async with aclosing(_raw(resp)) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    return bytes(body[:limit]), True
        return bytes(body), False
    finally:
        await resp.aclose()


async def _raw(resp: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The body as it arrives; at once if it was read already (a mock transport's).

    A caller that stops at a cap closes this (`aclosing`), and this closes httpx's
    iterator, so neither is left to the garbage collector (trio warns of each). The
    generators inside httpx and httpcore are still left so (encode/httpx#3686)."""
    try:
        yield resp.content
    except httpx.ResponseNotRead:
        # httpx types aiter_raw as an AsyncIterator; it is an async generator.
        async with aclosing(cast(AsyncGenerator[bytes, None], resp.aiter_raw())) as chunks:
            async for chunk in chunks:
                yield chunk


def _with_body(resp: httpx.Response, body: bytes) -> httpx.Response:
    """`resp` as a read response holding `body` (what was kept of a capped read). Its
    headers as the bytes they came as: decoded ones past ASCII (a CDN's `X-Note: café`)
    would not encode back."""
    headers = [(k, v) for k, v in resp.headers.raw if k.lower() != b"content-encoding"]
    return httpx.Response(
        resp.status_code,
        headers=headers,
        content=body,
        request=resp.request,
        extensions=resp.extensions,
    )


async def _drain(resp: httpx.Response) -> httpx.Response:
    """The start of an error body, enough to report it; the connection is released."""
    try:
        body, _ = await _read_body(resp, ERROR_BODY_MAX)
    except httpx.TransportError:
        body = b""
    return _with_body(resp, body)


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Small:
    """What `RemoteClient.small` answers: status, headers (looked up by lower-case name)
    and body."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    @classmethod
    def of(cls, response: httpx.Response) -> Small:
        return cls(response.status_code, response.headers, response.content)

    @classmethod
    def answered(cls, answer: Answer) -> Small:
        """From http.client's answer on a worker thread (ranges.py)."""
        return cls(answer.status, {k.lower(): v for k, v in answer.headers}, answer.body)


@dataclass(frozen=True)
class Batch:
    """What `RemoteClient.small_many` answered: each path's answer or None, and whether it
    stopped at an answer that was no plain 200, or at its deadline (ask no more in batches)."""

    answers: list[Small | None]
    failed: bool


@dataclass(frozen=True)
class Exchanged:
    """One try's final answer (its body unread), the scheme and token it was sent with
    (None when it went elsewhere), and whether its chain of redirects left the origin it
    was first addressed to (its 401 is then no challenge of the registry's)."""

    resp: httpx.Response
    sent_scheme: str | None
    sent_token: Token | None
    strayed: bool


class RemoteClient:
    """Requests to one registry (`base_url`, e.g. `https://host:5000`), authenticated and
    retried. Use from trio; `aclose()` (or `async with`) releases the connections.

    - `credentials`: used for Basic auth and for token requests; without them the client is
      anonymous (token servers often grant anonymous pulls). `user:password@` in `base_url`
      counts as credentials.
    - TLS is verified (certifi's CAs, or `$SSL_CERT_FILE`); `ca_file` adds a CA bundle;
      `insecure` turns verification off for the registry's host and port alone (never for
      its token server or redirect targets) and allows plain `http://` to a registry other
      than on loopback (plain http to loopback is always allowed).
    - `timeout` bounds connect, each read, each write and waiting for a pooled connection;
      `retries` is how many times a failed idempotent request is sent again; every request
      (all tries, backoff and token requests included) ends within `deadline`, by default
      `timeout * (retries + 1)`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        ca_file: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        deadline: float | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) registry URL: {url.scheme}://{url.host}")
        if url.path.rstrip("/") not in ("", "/v2"):
            raise ValueError(f"a registry URL has no path (got {url.path!r})")
        if url.userinfo:
            if credentials is None:
                credentials = Credentials(url.username, url.password)
            url = url.copy_with(username=None, password=None)
        if url.host in DOCKER_HUB_ALIASES:
            log.info("%s: Docker Hub's registry API is %s", url.host, DOCKER_HUB_API)
            url = url.copy_with(host=DOCKER_HUB_API)
        self.base_url = url.copy_with(path="/", query=None, fragment=None)
        self._origin = str(self.base_url).rstrip("/")  # what a path is joined to
        # The page size the registry last answered each kind of listing with (`_catalog`'s
        # "repositories", "tags"; storage/remote/registry.py): a catalog's maxentries does
        # not bound tags/list.
        self.page_sizes: dict[str, int] = {}
        if url.scheme == "http" and not insecure and not is_loopback(url.host):
            raise ValueError(
                f"plain http to {url.netloc.decode()} is not allowed without --insecure "
                "(https is verified; plain http only to loopback)"
            )
        self.insecure = insecure
        self.ca_file = ca_file
        self.timeout = timeout
        self.retries = retries
        self.deadline = deadline if deadline is not None else timeout * (retries + 1)
        self._auth = Authenticator(self.base_url, credentials, insecure, self._send_token)
        verified = self._ssl_context(False, ca_file)
        registry_tls = self._ssl_context(True, ca_file) if insecure else None
        self._ranges = RangeFetcher(
            verified, timeout, USER_AGENT, origin_of(str(self.base_url)), registry_tls
        )
        self._range_threads = trio.CapacityLimiter(RANGE_THREADS)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=16)
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        if registry_tls is not None:
            # Only the registry's own host and port go unverified (a pattern without a port
            # would match every port of the host).
            netloc = self.base_url.netloc.decode("ascii")
            if self.base_url.port is None:
                netloc += ":443"
            mounts[f"https://{netloc}"] = httpx.AsyncHTTPTransport(
                verify=registry_tls, limits=limits, http1=True
            )
        self._http = httpx.AsyncClient(
            verify=verified,
            timeout=httpx.Timeout(timeout),
            limits=limits,
            http1=True,
            http2=False,
            follow_redirects=False,
            mounts=mounts,
            # Bodies are read raw against a cap: a compressed one could inflate past it.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )

    @classmethod
    def from_docker_config(cls, base_url: str, **kw: Any) -> RemoteClient:
        """A client with the login `auths` of the Docker config holds for this registry
        (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`); explicit
        `credentials=` win. Anonymous if there is none."""
        if kw.get("credentials") is None:
            kw["credentials"] = docker_config_credentials(base_url)
        return cls(base_url, **kw)

    @staticmethod
    def _ssl_context(insecure: bool, ca_file: str | None) -> ssl.SSLContext:
        if insecure:
            return httpx.create_ssl_context(verify=False)
        ctx = httpx.create_ssl_context()
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
        return ctx

    def __repr__(self) -> str:
        user = self.credentials.username if self.credentials else None
        return (
            f"RemoteClient({str(self.base_url)!r}, user={user!r}, "
            f"auth={self._auth.scheme!r}, insecure={self.insecure})"
        )

    @property
    def name(self) -> str:
        """`host:port` of the registry, as messages name it."""
        return self.base_url.netloc.decode("ascii")

    @property
    def credentials(self) -> Credentials | None:
        """The login the client authenticates with (kept by its Authenticator)."""
        return self._auth.credentials

    async def aclose(self) -> None:
        self._ranges.close()
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------- public calls

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        expect: tuple[int, ...] = (200,),
        follow_redirects: bool = True,
        retry_unsafe: bool = False,
        limit: int = BODY_MAX,
    ) -> httpx.Response:
        """Send one request and return the response, body read, if its status is in `expect`.

        `url` is a path (`/v2/...`) or an absolute URL such as an upload `Location`;
        `params` are added to the URL's own query (an upload's `_state` is kept).
        Every method is retried when the connection failed before sending; once a POST or
        PATCH may have reached the registry, only with `retry_unsafe=True` (the caller can
        tell a repeat from the original: on registry 2.8 a PATCH whose first copy landed
        carries a stale `_state` and gets 404 BLOB_UPLOAD_INVALID, i.e. RemoteNotFound).
        A body over `limit` bytes is not read further: RemoteTooLarge.
        """
        return await self._send(
            method.upper(),
            url,
            headers=headers,
            params=params,
            content=content,
            expect=expect,
            follow_redirects=follow_redirects,
            retry_unsafe=retry_unsafe,
            stream=False,
            limit=limit,
        )

    async def small(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, limit: int = BODY_MAX
    ) -> Small:
        """`request` for a GET or HEAD of a listing (a manifest, a blob's size), which a
        walk sends by the thousand: on a worker thread with http.client when the answer is
        a plain 200, at a fifth of httpx's CPU per request (storage/remote/ranges.py);
        anything else is asked again through `request`, which owns statuses and errors.
        A path is joined to the registry's origin as a string, and the answer is no httpx
        Response: each cost the daemon's one thread ~25 µs a request (a walk asks thousands)."""
        if url.startswith("/") and not url.startswith("//"):
            where = self._origin + url
        elif origin(target := self._resolve(url)) == origin(self.base_url):
            where = str(target)
        else:  # the registry's Authorization goes to its own origin only
            return Small.of(await self.request(method, url, headers=headers, limit=limit))
        authorization = None
        if self._auth.scheme is not None:
            authorization = (await self._auth.authorization(method, httpx.URL(where)))[2]
        in_use = InUse()
        try:
            with trio.move_on_after(self.deadline):
                answer = await trio.to_thread.run_sync(
                    self._ranges.small,
                    method,
                    where,
                    headers or {},
                    authorization,
                    limit,
                    in_use,
                    limiter=self._range_threads,
                    abandon_on_cancel=True,
                )
                if answer is not None:
                    return Small.answered(answer)
        finally:
            # At the deadline, or cancelled from outside (a read-ahead let go, an unmount):
            # the abandoned thread must not read on from a drip. Once it answered, nothing
            # of it is left in in_use.
            in_use.shut_down()
        return Small.of(await self.request(method, url, headers=headers, limit=limit))

    async def small_many(
        self,
        method: str,
        paths: Sequence[str],
        *,
        headers: dict[str, str] | None = None,
        limit: int = BODY_MAX,
        parallel: int = 8,
    ) -> Batch:
        """`small` for many paths (`/v2/...`) of one repository, whose one authorization
        serves them all: up to `parallel` worker threads each take PIPELINE_DEPTH paths at a
        time and pipeline them on one connection (`RangeFetcher.pipelined`), with no trio
        round trip per request (a walk's thousands of manifest GETs and blob HEADs spent most
        of the daemon's thread on those; http.client's own request and answer per path cost
        ~170 us of CPU, a pipelined one ~110, at ~1 ms of registry CPU each). A repository's
        10 tags so go on one connection, and a walk's parallelism is the repositories listed
        ahead. The first answer that is not a plain 200 or a redirect stops
        the rest (a registry failing is not asked further: `failed`), and so do the deadline
        (`failed` too) and answers past SMALL_MANY_BYTES, held until the last (ask the paths left
        in another batch once the caller kept what it needs). None for each path not
        answered, to ask again or with `small`, which owns every other answer."""
        if not paths:
            return Batch([], failed=False)
        if not all(p.startswith("/") and not p.startswith("//") for p in paths):
            raise ValueError("small_many takes paths on the registry's origin")
        authorization = None
        if self._auth.scheme is not None:
            target = httpx.URL(self._origin + paths[0])
            authorization = (await self._auth.authorization(method, target))[2]
        answers: list[Answer | None] = [None] * len(paths)
        order = iter(range(len(paths)))
        taking = threading.Lock()
        stop = threading.Event()
        failed = threading.Event()
        sent = headers or {}
        held = 0
        in_use = InUse()

        def keep(share: list[int], at: int, answer: Answer) -> bool:
            nonlocal held
            answers[share[at]] = answer
            size = len(answer.body) + sum(len(k) + len(v) for k, v in answer.headers)
            with taking:
                held += size
                if held > SMALL_MANY_BYTES:
                    stop.set()
            return not stop.is_set()

        def work() -> None:
            while not stop.is_set():
                with taking:
                    share = list(itertools.islice(order, PIPELINE_DEPTH))
                if not share:
                    return
                while share and not stop.is_set():  # a registry that hangs up after some
                    urls = [self._origin + paths[index] for index in share]
                    done = self._ranges.pipelined(
                        method, urls, sent, authorization, limit, partial(keep, share), in_use
                    )
                    if not done:
                        failed.set()
                        stop.set()
                        return
                    left = [index for index in share if answers[index] is None]
                    if len(left) == len(share):
                        return
                    share = left

        run = partial(
            trio.to_thread.run_sync, work, limiter=self._range_threads, abandon_on_cancel=True
        )
        try:
            with trio.move_on_after(self.deadline) as scope:
                async with open_nursery() as nursery:
                    for _ in range(min(parallel, -(-len(paths) // PIPELINE_DEPTH))):
                        nursery.start_soon(run)
        finally:
            stop.set()  # a thread abandoned at the deadline (or a cancel) sends nothing more
            in_use.shut_down()  # nor reads on (once all ended, none is left to shut)
        answered = [None if a is None else Small.answered(a) for a in list(answers)]
        return Batch(answered, failed=failed.is_set() or scope.cancelled_caught)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200, 206),
        follow_redirects: bool = True,
    ) -> AsyncIterator[httpx.Response]:
        """Like `request`, for large bodies: the response comes unread; read it with
        `aiter_raw()`/`aiter_bytes()` inside the `async with`.

        Retries and the deadline cover getting the response; each read of the body is then
        bounded by `timeout`, and a failure while reading raises RemoteUnavailable (a caller
        may resume with a `Range`). A registry may answer a `Range` request with the whole
        blob (200): check the status.
        """
        method = method.upper()
        resp = await self._send(
            method,
            url,
            headers=headers,
            params=params,
            content=None,
            expect=expect,
            follow_redirects=follow_redirects,
            retry_unsafe=False,
            stream=True,
        )
        try:
            yield resp
        except httpx.TransportError as exc:
            where = self._where(resp.request.url)
            raise RemoteUnavailable(
                f"registry {self.name}: {method} {where}: reading the body failed: {_describe(exc)}"
            ) from exc
        finally:
            await resp.aclose()

    async def get_range(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the blob at `url` (a `/v2/.../blobs/<digest>` path): on a
        worker thread when it can (storage/remote/ranges.py), else through `request`."""
        in_use = InUse()
        try:
            with trio.move_on_after(self.deadline):
                # Abandoned at the deadline (or cancelled): the thread keeps nothing the
                # next call needs, and its connection is shut down (`small`).
                fetch = partial(self._ranges.get, in_use=in_use)
                body = await self._on_range_thread(fetch, url, start, end, abandon=True)
                if body is not None:
                    return body
        finally:
            in_use.shut_down()
        headers = {"Range": f"bytes={start}-{end - 1}"}
        async with self.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 206:
                body, more = await _read_body(resp, end - start)
                if more or len(body) != end - start:
                    raise RemoteError(
                        f"registry {self.name}: GET {self._where(resp.request.url)}: a range "
                        f"of {end - start} bytes came with {len(body)}{'+' if more else ''}",
                        status=206,
                    )
                return body
            return await self._skip_to(resp, start, end)

    async def _skip_to(self, resp: httpx.Response, start: int, end: int) -> bytes:
        """Bytes [start, end) of a whole blob sent to a `Range` request (200): only read
        that far, and only when what comes before is short; the rest is never read."""
        where = self._where(resp.request.url)
        if start > RANGE_SKIP_MAX:
            log.error(
                "registry %s: GET %s ignores Range; bytes %d-%d would mean reading %d bytes "
                "from its start (EIO)",
                self.name,
                where,
                start,
                end - 1,
                start,
            )
            await resp.aclose()
            raise RemoteError(
                f"registry {self.name}: GET {where}: the registry ignores Range requests, "
                f"and offset {start} is over the {RANGE_SKIP_MAX} bytes regfs skips",
                status=200,
            )
        body, _ = await _read_body(resp, end, prefix=True)
        return body[start:end]

    async def open_range(
        self, url: str, start: int, end: int, *, abandon: bool = False
    ) -> OpenBody | None:
        """The blob at `url` from start to its end `end` as one open response, to read in
        order with `read_open`; None when that cannot be had (then use `get_range`).
        Waited for on cancel (the socket's timeout bounds it), unless `abandon`: then the
        caller goes at once (an unmount must not wait for a registry that holds the GET
        back), and a response that comes after it has gone is closed on its thread."""
        if not abandon:
            return await self._on_range_thread(self._ranges.open, url, start, end, abandon=False)
        gone = threading.Event()

        def open_body(url: str, start: int, end: int, authorization: str | None) -> OpenBody | None:
            body = self._ranges.open(url, start, end, authorization)
            if body is not None and gone.is_set():
                body.close()
                return None
            return body

        try:
            return await self._on_range_thread(open_body, url, start, end, abandon=True)
        except BaseException:
            gone.set()
            raise

    async def read_open(self, body: OpenBody, size: int) -> bytes:
        """The next `size` bytes of an open response (see OpenBody.read). A cancel (a
        read-ahead let go, an interrupted read, an unmount) closes the body, which wakes its
        thread at once: one of the range threads must not read on from a registry that
        drips. The body is done for then; its reader opens another where it needs one."""
        try:
            return await trio.to_thread.run_sync(
                body.read, size, limiter=self._range_threads, abandon_on_cancel=True
            )
        except trio.Cancelled:
            body.close()
            raise

    async def _on_range_thread(
        self,
        fetch: Callable[[str, int, int, str | None], T],
        url: str,
        start: int,
        end: int,
        abandon: bool,
    ) -> T:
        """fetch(url, start, end, authorization) on a range thread, with the Authorization
        the registry asked for before (none until it has asked)."""
        target = self._resolve(url)
        authorization = None
        if self._auth.scheme is not None:
            authorization = (await self._auth.authorization("GET", target))[2]
        return await trio.to_thread.run_sync(
            fetch,
            str(target),
            start,
            end,
            authorization,
            limiter=self._range_threads,
            abandon_on_cancel=abandon,
        )

    async def ping(self) -> None:
        """`GET /v2/`: proves the registry answers and, if it asks, accepts our login."""
        await self.request("GET", "/v2/")

    # ----------------------------------------------------------------------- internals

    def _resolve(self, url: str) -> httpx.URL:
        """A path, or a URL the registry gave (a `Link` to the next page, an upload's
        `Location`), resolved against `base_url`; held to the rule of redirects
        (`urls.leaves_https`)."""
        target = self.base_url.join(url)
        if leaves_https(self.base_url.scheme, target.scheme):
            log.error(
                "registry %s: refused %s, given by the registry (https only leads to https)",
                self.name,
                shown(self._where(target)),
            )
            raise RemoteError(
                f"registry {self.name}: {shown(self._where(target))} refused "
                "(https only leads to https)",
                status=0,
            )
        return target

    def _where(self, url: httpx.URL) -> str:
        """The URL for logs and messages (urls.loggable)."""
        return loggable(self.base_url, url)

    async def _send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        content: bytes | None,
        expect: tuple[int, ...],
        follow_redirects: bool,
        retry_unsafe: bool,
        stream: bool,
        authenticate: bool = True,
        limit: int = BODY_MAX,
    ) -> httpx.Response:
        """Tries, auth challenges and the deadline for one request (see `request`).

        `authenticate=False` is for token requests: no challenge handling, the caller's
        `Authorization` header (if any) as is, to the origin it is addressed to only.
        """
        target = url if isinstance(url, httpx.URL) else self._resolve(url)
        if params:
            # httpx would replace the URL's query with `params`: merge instead.
            target = target.copy_merge_params(dict(params))
        where = self._where(target)
        may_retry = method in IDEMPOTENT or retry_unsafe
        failures = 0
        reauthenticated = False
        last = "no answer"
        reached = False  # a failed try may have reached the server (its answer was lost)
        with trio.move_on_after(self.deadline):
            while True:
                started = time.monotonic()
                try:
                    exchanged = await self._exchange(
                        method, target, headers, content, follow_redirects, authenticate
                    )
                    resp = exchanged.resp
                    if resp.status_code in expect and not stream:
                        resp = await self._read(resp, method, limit)
                except httpx.TransportError as exc:
                    if (tls := _tls_cause(exc)) is not None:
                        raise self._tls_error(tls) from exc
                    last = _describe(exc)
                    log.debug("%s %s: %s", method, where, last)
                    if failures < self.retries and (may_retry or isinstance(exc, NOT_SENT)):
                        failures += 1
                        reached = reached or not isinstance(exc, NOT_SENT)
                        await self._pause(method, where, last, failures, None)
                        continue
                    raise RemoteUnavailable(
                        f"registry {self.name}: {method} {where}: {last} "
                        f"(after {failures + 1} tries)"
                    ) from exc
                status = resp.status_code
                log.debug("%s %s -> %d (%.3f s)", method, where, status, time.monotonic() - started)
                if status == 404 and method == "DELETE" and reached:
                    # The try whose answer was lost deleted it (a DELETE is retried as
                    # idempotent, and its second answer is 404): the delete is done.
                    done = next((code for code in expect if 200 <= code < 300), None)
                    if done is not None:
                        await _drain(resp)
                        log.info(
                            "%s %s: 404 after a try whose answer was lost: done", method, where
                        )
                        return httpx.Response(done, request=resp.request)
                if status in expect:
                    return resp
                resp = await _drain(resp)
                if status == 401 and authenticate and not reauthenticated:
                    self._auth.check_challenger(resp, method, where, exchanged.strayed)
                    reauthenticated = True
                    await self._auth.on_challenge(
                        resp, method, target, exchanged.sent_scheme, exchanged.sent_token
                    )
                    continue
                if status in (401, 403):
                    raise self._auth.denied(resp, method, where, exchanged.sent_scheme)
                if status == 404:
                    raise RemoteNotFound(
                        f"registry {self.name}: {method} {where}: 404 {error_detail(resp)}",
                        status=status,
                        codes=error_codes(resp),
                    )
                if status == 429 or (status >= 500 and status not in (501, 505)):
                    last = _reason(resp)
                    if failures < self.retries and may_retry:
                        failures += 1
                        reached = reached or status != 429  # a 5xx may have done part of it
                        await self._pause(method, where, last, failures, resp)
                        continue
                    raise RemoteUnavailable(
                        f"registry {self.name}: {method} {where}: {last} "
                        f"(after {failures + 1} tries) {error_detail(resp)}".rstrip()
                    )
                raise RemoteError(
                    f"registry {self.name}: {method} {where}: unexpected {_reason(resp)} "
                    f"{error_detail(resp)}".rstrip(),
                    status=status,
                    codes=error_codes(resp),
                )
        raise RemoteUnavailable(
            f"registry {self.name}: {method} {where}: no answer within the "
            f"{self.deadline:g} s deadline ({failures + 1} tries; last: {last})"
        )

    async def _send_token(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        content: bytes | None,
        expect: tuple[int, ...],
    ) -> httpx.Response:
        """A token request for the Authenticator (auth.TokenSend)."""
        return await self._send(
            method,
            url,
            headers=headers,
            params=None,
            content=content,
            expect=expect,
            follow_redirects=True,
            retry_unsafe=True,  # sent again after a failure like the GET: a grant only reads
            stream=False,
            authenticate=False,
        )

    async def _exchange(
        self,
        method: str,
        target: httpx.URL,
        headers: Mapping[str, str] | None,
        content: bytes | None,
        follow_redirects: bool,
        authenticate: bool,
    ) -> Exchanged:
        """One try: the request and the redirects it is sent on (followed here, not by
        httpx, which would read each redirect's body whole and follow https to http).
        The registry's credentials go to each hop on the registry's origin only, a caller's
        `Authorization` to the origin it was addressed to only, and neither to any hop once
        the chain has left that origin, even back at the registry's: the first request is
        the user's, what a third party (a CDN) names is not."""
        first = origin(target)
        strayed = False  # a hop left `first`: what a third party names gets no credentials
        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = dict(headers or {})
            sent_scheme: str | None = None
            sent_token: Token | None = None
            strayed = strayed or origin(target) != first
            if strayed:
                hop_headers = {k: v for k, v in hop_headers.items() if k.lower() != "authorization"}
            elif authenticate and origin(target) == origin(self.base_url):
                sent_scheme, sent_token, value = await self._auth.authorization(method, target)
                if value is not None:
                    hop_headers["Authorization"] = value
            request = self._http.build_request(method, target, headers=hop_headers, content=content)
            resp = await self._http.send(request, stream=True, follow_redirects=False)
            if not (follow_redirects and resp.has_redirect_location):
                return Exchanged(resp, sent_scheme, sent_token, strayed)
            await _read_body(resp, ERROR_BODY_MAX)
            following = self._redirect_target(resp, method, target)
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, content = "GET", None  # as browsers and httpx do
            if content is not None and not authenticate and origin(following) != first:
                # A token request's body is the login (an identity token): it stays home.
                raise RemoteError(
                    f"registry {self.name}: {method} {self._where(target)}: redirected to "
                    f"{self._where(following)} with the login in its body; refused",
                    status=resp.status_code,
                )
            target = following
        raise RemoteError(
            f"registry {self.name}: {method} {self._where(target)}: over {MAX_REDIRECTS} redirects",
            status=resp.status_code,
        )

    def _redirect_target(self, resp: httpx.Response, method: str, target: httpx.URL) -> httpx.URL:
        """Where a redirect leads; RemoteError if it is not http(s), or leaves https for
        plain http (the blob's bytes and the signed URL would travel in clear)."""
        try:
            following = target.join(resp.headers["Location"])
        except httpx.InvalidURL:
            following = httpx.URL("invalid:")
        log.debug(
            "%s %s -> %d, redirected to %s",
            method,
            self._where(target),
            resp.status_code,
            self._where(following),
        )
        if leaves_https(target.scheme, following.scheme):
            log.error(
                "registry %s: %s %s: refused a redirect from %s to %s",
                self.name,
                method,
                self._where(target),
                target.scheme,
                shown(following.scheme or "?"),
            )
            raise RemoteError(
                f"registry {self.name}: {method} {self._where(target)}: redirect to "
                f"{shown(self._where(following))} refused (https only leads to https)",
                status=resp.status_code,
            )
        return following

    async def _read(self, resp: httpx.Response, method: str, limit: int) -> httpx.Response:
        """`resp` with its body read; RemoteTooLarge, the connection hung up, past `limit`."""
        body, more = await _read_body(resp, limit)
        if more:
            where = self._where(resp.request.url)
            declared = resp.headers.get("Content-Length")
            size = f"{shown(declared, 24)} bytes" if declared else "more"
            raise RemoteTooLarge(
                f"registry {self.name}: {method} {where}: {resp.status_code} answer of {size}, "
                f"over the {limit} bytes regfs reads of it; not read",
                status=resp.status_code,
            )
        return _with_body(resp, body)

    async def _pause(
        self, method: str, where: str, why: str, failures: int, resp: httpx.Response | None
    ) -> None:
        delay = pause(failures, resp)
        log.warning(
            "registry %s: %s %s: %s; retry %d of %d in %.1f s",
            self.name,
            method,
            where,
            why,
            failures,
            self.retries,
            delay,
        )
        await trio.sleep(delay)

    def _tls_error(self, exc: ssl.SSLError) -> TLSError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = exc.verify_message or exc.reason or "certificate verify failed"
            return TLSError(
                f"registry {self.name}: TLS certificate verification failed ({why}); "
                "trust its CA with a CA file, or turn verification off (insecure)"
            )
        return TLSError(
            f"registry {self.name}: TLS handshake failed ({exc.reason or exc}); "
            "does it speak https on this port?"
        )
