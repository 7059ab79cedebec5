"""The shape every helper server shares: `start()` returns it, `stop()` ends it, and
`with server:` does both; a server with a process of its own is `track()`ed from its start
to its stop, and stopped at exit should a test run be interrupted."""

from __future__ import annotations

import atexit
import socket
from types import TracebackType
from typing import Self

_live: set[StartStop] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Last resort for an interrupted run: never leave a server process behind."""
    for server in list(_live):
        server.stop()


def running(kind: type[StartStop]) -> list[StartStop]:
    """The servers of this kind whose process runs now: what a test may have left behind."""
    return [server for server in _live if isinstance(server, kind)]


def free_port() -> int:
    """A TCP port that was free a moment ago (the server retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartStop:
    """A context manager over `start()` and `stop()`, which subclasses define."""

    port: int

    def start(self) -> Self:
        raise NotImplementedError

    def _try_start(self) -> bool:
        """One attempt of a server that binds a port (see bind_and_start)."""
        raise NotImplementedError

    def log_tail(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def bind_and_start(self, what: str) -> Self:
        """Start on `self.port` (a free one if unset), on another when the port was taken
        meanwhile (`_try_start()` says False), twice at most; stopped again on any failure."""
        try:
            for attempt in range(3):
                if not self.port or attempt:
                    self.port = free_port()
                if self._try_start():
                    return self
            raise RuntimeError(f"{what} could not bind a port:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def track(self, live: bool = True) -> None:
        """Note that a process of this server runs (or, live=False, no longer does)."""
        if live:
            _live.add(self)
        else:
            _live.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
