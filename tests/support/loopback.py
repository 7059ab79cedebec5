"""A stub HTTP server for tests: http.server on a free loopback port, served from a thread.

`stop()` joins every handler thread, so it first hangs up on every client still connected:
an idle keep-alive connection in a client's pool, or one that stopped mid-request, would
hold its thread for the handler's timeout (5 s), and one that trickles bytes for good.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    timeout = 5  # an idle keep-alive connection ends (stop() hangs up on it sooner)
    server: ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()

    def process_request(  # type: ignore[override]
        self, request: socket.socket, client_address: tuple[str, int]
    ) -> None:
        """Track the client until its handler closes it."""
        with self._clients_lock:
            self._clients.add(request)
        super().process_request(request, client_address)

    def close_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._clients_lock:
            self._clients.discard(request)
        super().close_request(request)

    @property
    def clients(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    def hang_up(self) -> None:
        """Wake every handler blocked reading from its client (it reads EOF and ends);
        closing each socket is left to its handler's thread. Called once shutdown() has
        returned, so that no client comes in after."""
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):  # already gone
                # The plain socket's: an SSLSocket's own would unwrap it under its reader.
                socket.socket.shutdown(client, socket.SHUT_RDWR)

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A client that hangs up mid-answer (regfs closing an open-ended GET it no longer
        needs) or refuses the certificate is normal here; anything else is printed as
        http.server does."""
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class LoopbackHTTP:
    """Serves `handler` until stop(), which hangs up on every client and joins every
    handler thread.

    Handlers reach the test object that owns the server as `self.server.owner`. With
    `tls` (a server-side context) it speaks https only.
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        owner: object,
        name: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        if tls is not None:
            # The handshake runs in the handler's thread, on its first read.
            self.server.socket = tls.wrap_socket(
                self.server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.server.daemon_threads = False  # server_close() joins the handler threads
        self.server.owner = owner  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name=name, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return self.server.clients

    def stop(self) -> None:
        self.server.shutdown()
        self.server.hang_up()
        self.server.server_close()
        self._thread.join(5)
