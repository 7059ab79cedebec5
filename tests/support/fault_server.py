"""A fault-injecting HTTP server on loopback: a stub, or a proxy in front of a real registry.

Each request takes the first queued `Fault` that matches it (method, path regex) and acts it
out: answer a status (e.g. 500, 429 with `Retry-After`), sleep before answering (past a
client's read timeout), drop the connection without an answer, or stall in the middle of
the body. Requests that match no
fault are forwarded to `upstream` (the `Host` header is kept, so the registry's `Location`s
point back at the proxy), or answered `200 {}` without one. Every request is recorded.

Threads: one per connection, all joined by `stop()`, which first closes every client
connection (a client's idle keep-alive connection, or one that stopped mid-request, would
hold its thread until the handler's timeout) and wakes every sleeping fault: it returns in
bounded time whatever the clients do.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from support.loopback import LoopbackHandler, LoopbackHTTP
from support.servers import StartStop

log = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}


@dataclass(frozen=True)
class Fault:
    """What to do instead of answering normally; `method`/`path` restrict what it matches."""

    status: int = 500
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    close: bool = False
    stall: float = 0.0  # send the headers and half the body, then wait this long
    lose_answer: bool = False  # pass the request upstream, then hang up instead of answering
    # Send this informational answer first (103 Early Hints), then answer as without a fault.
    interim: int = 0
    body: bytes = b'{"errors":[]}'
    method: str | None = None
    path: str | None = None  # a regex searched in the path (without the query)

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or re.search(self.path, path) is not None
        )


@dataclass(frozen=True)
class Seen:
    """One request: its method, path (with query) and what was done (`status`, or None when
    the connection was dropped), and the `Authorization` it came with."""

    method: str
    path: str
    status: int | None
    faulted: bool
    authorization: str | None = None
    client: int = 0  # the client's port: which connection it came on


@dataclass(eq=False)
class FaultServer(StartStop):
    upstream: str | None = None
    tls: ssl.SSLContext | None = None  # https only, with this server-side context
    seen: list[Seen] = field(default_factory=list, init=False)
    _faults: deque[Fault] = field(default_factory=deque, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _http: LoopbackHTTP | None = field(default=None, init=False, repr=False)

    @property
    def port(self) -> int:
        assert self._http is not None, "fault server not started"
        return self._http.port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def inject(self, *faults: Fault, times: int = 1) -> None:
        """Queue `faults`, `times` over, after those already queued."""
        with self._lock:
            self._faults.extend(faults * times)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.matches(method, path.split("?", 1)[0]):
                    del self._faults[i]
                    return fault
        return None

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def start(self) -> Self:
        self._stopping.clear()
        self._http = LoopbackHTTP(_Handler, self, "fault-server", self.tls)
        return self

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return 0 if self._http is None else self._http.connections

    def stop(self) -> None:
        """Wake every sleeping fault, then stop as `LoopbackHTTP.stop` does (it hangs up on
        every client and joins every handler thread)."""
        self._stopping.set()
        http, self._http = self._http, None
        if http is not None:
            http.stop()


class _Handler(LoopbackHandler):
    def setup(self) -> None:
        super().setup()
        self.owner: FaultServer = self.server.owner  # type: ignore[attr-defined]

    def _seen(self, status: int | None, faulted: bool) -> Seen:
        authorization = self.headers.get("Authorization")
        return Seen(self.command, self.path, status, faulted, authorization, self.client_address[1])

    def _handle(self) -> None:
        fs = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = fs.take(self.command, self.path)
        if fault is not None and fault.interim:
            self.send_response_only(fault.interim)
            for key, value in fault.headers:
                self.send_header(key, value)
            self.end_headers()
            fault = None
        if fault is not None and fault.lose_answer:
            resp = self._forward(fs, body)
            fs.record(self._seen(None, True))
            log.debug("fault server: %s answered %d upstream; dropped", self.path, resp.status_code)
            self.close_connection = True
            return
        if fault is not None:
            if fault.delay and fs._stopping.wait(fault.delay):
                self.close_connection = True
                return
            if fault.close:
                fs.record(self._seen(None, True))
                self.close_connection = True
                return
            fs.record(self._seen(fault.status, True))
            if fault.stall:
                self._stall(fault, fs)
                return
            self._answer(fault.status, dict(fault.headers), fault.body)
            return
        if fs.upstream is None:
            fs.record(self._seen(200, False))
            self._answer(200, {"Content-Type": "application/json"}, b"{}")
            return
        resp = self._forward(fs, body)
        fs.record(self._seen(resp.status_code, False))
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        if self.command != "HEAD":  # a HEAD keeps the upstream's length (a blob's size)
            out["content-length"] = str(len(resp.content))
        self._answer(resp.status_code, out, resp.content)

    def _forward(self, fs: FaultServer, body: bytes) -> httpx.Response:
        assert fs.upstream is not None, "lose_answer needs an upstream"
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        with httpx.Client(timeout=30) as client:
            return client.request(
                self.command, fs.upstream + self.path, headers=headers, content=body
            )

    def _stall(self, fault: Fault, fs: FaultServer) -> None:
        self.send_response(fault.status)
        for key, value in fault.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(fault.body)))
        self.end_headers()
        self.wfile.write(fault.body[: len(fault.body) // 2])
        self.wfile.flush()
        fs._stopping.wait(fault.stall)
        self.close_connection = True

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if not any(k.lower() == "content-length" for k in headers):
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fault server: " + format, *args)
