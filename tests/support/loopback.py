"""A stub HTTP server for tests: http.server on a free loopback port, served from a thread."""

from __future__ import annotations

import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    timeout = 5  # an idle keep-alive connection ends, so stop() never waits on a client
    server: ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A client that hangs up mid-answer (regfs closing an open-ended GET it no longer
        needs) or refuses the certificate is normal here; anything else is printed as
        http.server does."""
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class LoopbackHTTP:
    """Serves `handler` until stop(), which also joins every handler thread.

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

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
