"""What a registry sends is not trusted: caps on what is kept of it, and how it is shown.

A hostile or broken registry must not be able to grow the daemon's memory without bound
or forge log lines: every body is read against a cap (client.py), listings stop at a total,
caches are bounded in bytes, and server text goes into logs and messages through `shown`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import httpx

from .. import jsontext
from ..manifest_format import MAX_MANIFEST_SIZE

K = TypeVar("K")
V = TypeVar("V")

MANIFEST_MAX = MAX_MANIFEST_SIZE  # the registry's own limit for what it accepts
ERROR_BODY_MAX = 64 << 10  # an error body is read this far for its message, no further
BODY_MAX = 1 << 20  # any other API answer (upload status, /v2/, tokens)
PAGE_MAX = 8 << 20  # one page of `_catalog` or `tags/list` (100 000 names fit in ~4 MiB)
LISTING_NAMES_MAX = 1_000_000  # names in one listing, all pages together
LISTING_BYTES_MAX = 64 << 20  # bytes of one listing, all pages together
LISTING_PAGES_MAX = 10_000  # pages of one listing (1 000 000 names at registry 2.8's 100)
MANIFESTS_WALKED_MAX = 10_000  # manifests read to list one repository's layers/
RANGE_SKIP_MAX = 16 << 20  # bytes skipped of a blob whose registry ignores `Range`
MANIFEST_CACHE_BYTES = 64 << 20
BLOB_CACHE_BYTES = 32 << 20
TAG_SNAPSHOT_BYTES = 32 << 20  # repositories' tags and targets, as their listings found them
LAYER_WALK_BYTES = 16 << 20  # repositories' blobs, as their manifests name them
SLOW_RESOLUTIONS_BYTES = 1 << 20  # repositories whose tags are looked up one by one
TAGS_RESOLVED_MAX = 100_000  # tags of one listing whose manifests are fetched ahead
SMALL_MANY_BYTES = 16 << 20  # answers one batch of manifest GETs or HEADs holds at once
SIZE_MAX = (1 << 63) - 1  # a blob's size as stat shows it (st_size is a signed 64-bit number)
SHOWN_MAX = 200


def shown(text: object, limit: int = SHOWN_MAX) -> str:
    """Server text fit for one log line or message: newlines and other control characters
    escaped (a newline in a registry's error message must not forge a log line), and
    at most `limit` characters of it."""
    raw = str(text)
    escaped = repr(raw[:limit])[1:-1]
    return escaped + "…" if len(raw) > limit else escaped


def error_detail(resp: httpx.Response) -> str:
    """A short summary of an error body for messages: `CODE: message` pairs of a
    distribution error, `error: error_description` of an OAuth2 one (RFC 6749, 5.2), else
    the start of a plain-text body (e.g. Go's "Client sent an HTTP request to an HTTPS
    server.")."""
    try:
        body = jsontext.loads(resp.content)
        if isinstance(body.get("error"), str):
            said = (body["error"], body.get("error_description"))
            return shown(": ".join(str(part) for part in said if part), 300)
        errors = body.get("errors")
        parts = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
        return shown("; ".join(parts), 300)
    except httpx.ResponseNotRead:
        return ""
    except (ValueError, AttributeError, TypeError):
        pass
    if not resp.headers.get("Content-Type", "text/plain").startswith("text/"):
        return ""
    return shown(" ".join(resp.text.split()))


class ByteCache(Generic[K, V]):
    """A least-recently-used cache bounded by the bytes its values hold (`size_of`), not by
    their count: 256 manifests of a registry's choosing could otherwise be 1 GiB."""

    def __init__(self, max_bytes: int, size_of: Callable[[K, V], int]) -> None:
        self.max_bytes = max_bytes
        self.size_of = size_of
        self.used = 0
        self._entries: OrderedDict[K, tuple[int, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self.pop(key)
        size = self.size_of(key, value)
        if size > self.max_bytes:
            return
        self._entries[key] = (size, value)
        self.used += size
        while self.used > self.max_bytes:
            _, (dropped, _) = self._entries.popitem(last=False)
            self.used -= dropped

    def pop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.used -= entry[0]

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)
