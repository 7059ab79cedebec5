"""The shape every helper server shares: `start()` returns it, `stop()` ends it, and
`with server:` does both; a server with a process of its own is `track()`ed from its start
to its stop, and stopped at exit should a test run be interrupted."""

from __future__ import annotations

import atexit
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


class StartStop:
    """A context manager over `start()` and `stop()`, which subclasses define."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

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
