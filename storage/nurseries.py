"""Nurseries whose failure comes out as the error itself, not as an ExceptionGroup.

trio (0.25 on, `strict_exception_groups`, the only mode left) wraps whatever a nursery's
tasks raise in an ExceptionGroup, even a single error: a PermissionError of one child's
stat in `Catalog.children` reached FUSE as a group, which no `except PermissionError` and no
errno mapping sees (`regfs/errors.py`): EIO and a traceback where the errno and one line
were due. A nursery here is `open_nursery()`, and the daemon's mapping reads a group through
`sole_error`; the rule is in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


def errors_in(exc: BaseException) -> list[BaseException]:
    """The errors a group holds, nested groups flattened, in order, trio.Cancelled left
    out (a nursery's cancelled siblings: the cancel, not an error); [exc] for no group."""
    if not isinstance(exc, BaseExceptionGroup):
        return [] if isinstance(exc, trio.Cancelled) else [exc]
    return [leaf for inner in exc.exceptions for leaf in errors_in(inner)]


def sole_error(exc: BaseException) -> BaseException:
    """The error a group stands for when it holds exactly one (cancels aside); else exc."""
    found = errors_in(exc) if isinstance(exc, BaseExceptionGroup) else []
    return found[0] if len(found) == 1 else exc


@asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """trio.open_nursery(), whose failure is the first error its tasks (or its body) raised,
    as itself; a group of cancels alone goes out as it is, for the cancel scope it belongs
    to. A task that fails cancels its siblings, so a second error is rare (two tasks that
    failed before either was cancelled: S3's concurrent checks): then the group is the
    first's cause, and a traceback logged shows every error. A KeyboardInterrupt or
    SystemExit among them (anything that is no Exception) goes out before any error: as
    another's cause, a caller's `except OSError` swallowed it
    (tests/test_nurseries_findings.py)."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        found = errors_in(group)
        if not found:
            raise
        if len(found) == 1:
            raise found[0] from None
        stops = [exc for exc in found if not isinstance(exc, Exception)]
        raise (stops or found)[0] from group
