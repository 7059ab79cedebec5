"""The shape every helper server shares: `start()` returns it, `stop()` ends it, and
`with server:` does both."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """A context manager over `start()` and `stop()`, which subclasses define."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
