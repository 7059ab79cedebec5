"""A pause of Python's cyclic garbage collector around bulk work that makes no cycles.

Listings of 10,000 tags or repositories, an index's member table and an image's merged tree
are many small objects made at once and none of them in a reference cycle; the collections
their allocations set off walk every new object again and again (gc.callbacks: 47-97 ms of a
fresh mount's 65-150 ms `ls` of 10,000 tags, 12-43 ms of the 200-340 ms that loading and
merging 15,000 members took). Once on again, one young collection walks what was made.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_pauses = 0  # gc_paused() blocks running now, in any thread
_pauses_lock = threading.Lock()
_gc_was_enabled = True


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block. Pauses in several threads (the daemon's trio
    thread and its workers) end with the last; a GC that was off before stays off. Only
    around code that does not wait on storage or the network, so that other requests'
    cyclic garbage never waits on it."""
    global _pauses, _gc_was_enabled
    with _pauses_lock:
        if _pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pauses_lock:
            _pauses -= 1
            if _pauses == 0 and _gc_was_enabled:
                gc.enable()
