"""An upload's saved hash states: `_uploads/<uuid>/hashstates/sha256/<offset>` files.

Each holds the running sha256 after the first <offset> bytes of the data, in Go's binary
form (storage/digests.py), so neither regfs after a restart nor the registry re-reads the
data to finish. This module knows the files (list, save, find the nearest that loads,
rewind below an offset, prove a digest); the upload protocol decides when to save, and
syncs the data first: a state at the data's size is trusted without reading the data.
Apart from the protocol as distribution keeps its resumable-hash code apart from its blob
writer.
"""

from __future__ import annotations

import logging

from .digests import Digest, Sha256State
from .drivers import PathNotFound, StorageDriver
from .paths import HashState, HashStatesDir, path_for

log = logging.getLogger(__name__)


class HashStates:
    """The saved hash states of one upload; `saved_at` is the offset of the newest one this
    writer saved or started from."""

    def __init__(self, driver: StorageDriver, name: str, uuid: str, saved_at: int = 0) -> None:
        self.driver = driver
        self.name = name
        self.uuid = uuid
        self.saved_at = saved_at

    async def offsets(self) -> list[int]:
        try:
            names = await self.driver.list(path_for(HashStatesDir(self.name, self.uuid)))
        except PathNotFound:
            return []
        # Plain ASCII decimals only: "²".isdigit() holds, and int() refuses it.
        return sorted(int(n) for n in names if n.isascii() and n.isdigit())

    async def save(self, offset: int, marshalled: bytes) -> None:
        """Save the state of the first `offset` bytes; the caller has synced them."""
        state = HashState(self.name, self.uuid, offset)
        await self.driver.put_content(path_for(state), marshalled)
        self.saved_at = offset

    async def nearest(self, limit: int) -> Sha256State:
        """The saved state with the largest offset ≤ limit that loads; else a fresh one."""
        for offset in reversed(await self.offsets()):
            if offset > limit:
                continue
            path = path_for(HashState(self.name, self.uuid, offset))
            try:
                state = Sha256State.unmarshal(await self.driver.get_content(path))
            except (ValueError, PathNotFound) as exc:
                log.warning("resume: skipping unusable hash state %s: %s", path, exc)
                continue
            if state.size == offset:
                return state
            log.warning("resume: hash state %s holds %d bytes, not %d", path, state.size, offset)
        return Sha256State()

    async def rewind(self, offset: int) -> Sha256State:
        """Delete the states above offset (the registry would trust one whose offset matches
        the data's size), and answer the nearest one below, to hash on from."""
        for saved in await self.offsets():
            if saved > offset:
                await self.driver.delete(path_for(HashState(self.name, self.uuid, saved)))
        state = await self.nearest(offset)
        self.saved_at = state.size
        return state

    async def prove(self, expected: Digest) -> bool:
        """Whether a saved state (of some data, not none) has the digest `expected`."""
        for offset in await self.offsets():
            path = path_for(HashState(self.name, self.uuid, offset))
            try:
                state = Sha256State.unmarshal(await self.driver.get_content(path))
            except (ValueError, PathNotFound):
                continue
            if offset and state.digest() == expected:
                return True
        return False
