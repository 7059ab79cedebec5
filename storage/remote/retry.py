"""When a failed request to a registry is sent again, and how long to wait first.

One policy for the client's requests (client.py) and for the PATCHes of remote uploads
(uploads.py), which the client never sends twice: an upload asks the registry how far a
failed PATCH got, after the same pause, and sends only the rest.
"""

from __future__ import annotations

import email.utils
import random
from datetime import UTC, datetime

import httpx

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
"""Methods retried after a failure: sending them twice does no more than sending them once."""

NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
"""Failures after which nothing reached the server: safe to retry whatever the method."""

BACKOFF = 0.1
"""First pause between tries (seconds); it doubles after each failure."""

BACKOFF_CAP = 5.0
RETRY_AFTER_CAP = 10.0
"""A registry's `Retry-After` is honoured up to this many seconds."""


def backoff(failures: int) -> float:
    """The pause after the `failures`-th failure in a row: requests and upload PATCHes alike."""
    return min(BACKOFF_CAP, BACKOFF * 2.0 ** (failures - 1))


def pause(failures: int, resp: httpx.Response | None) -> float:
    """`backoff`, 0-10 % longer (so clients that failed together do not retry together), and
    at least the `Retry-After` of the answer that failed, if it has one."""
    delay = backoff(failures) * random.uniform(1.0, 1.1)
    if resp is not None and (after := retry_after(resp)) is not None:
        delay = max(delay, min(after, RETRY_AFTER_CAP))
    return delay


def retry_after(resp: httpx.Response) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), None if absent or garbage."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() holds, and float() refuses it
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
