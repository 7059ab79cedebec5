"""Hash a byte range of stored data into a running sha256, off the event loop.

One loop for the two places that read stored bytes back to hash them: an upload catching
its running hash up with its data (after a resume or a rewind), and `check --verify`
hashing a blob to compare it with its digest. It is apart from both because it is neither
protocol nor check: it reads HASH_CHUNK at a time and hashes each chunk in a worker thread
(ctypes releases the GIL in SHA256_Update, so the loop goes on beside it).
"""

from __future__ import annotations

import trio

from .digests import Sha256State
from .drivers import FileReader

HASH_CHUNK = 4 << 20


async def hash_range(reader: FileReader, state: Sha256State, end: int) -> None:
    """Hash the reader's bytes from `state.size` up to `end` into `state`.

    It stops early at the end of the data (a short read, hashed too): `state.size` then
    says how far it got, for a caller that needs the whole range to tell it is short.
    """
    while state.size < end:
        want = min(HASH_CHUNK, end - state.size)
        chunk = await reader.read_at(state.size, want)
        await trio.to_thread.run_sync(state.update, chunk)
        if len(chunk) != want:
            return
