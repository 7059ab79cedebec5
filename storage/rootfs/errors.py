"""Why a layer cannot be indexed or read: each names the layer and the reason.

The view turns every one into EIO for the images that use the layer, logged once with its
message; the rest of the mount keeps working.
"""

from __future__ import annotations

from ..errors import StorageError
from ..privatedir import UnsafeDirectory


class BadLayer(StorageError):
    """A layer blob that is not what an image layer must be."""

    def __init__(self, layer: object, why: str) -> None:
        super().__init__(f"layer {layer}: {why}")
        self.layer = layer
        self.why = why


class NotATar(BadLayer):
    """The (decompressed) blob does not start with a tar header."""


class CorruptLayer(BadLayer):
    """Compressed data that does not decompress, a tar cut short or a bad tar header."""


class LayerDigestMismatch(BadLayer):
    """The blob, read whole during the pass, does not hash to its digest."""


class LayerTooLarge(BadLayer):
    """A layer beyond the index's bounds (members, names, header sizes): memory stays bounded."""


class UnsafeCacheDir(UnsafeDirectory):
    """An index cache directory that someone else could write or that is reached by a link."""
