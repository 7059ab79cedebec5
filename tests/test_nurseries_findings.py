"""Findings of a review of storage/nurseries.py (`open_nursery`: a nursery's error comes out
as itself): what must never be demoted to the cause of another error."""

from __future__ import annotations

import errno

import pytest
import trio

from storage.nurseries import open_nursery


async def _fail(exc: BaseException) -> None:
    await trio.lowlevel.checkpoint()
    raise exc


@pytest.mark.storage
@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
async def test_a_keyboard_interrupt_beside_a_task_s_error_is_not_swallowed(stop: type) -> None:
    """A child fails (an I/O error), and the body, cancelled for it, meets a Ctrl-C (trio
    raises KeyboardInterrupt in the main task where the signal finds it) or a SystemExit:
    trio's group holds both, and `open_nursery` raised the first, the OSError, with the
    group as its cause, so a caller's `except OSError` (every storage caller's, and the
    daemon's errno mapping) took the Ctrl-C as an I/O error and went on. A plain
    trio.open_nursery lets it out: a BaseExceptionGroup no `except Exception` catches."""
    with pytest.raises(stop):
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(_fail, OSError(errno.EIO, "a child's read"))
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    raise stop() from None
        except OSError:
            pass  # a storage caller's handler: the interrupt must not end here
