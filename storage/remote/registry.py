"""A remote registry with storage/'s interface: catalog, tags, manifests, layers, uploads.

What the HTTP API cannot say is approximated and said so: mtimes are the mount's start,
layers/ lists the blobs of tagged manifests, manifests/ the tagged manifests, and uploads/
the uploads this machine started (their records are local, see uploads.py).
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import contextvars
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import trio

from .. import jsontext
from ..api import BlobInfo, BlobReader, Manifest, UploadInfo
from ..digests import Digest, digest_bytes
from ..errors import (
    CorruptEntry,
    InvalidManifest,
    InvalidName,
    NotEmpty,
    RemoteError,
    RemoteUnavailable,
    StorageError,
    UnknownLayer,
    UnknownManifest,
    UnknownRepository,
    UnknownTag,
    UnknownUpload,
)
from ..manifest_format import SUPPORTED, parse_manifest, sniff_media_type
from ..names import is_component, valid_tags, validate_name, validate_tag
from ..nurseries import open_nursery
from .client import RemoteClient, RemoteNotFound, RemoteTooLarge, Small
from .reader import ReadAheadBudget, RemoteLayerReader
from .untrusted import (
    BLOB_CACHE_BYTES,
    BODY_MAX,
    LAYER_WALK_BYTES,
    LISTING_BYTES_MAX,
    LISTING_NAMES_MAX,
    LISTING_PAGES_MAX,
    MANIFEST_CACHE_BYTES,
    MANIFEST_MAX,
    MANIFESTS_WALKED_MAX,
    PAGE_MAX,
    SIZE_MAX,
    SLOW_RESOLUTIONS_BYTES,
    TAG_SNAPSHOT_BYTES,
    TAGS_RESOLVED_MAX,
    ByteCache,
    shown,
)
from .uploads import RemoteUpload, UploadRecords

log = logging.getLogger(__name__)

ACCEPT = ", ".join(SUPPORTED)
# Page sizes asked for, largest first: a registry refuses an `n` above its limit
# (catalog.maxentries: 400 PAGINATION_NUMBER_INVALID), and every page of `_catalog` walks its
# storage again up to `last`: 10 000 repositories took 11 pages and 3 s at n=1000, 0.2 s at once.
PAGE_SIZES = (100_000, 1000, 100)
# The first page of a listing asks for this many names at most, the pages after it for the
# largest size the registry accepts: docker-registry 2.8 allocates `n` names for each
# `_catalog` (n=100,000 cost 3-4 ms more than n=1,000 for 300 repositories, a quarter of
# the request), and 1,000 is its default catalog.maxentries, so a registry left at its
# default answers the first page at once instead of refusing it. A listing longer than
# that costs one request more.
FIRST_PAGE = 1000
ENTRY_OVERHEAD = 400  # bytes a cache entry costs beyond its name and data (objects, digest)
# Requests at once while a repository's tags are resolved (the first lookup of a listed tag)
# and a listing of layers/ stats its blobs: `ls -l` and readdirplus ask for every entry's
# attributes, one at a time, so they are fetched beforehand, in parallel.
LISTING_PARALLEL = 8
# How long, at least, a repository's tags as one listing found them, and their targets as
# one resolution found them, answer the listings and lookups that follow (a walk lists
# tags/, manifests/ and layers/ in turn); as long as fetching them took if that is longer,
# never longer than the listing TTL.
TAG_REUSE_MAX = 1.0
# Repositories listed ahead, in the background, once listings go through the catalog in
# order (a walk: find, du, `ls -l */tags`), as read-ahead follows a sequential read. 8, not
# 4 (stop 27): over 1,000 repositories `ls */tags` 1,377 / 1,382 -> 1,298 / 1,265 ms (two
# runs), `find` 3,430 -> 3,210, `ls -l */tags` 2,660 -> 2,562 (fresh mounts, chrt,
# interleaved, load ~2); 16 took `ls */tags` only to 1,242. Their requests take the
# client's RANGE_THREADS (8) as the foreground's do: one may wait for one of theirs to end.
LISTINGS_AHEAD = 8
# How long a repository whose tags took longer to resolve than their targets are reused
# (the listing TTL) has its listed tags looked up one at a time: resolving them all again
# at each lookup would never end while listings keep coming (`ls -l` beside `watch ls`).
SLOW_RESOLUTION_KEPT = 60.0
T = TypeVar("T")
Listed = Literal["tags", "targets", "layers"]  # what a listing of a repository asks for
# Set in a task listing ahead: what it calls is no listing of its own (it would wait for
# itself, or list further ahead).
_LISTING_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "listing_ahead", default=False
)


def _next_page(page: Small) -> str | None:
    """The `Link: <url>; rel="next"` of a paginated answer (parsed by httpx)."""
    if "link" not in page.headers:
        return None
    if not page.headers["link"].isascii():  # httpx would fail to encode it
        raise RemoteError(
            f"a next page's Link is not ASCII: {shown(page.headers['link'])}", status=200
        )
    link = httpx.Response(page.status_code, headers={"link": page.headers["link"]}).links
    return link["next"]["url"] if "next" in link else None


async def _paginated(client: RemoteClient, path: str, key: str) -> list[str]:
    """Every item of a paginated listing: a first page of FIRST_PAGE names at most, then
    pages as large as the registry allows. A page refused for its size (400
    PAGINATION_NUMBER_INVALID, as a catalog past its `maxentries`) is asked again smaller,
    and no listing of that kind asks the refused size again (its `small` asks it twice:
    that answer is no plain 200)."""
    listing = _Listing(path, key)
    size = client.page_sizes.get(key, PAGE_SIZES[0])
    url: str | None = f"{path}?n={min(size, FIRST_PAGE)}"
    while url is not None:
        listing.ask(url)
        try:
            response = await client.small("GET", url, limit=PAGE_MAX)
        except RemoteError as exc:
            asked = int(httpx.URL(url).params["n"])
            smaller = [s for s in PAGE_SIZES if s < asked]
            if "PAGINATION_NUMBER_INVALID" not in exc.codes or not smaller:
                raise
            log.debug("%s: pages of %d refused; asking for smaller ones", path, asked)
            size = client.page_sizes[key] = smaller[0]
            url = _sized(url, size)
            continue
        listing.add(response)
        if (url := _next_page(response)) is not None:
            url = _sized(url, size)
    return listing.names


def _sized(url: str, size: int) -> str:
    """url (a page of a listing; a `Link` the registry gave) asking for `size` names."""
    try:
        return str(httpx.URL(url).copy_set_param("n", str(size)))
    except httpx.InvalidURL:
        raise RemoteError(f"a next page's Link is no URL: {shown(url)}", status=200) from None


@dataclass
class _Listing:
    """One paginated listing as it arrives, held to its caps: a registry whose `Link: next`
    never ends (or loops) must not grow the daemon's memory, or keep it asking, for ever."""

    path: str
    key: str
    names: list[str] = field(default_factory=list)
    size: int = 0  # bytes of the pages read
    asked: set[str] = field(default_factory=set)

    def ask(self, url: str) -> None:
        """Count the page at `url` before it is asked for."""
        if url in self.asked:
            raise RemoteError(f"{self.path}: the registry's next page loops back", status=200)
        if len(self.asked) >= LISTING_PAGES_MAX:
            self.too_large(f"{LISTING_PAGES_MAX} pages")
        self.asked.add(url)

    def add(self, response: Small) -> None:
        """The names of one page; RemoteError for a page that is not a listing."""
        try:
            page = jsontext.loads(response.content)
            names = page.get(self.key) or []
        except (ValueError, AttributeError):
            names = None
        if not isinstance(names, list) or not set(map(type, names)) <= {str}:
            raise RemoteError(
                f"{self.path}: the registry's answer is not a listing of {self.key}: "
                f"{shown(response.content.decode(errors='replace'), 80)}",
                status=response.status_code,
            )
        self.names.extend(names)
        self.size += len(response.content)
        if len(self.names) > LISTING_NAMES_MAX:
            self.too_large(f"{LISTING_NAMES_MAX} names")
        if self.size > LISTING_BYTES_MAX:
            self.too_large(f"{LISTING_BYTES_MAX} bytes")

    def too_large(self, cap: str) -> None:
        raise RemoteTooLarge(
            f"{self.path}: the listing goes on past {cap} ({len(self.names)} names in "
            f"{len(self.asked)} pages so far); not read further",
            status=200,
        )


async def _batched(
    client: RemoteClient,
    method: str,
    paths: list[str],
    keep: Callable[[int, Small], None],
    *,
    headers: dict[str, str] | None = None,
    limit: int = BODY_MAX,
) -> None:
    """keep(index, answer) for each path the registry answers plainly, asked in batches
    (`RemoteClient.small_many`, LISTING_PARALLEL at once) whose answers are handed over
    before the next: a batch stopped by its byte budget is followed by one of the paths it
    left, one that failed by none (what is left is for the caller to ask one by one)."""
    pending = list(range(len(paths)))
    while pending:
        batch = await client.small_many(
            method,
            [paths[i] for i in pending],
            headers=headers,
            limit=limit,
            parallel=LISTING_PARALLEL,
        )
        left = []
        for index, answer in zip(pending, batch.answers, strict=True):
            if answer is None:
                left.append(index)
            else:
                keep(index, answer)
        if batch.failed or len(left) == len(pending):
            return
        pending = left


async def _in_parallel(
    items: Sequence[T], fetch: Callable[[T], Awaitable[object]], what: str
) -> None:
    """fetch(item) for every item, LISTING_PARALLEL at once, for what it leaves in a cache.

    Only to save round trips: an item the registry does not know is left for its own call to
    report, and any other failure (the registry gone, an answer refused) stops the rest.
    Mostly there are none left (a batch answered them all): then no worker is started."""
    if not items:
        return
    pending = iter(items)
    failed: list[BaseException] = []

    async def worker(scope: trio.CancelScope) -> None:
        for item in pending:
            try:
                await fetch(item)
            except (RemoteUnavailable, OSError) as exc:  # AccessDenied is a PermissionError
                failed.append(exc)
                scope.cancel()
                return
            except StorageError:
                continue

    async with open_nursery() as nursery:
        for _ in range(LISTING_PARALLEL):
            nursery.start_soon(worker, nursery.cancel_scope)
    if failed:
        log.debug("%s: fetching ahead stopped: %s", what, failed[0])


@dataclass
class _TagSnapshot:
    """One repository's tags as one `tags/list` found them, and, once a tag of them is looked
    up, the manifests they point at (the first TAGS_RESOLVED_MAX: memory stays bounded, the
    rest are asked one by one). A plain `ls tags/` asks nothing more than the listing."""

    tags: list[str]  # sorted
    listed: float  # time.monotonic() when `tags/list` was asked
    until: float  # when the names are no longer reused
    hint_until: float  # until then, a lookup of one of them resolves them all (read-ahead)
    targets: dict[str, Digest] = field(default_factory=dict)
    targets_until: float = 0.0  # when the targets are no longer reused
    batch: trio.Event | None = None  # the resolution under way, or the last one finished
    # What the names cost, counted once: the cache counts a snapshot at every change.
    names_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.names_size = sum(map(len, self.tags)) + 60 * len(self.tags)

    def size(self) -> int:
        return self.names_size + len(self.targets) * 200

    def resolves(self, tag: str) -> bool:
        """Whether tag is one of those a resolution fetches."""
        at = bisect.bisect_left(self.tags, tag, 0, min(len(self.tags), TAGS_RESOLVED_MAX))
        return at < len(self.tags) and self.tags[at] == tag


@dataclass(frozen=True)
class _LayerWalk:
    """What a walk of a repository's layers/ found: the blobs its tagged manifests name, with
    their descriptors' sizes."""

    manifests: tuple[Digest, ...]  # the tagged manifests, as manifests.tagged() gave them
    sizes: dict[Digest, int]

    def size(self) -> int:
        return (len(self.manifests) + len(self.sizes)) * 200


class RemoteCatalog:
    """Names from `_catalog`, cached for ttl; registries without one are browsed by name."""

    def __init__(self, client: RemoteClient, registry: RemoteRegistry, ttl: float) -> None:
        self.client = client
        self.registry = registry
        self.ttl = ttl
        self._fetched = 0.0
        self.available = True
        # The registry's names, and them with those known here, sorted once per change:
        # a lookup in a million names must not sort a million names.
        self._names: frozenset[str] | None = None
        self._local: frozenset[str] = frozenset()
        self._sorted: list[str] = []
        # One `_catalog` at a time: a lookup that comes while the mount's read-ahead (or
        # another lookup) fetches it waits for that answer instead of asking again.
        self._fetching = trio.Lock()

    def forget(self) -> None:
        """The next listing fetches `_catalog` again."""
        self._names = None

    def _stale(self) -> bool:
        return self._names is None or time.monotonic() - self._fetched > self.ttl

    async def read_ahead(self) -> None:
        """Fetch the names now, for the first lookup: any lookup below the mount's root asks
        whether a name is a repository or leads to one, which reads the catalog."""
        try:
            await self._all()
        except (StorageError, OSError) as exc:  # the lookup that needs it asks, and says
            log.debug("catalog: reading ahead failed: %s", shown(exc))

    async def _all(self) -> list[str] | None:
        """Every name, sorted (the same list until something changes); None without a
        catalog."""
        if self.available and self._stale():
            async with self._fetching:
                if self.available and self._stale():  # not fetched by the one waited for
                    await self._fetch()
        if not self.available:
            return None
        local = frozenset(
            {*self.registry.created, *self.registry.pushed(), *self.registry.records.repositories()}
        )
        if local != self._local:
            self._sorted = sorted((self._names or frozenset()) | local)
            self._local = local
        return self._sorted

    async def _fetch(self) -> None:
        try:
            names = await _paginated(self.client, "/v2/_catalog", "repositories")
        except (RemoteNotFound, PermissionError) as exc:
            log.warning(
                "catalog: %s has no usable _catalog (%s); browse by name",
                self.client.base_url,
                exc,
            )
            self.available = False
            return
        self._names, self._local = frozenset(names), frozenset()
        self._sorted = sorted(self._names)
        self._fetched = time.monotonic()

    def _counted(self, name: str) -> bool:
        """A repository as the registry counts them (its catalog needs a `_layers`: a blob
        linked, so not one holding only uploads), or made here by mkdir. A blob pushed here
        counts before the catalog's next refresh shows it."""
        return (
            name in (self._names or ())
            or name in self.registry.created
            or name in self.registry.pushed()
        )

    def known(self) -> list[str]:
        """The names as last fetched, sorted, without asking (empty before the first fetch
        and without a catalog): what a walk goes through."""
        return self._sorted

    async def repositories(self, n: int | None = None, last: str = "") -> list[str]:
        names = await self._all() or []
        start = bisect.bisect_right(names, last)
        return list(itertools.islice(filter(self._counted, names[start:]), n))

    async def children(self, prefix: str = "") -> list[str]:
        head = f"{prefix}/" if prefix else ""
        names = await self._all() or []
        found: set[str] = set()
        for name in names[bisect.bisect_left(names, head) :]:
            if not name.startswith(head):
                break
            if rest := name[len(head) :]:
                found.add(rest.split("/", 1)[0])
        return sorted(n for n in found if is_component(n))

    async def is_repository(self, name: str, with_uploads: bool = False) -> bool:
        names = await self._all()
        if self._counted(name):
            return True
        if with_uploads and self.registry.records.of(name):
            return True
        if names is None:
            return await self.registry.repository(name).exists()
        return False

    async def exists(self, prefix: str) -> bool:
        names = await self._all()
        if names is None:
            return True  # without a catalog every valid name may lead to a repository
        head = f"{prefix}/"
        at = bisect.bisect_left(names, prefix)
        if at < len(names) and names[at] == prefix:
            return True
        at = bisect.bisect_left(names, head)
        return at < len(names) and names[at].startswith(head)

    async def mtime_ns(self, prefix: str) -> int | None:
        return None


class RemoteTags:
    def __init__(self, repo: RemoteRepository) -> None:
        self.repo = repo
        self.client = repo.client
        self.name = repo.name
        self.registry = repo.registry

    async def _names(self) -> list[str]:
        """The registry's tags that are valid tags: any other name could not be looked up,
        and one holding a `/` would fail the whole listing in the kernel (EIO)."""
        try:
            names = await _paginated(self.client, f"/v2/{self.name}/tags/list", "tags")
        except RemoteNotFound:
            return []
        valid = valid_tags(names)
        if len(valid) != len(names):
            invalid = sorted(set(names) - set(valid))
            log.warning(
                "%s: tags/list: ignoring %d invalid tag names: %s",
                self.name,
                len(invalid),
                shown(", ".join(invalid), 300),
            )
        return sorted(valid)

    def _kept(self) -> _TagSnapshot | None:
        """The last listing's snapshot while it may still guide a resolution."""
        snapshot = self.registry.tag_snapshots.get(self.name)
        if snapshot is not None and time.monotonic() > snapshot.hint_until:
            self.registry.tag_snapshots.pop(self.name)
            return None
        return snapshot

    def _recent(self) -> _TagSnapshot | None:
        """The last listing's snapshot while its names are reused."""
        snapshot = self._kept()
        return snapshot if snapshot is not None and time.monotonic() <= snapshot.until else None

    async def snapshot(self) -> _TagSnapshot:
        """The tags, from one `tags/list` (paged). Reused for as long as it took to take, at
        least `tag_reuse` seconds and at most the listing TTL; a change through this mount
        drops it. Kept for the listing TTL beyond that (the tree hands the listing out that
        long), as what a lookup of one of its tags resolves ahead."""
        if (recent := self._recent()) is not None:
            return recent
        started = time.monotonic()
        tags = await self._names()
        now = time.monotonic()
        ttl = self.registry.listing_ttl
        snapshot = _TagSnapshot(tags, started, now + self._reuse(now - started), now + ttl)
        if (kept := self._kept()) is not None and now <= kept.targets_until:
            # Resolved since the names before, still reused: a walk's manifests/ after a
            # long resolution for its layers/ must not resolve them all again.
            snapshot.targets, snapshot.targets_until = kept.targets, kept.targets_until
            snapshot.batch = kept.batch
        if self.registry.tag_reuse > 0:
            self.registry.tag_snapshots.put(self.name, snapshot)
        return snapshot

    def _reuse(self, took: float) -> float:
        """How long what took `took` seconds to fetch is reused: readdir of 10,000 tags, or
        `ls -l` of them, consumes it for a while, and an entry left out costs a round trip."""
        return min(self.registry.listing_ttl, max(self.registry.tag_reuse, took))

    async def resolved(self, snapshot: _TagSnapshot) -> dict[str, Digest]:
        """The snapshot's targets, resolved now unless they still are: each tag's manifest
        fetched by tag (its digest is the body's, and it is cached for the stat that
        follows), LISTING_PARALLEL at once, one resolution at a time."""
        while time.monotonic() > snapshot.targets_until:
            running = snapshot.batch
            if running is None or running.is_set():
                return await self._resolve(snapshot)
            await running.wait()
            if snapshot.batch is running:  # it finished (one cancelled is cleared)
                return snapshot.targets
        return snapshot.targets

    async def _resolve(self, snapshot: _TagSnapshot) -> dict[str, Digest]:
        snapshot.batch = batch = trio.Event()
        started = time.monotonic()
        targets: dict[str, Digest] = {}
        manifests = self.repo.manifests

        async def resolve(tag: str) -> None:
            targets[tag] = (await manifests.fetch(tag)).digest

        try:
            tags = snapshot.tags[:TAGS_RESOLVED_MAX]
            for tag in tags:
                validate_tag(tag)  # a name from the registry goes into a URL
            targets.update(await manifests.fetch_many(tags))
            left = [tag for tag in tags if tag not in targets]
            await _in_parallel(left, resolve, f"{self.name}: tags")
        except BaseException:
            snapshot.batch = None  # cancelled: whoever waits resolves them itself
            raise
        finally:
            batch.set()
        now = time.monotonic()
        snapshot.targets, snapshot.targets_until = targets, now + self._reuse(now - started)
        if now - started >= self.registry.listing_ttl:
            self.registry.slow_resolutions.put(self.name, now + SLOW_RESOLUTION_KEPT)
        else:
            self.registry.slow_resolutions.pop(self.name)
        if started <= snapshot.until:  # right after the listing (a walk): taken as one
            snapshot.until = max(snapshot.until, now + self._reuse(now - snapshot.listed))
        if self.registry.tag_snapshots.get(self.name) is snapshot:  # count what it holds now
            self.registry.tag_snapshots.put(self.name, snapshot)
        return targets

    def _resolves_slowly(self) -> bool:
        """Whether the last resolution of these tags took longer than its targets are
        reused, within SLOW_RESOLUTION_KEPT: a lookup then asks its own tag, else each
        would resolve them all again, and each listing meanwhile starts a snapshot that
        holds no targets."""
        until = self.registry.slow_resolutions.get(self.name)
        return until is not None and time.monotonic() < until

    def forget(self) -> None:
        """The tags changed through this mount: the next listing asks the registry."""
        self.registry.tag_snapshots.pop(self.name)

    async def list(self) -> list[str]:
        if self.registry.tag_reuse <= 0:  # nothing would keep what is fetched
            return await self._names()
        await self.registry.listing(self.name, "tags")
        return (await self.snapshot()).tags

    async def get(self, tag: str) -> Digest:
        """A listed tag looked up resolves the listing's tags, all at once (read-ahead: `ls
        -l` looks them all up next); any other is asked on its own."""
        validate_tag(tag)
        if (kept := self._kept()) is not None and kept.resolves(tag):
            if time.monotonic() > kept.targets_until and self._resolves_slowly():
                return await self.ask(tag)
            # Told even when these were resolved ahead: a walk's window moves on with each
            # repository it reaches, not only with those it had to wait for.
            await self.registry.listing(self.name, "targets")
            kept = self._kept() or kept
            if (target := (await self.resolved(kept)).get(tag)) is not None:
                return target
        return await self.ask(tag)

    async def ask(self, tag: str) -> Digest:
        """The tag's target, from the registry now (a HEAD), whatever a listing resolved."""
        validate_tag(tag)
        try:
            response = await self.client.request(
                "HEAD", f"/v2/{self.name}/manifests/{tag}", headers={"Accept": ACCEPT}
            )
        except RemoteNotFound:
            raise UnknownTag(f"unknown tag {self.name}:{tag}") from None
        header = response.headers.get("Docker-Content-Digest")
        if header is None:  # a registry that omits it: hash the body
            return (await self.repo.manifests.fetch(tag)).digest
        return Digest.parse(header)

    async def mtime_ns(self, tag: str) -> int:
        return self.repo.registry.started_ns

    async def read_many(
        self, tags: Sequence[str]
    ) -> builtins.list[tuple[Digest, int] | None] | None:
        """None: a request per tag. A lookup of a listed tag resolves the listing (`get`)."""
        return None

    async def put(self, tag: str, digest: Digest) -> None:
        validate_tag(tag)
        manifest = await self.repo.manifests.get(digest)
        self.forget()
        await self.client.request(
            "PUT",
            f"/v2/{self.name}/manifests/{tag}",
            content=manifest.data,
            headers={"Content-Type": manifest.media_type},
            expect=(201,),
        )

    async def delete(self, tag: str) -> None:
        validate_tag(tag)
        self.forget()
        response = await self.client.request(
            "DELETE", f"/v2/{self.name}/manifests/{tag}", expect=(202, 400, 404, 405)
        )
        if response.status_code == 404:
            raise UnknownTag(f"unknown tag {self.name}:{tag}")
        if response.status_code != 202:
            raise PermissionError(
                f"{self.client.base_url} does not delete tags ({response.status_code})"
            )

    async def move(self, tag: str, to: str) -> Digest:
        """`tag` goes first: a registry that deletes no tag alone (2.8) refuses that before
        anything changed, where a put first would leave both names, the new one for good.
        A put that fails next puts `tag` back."""
        digest = await self.get(tag)
        await self.delete(tag)
        try:
            await self.put(to, digest)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.put(tag, digest)
            raise
        return digest


class RemoteManifests:
    def __init__(self, repo: RemoteRepository) -> None:
        self.repo = repo
        self.client = repo.client
        self.name = repo.name

    def _path(self, reference: str) -> str:
        return f"/v2/{self.name}/manifests/{reference}"

    async def fetch(self, reference: str) -> Manifest:
        try:
            response = await self.client.small(
                "GET", self._path(reference), headers={"Accept": ACCEPT}, limit=MANIFEST_MAX
            )
        except RemoteNotFound:
            raise UnknownManifest(f"unknown manifest {self.name}@{reference}") from None
        return self._kept(reference, response)

    async def fetch_many(self, references: builtins.list[str]) -> dict[str, Digest]:
        """The digests of those references the registry answers plainly (`_batched`), each
        manifest checked and cached as `fetch` does; the others are left for `fetch` to ask
        and report."""
        found: dict[str, Digest] = {}

        def keep(index: int, answer: Small) -> None:
            with contextlib.suppress(CorruptEntry):
                found[references[index]] = self._kept(references[index], answer).digest

        paths = [self._path(reference) for reference in references]
        headers = {"Accept": ACCEPT}
        await _batched(self.client, "GET", paths, keep, headers=headers, limit=MANIFEST_MAX)
        return found

    def _kept(self, reference: str, response: Small) -> Manifest:
        """The manifest a GET of reference answered, checked against a digest reference,
        and cached."""
        data = response.content
        digest = digest_bytes(data)
        if reference.startswith("sha256:") and str(digest) != reference:
            raise CorruptEntry(f"{self.name}@{reference}", f"the registry sent {digest}")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        manifest = Manifest(digest, media_type or sniff_media_type(data), data)
        self.repo.registry.manifest_cache.put((self.name, digest), manifest)
        return manifest

    async def get(self, digest: Digest) -> Manifest:
        cached = self.repo.registry.manifest_cache.get((self.name, digest))
        return cached if cached is not None else await self.fetch(str(digest))

    async def stat(self, digest: Digest) -> BlobInfo:
        manifest = await self.get(digest)
        return BlobInfo(digest, len(manifest.data), self.repo.registry.started_ns)

    async def stats(self, digests: Sequence[Digest]) -> builtins.list[BlobInfo | None]:
        """Those not cached yet fetched in parallel (`fetch_many`; a listing fetched most),
        the rest left to `stat`."""
        cache = self.repo.registry.manifest_cache
        missing = [str(d) for d in dict.fromkeys(digests) if cache.get((self.name, d)) is None]
        await self.fetch_many(missing)
        started = self.repo.registry.started_ns
        kept = [cache.get((self.name, digest)) for digest in digests]
        return [
            None if manifest is None else BlobInfo(digest, len(manifest.data), started)
            for digest, manifest in zip(digests, kept, strict=True)
        ]

    async def exists(self, digest: Digest) -> bool:
        try:
            await self.get(digest)
        except UnknownManifest:
            return False
        return True

    async def _targets(self) -> dict[str, Digest]:
        """Every tag and the manifest it points at: the snapshot's, and a HEAD for each tag
        it left unresolved (past TAGS_RESOLVED_MAX, or its fetch failed)."""
        snapshot = await self.repo.tags.snapshot()
        targets = dict(await self.repo.tags.resolved(snapshot))
        for tag in snapshot.tags:
            if tag in targets:
                continue
            try:
                targets[tag] = await self.repo.tags.ask(tag)
            except (UnknownTag, InvalidName):  # untagged since the listing; not a tag
                continue
        return targets

    async def list(self) -> list[Digest]:
        """The manifests that tags point at (the API cannot list untagged ones): the tags'
        targets, so a walk through manifests/ resolves the next repositories' tags ahead."""
        if self.repo.registry.tag_reuse > 0:
            await self.repo.registry.listing(self.name, "targets")
        return await self.tagged()

    async def tagged(self) -> builtins.list[Digest]:
        """list() without telling the registry a listing was asked for (layers/ is one)."""
        return sorted(set((await self._targets()).values()))

    async def put(self, data: bytes, content_type: str | None = None) -> Digest:
        parsed = parse_manifest(data, content_type)  # the same checks, with clear messages
        digest = digest_bytes(data)
        response = await self.client.request(
            "PUT",
            f"/v2/{self.name}/manifests/{digest}",
            content=data,
            headers={"Content-Type": parsed.media_type},
            expect=(201, 400),
        )
        if response.status_code == 400:
            raise InvalidManifest(f"the registry refused the manifest: {_errors(response)}")
        manifest = Manifest(digest, parsed.media_type, data)
        self.repo.registry.manifest_cache.put((self.name, digest), manifest)
        return digest

    async def delete(self, digest: Digest) -> builtins.list[str]:
        """The registry untags the manifest's tags as it deletes it; which they were is
        asked first (the API answers nothing about them), for the mount to forget."""
        self.repo.tags.forget()  # which tags point at it now, and after: the registry's word
        tags = sorted(tag for tag, target in (await self._targets()).items() if target == digest)
        response = await self.client.request(
            "DELETE", f"/v2/{self.name}/manifests/{digest}", expect=(202, 404, 405)
        )
        if response.status_code == 404:
            raise UnknownManifest(f"unknown manifest {self.name}@{digest}")
        if response.status_code == 405:
            raise PermissionError(f"{self.client.base_url} does not delete manifests")
        self.repo.registry.manifest_cache.pop((self.name, digest))
        self.repo.tags.forget()
        return tags


class RemoteLayers:
    def __init__(self, repo: RemoteRepository) -> None:
        self.repo = repo
        self.client = repo.client
        self.name = repo.name
        self.registry = repo.registry

    def _url(self, digest: Digest) -> str:
        return f"/v2/{self.name}/blobs/{digest}"

    async def stat(self, digest: Digest) -> BlobInfo:
        cached = self.registry.blob_cache.get((self.name, digest))
        if cached is not None:
            return cached
        try:
            response = await self.client.small("HEAD", self._url(digest))
        except RemoteNotFound:
            raise UnknownLayer(f"blob unknown to {self.name}: {digest}") from None
        if (other := _other_blob(digest, response.headers)) is not None:
            raise RemoteError(
                f"registry {self.client.name}: HEAD {self._url(digest)} answered for "
                f"another blob ({shown(other, 80)})",
                status=response.status_code,
            )
        length = response.headers.get("content-length", "0")
        if (size := _size(length)) is None:
            raise RemoteError(
                f"registry {self.client.name}: HEAD {self._url(digest)}: Content-Length "
                f"{shown(length, 40)} is not a size",
                status=response.status_code,
            )
        return self._keep(digest, size)

    def _keep(self, digest: Digest, size: int) -> BlobInfo:
        info = BlobInfo(digest, size, self.registry.started_ns)
        self.registry.blob_cache.put((self.name, digest), info)
        return info

    async def exists(self, digest: Digest) -> bool:
        try:
            await self.stat(digest)
        except UnknownLayer:
            return False
        return True

    async def stats(self, digests: Sequence[Digest]) -> builtins.list[BlobInfo | None]:
        """Those not cached yet asked in parallel (`_stat_many`; a listing asked most), the
        rest left to `stat`."""
        await self._stat_many(self._unstated(builtins.list(digests)))
        return [self.registry.blob_cache.get((self.name, digest)) for digest in digests]

    async def list(self) -> list[Digest]:
        """Config and layers of the tagged manifests (and of the manifests they index), and
        the blobs finished through this mount. Manifests not cached yet are fetched a level
        at a time, in parallel; a blob's size is its descriptor's (readdirplus stats every
        entry), and a HEAD asks it only of a blob no descriptor sizes."""
        if self.registry.tag_reuse > 0:
            await self.registry.listing(self.name, "layers")
        return await self.walk()

    async def walk(self) -> builtins.list[Digest]:
        """list() without telling the registry a listing was asked for (listing ahead).
        The blobs of the same tagged manifests as the last walk's are that walk's (they are
        content-addressed): a walk listed ahead is not parsed again by the listing."""
        found: set[Digest] = set(self._finished())
        tagged = tuple(await self.repo.manifests.tagged())
        kept = self.registry.layer_walks.get(self.name)
        if kept is None or kept.manifests != tagged:
            kept = await self._walk(tagged)
        found.update(kept.sizes)
        listed = sorted(found)
        for digest in self._unstated(listed):
            if (size := kept.sizes.get(digest)) is not None and size <= SIZE_MAX:
                self._keep(digest, size)
        await self._stat_many(self._unstated(listed))
        await _in_parallel(self._unstated(listed), self.stat, f"{self.name}: blobs")
        return listed

    async def _walk(self, tagged: tuple[Digest, ...]) -> _LayerWalk:
        """The blobs the manifests name (and those their indexes name), with the sizes their
        descriptors say (the first's); kept unless a manifest could not be had."""
        sizes: dict[Digest, int] = {}
        manifests = self.repo.manifests
        pending = builtins.list(tagged)
        seen: set[Digest] = set()
        whole = True
        while pending:
            await manifests.fetch_many([str(d) for d in self._uncached(pending)])
            await _in_parallel(self._uncached(pending), manifests.get, f"{self.name}: manifests")
            children: list[Digest] = []
            for digest in pending:
                if digest in seen:
                    continue
                if len(seen) >= MANIFESTS_WALKED_MAX:
                    raise RemoteTooLarge(
                        f"{self.name}: layers/ would walk over {MANIFESTS_WALKED_MAX} "
                        "manifests (indexes of indexes); not walked further",
                        status=200,
                    )
                seen.add(digest)
                try:
                    parsed = parse_manifest((await manifests.get(digest)).data)
                except UnknownManifest:
                    whole = False
                    continue
                except (InvalidManifest, CorruptEntry):
                    continue
                for blob in parsed.blobs:
                    if not blob.urls:
                        sizes.setdefault(blob.digest, blob.size)
                children.extend(d.digest for d in parsed.children)
            pending = children
        walked = _LayerWalk(tagged, sizes)
        if whole:
            self.registry.layer_walks.put(self.name, walked)
        return walked

    async def _stat_many(self, digests: builtins.list[Digest]) -> None:
        """The sizes of those blobs the registry answers plainly (`small_many`), cached as
        `stat` does; the others are left for `stat` to ask and report."""

        def keep(index: int, answer: Small) -> None:
            if _other_blob(digests[index], answer.headers) is not None:
                return  # `stat` asks it alone and reports it
            if (size := _size(answer.headers.get("content-length", ""))) is not None:
                self._keep(digests[index], size)

        await _batched(self.client, "HEAD", [self._url(d) for d in digests], keep)

    def _uncached(self, digests: builtins.list[Digest]) -> builtins.list[Digest]:
        cache = self.registry.manifest_cache
        return [d for d in dict.fromkeys(digests) if cache.get((self.name, d)) is None]

    def _unstated(self, digests: builtins.list[Digest]) -> builtins.list[Digest]:
        """The blobs to size ahead: those not in the cache, as many as it holds (the first,
        in the order a listing shows them), so none pushes out another before it is used."""
        cache = self.registry.blob_cache
        room = cache.max_bytes // (len(self.name) + ENTRY_OVERHEAD)
        return [d for d in digests[:room] if cache.get((self.name, d)) is None]

    async def fetch(self, digest: Digest, size: int | None = None) -> RemoteLayerReader:
        """With a descriptor's `size` no HEAD: a rootfs read on a fresh mount waited for
        one in turn before its range GET (docs/performance.md, "stop 27, i")."""
        info = self.registry.blob_cache.get((self.name, digest))
        if info is None and size is not None and 0 <= size <= SIZE_MAX:
            info = BlobInfo(digest, size, self.registry.started_ns)
        if info is None:
            info = await self.stat(digest)
        return RemoteLayerReader(self.client, self._url(digest), info, self.registry.read_ahead)

    async def unlink(self, digest: Digest) -> None:
        response = await self.client.request("DELETE", self._url(digest), expect=(202, 404, 405))
        if response.status_code == 405:
            raise PermissionError(f"{self.client.base_url} does not delete blobs")
        # Gone at the registry either way: forget it, or list() would show it still.
        self._finished().pop(digest, None)
        self.registry.blob_cache.pop((self.name, digest))
        if response.status_code == 404:
            raise UnknownLayer(f"blob unknown to {self.name}: {digest}")

    async def relink(self, digest: Digest) -> bool:
        """Never: no API links a blob into a repository without its bytes but a mount from
        another repository, and the blob's DELETE took this one's link."""
        return False

    # -- uploads ---------------------------------------------------------------------------

    def _finished(self) -> dict[Digest, BlobInfo]:
        return self.registry.finished.setdefault(self.name, {})

    async def upload(self, label: str | None = None) -> RemoteUpload:
        upload = await RemoteUpload.start(self.client, self.registry.records, self.name, label)
        upload.finished = self._finished()
        return upload

    async def resume(self, uuid: str) -> RemoteUpload:
        upload = await RemoteUpload.resume(self.client, self.registry.records, uuid)
        upload.finished = self._finished()
        return upload

    async def uploads(self) -> builtins.list[str]:
        return [r.uuid for r in self.registry.records.of(self.name)]

    async def label(self, uuid: str) -> str | None:
        """None for an upload that is gone, as locally: a listing of uploads/ that meets one
        finished or cancelled meanwhile (by another mount) shows the rest."""
        try:
            return self.registry.records.load(uuid).label
        except UnknownUpload:
            return None

    async def set_label(self, uuid: str, label: str) -> None:
        record = self.registry.records.load(uuid)
        record.label = label
        self.registry.records.save(record)

    async def upload_info(self, uuid: str) -> UploadInfo:
        record = self.registry.records.load(uuid)
        return UploadInfo(uuid, datetime.fromisoformat(record.started_at), record.offset)

    async def read_upload(self, uuid: str) -> BlobReader:
        info = await self.upload_info(uuid)
        return _UnreadableUpload(
            f"{self.registry.client.name}: {self.name}: upload {uuid}", info.size
        )


class _UnreadableUpload:
    """An upload's bytes, sent to a registry over HTTP: the protocol cannot read an upload
    back, so a read of any of them is an error (EIO, logged), not the end of the file:
    `cat`, `cp` and `sha256sum` went on with nothing, and exited 0."""

    def __init__(self, what: str, size: int) -> None:
        self.what = what
        self.size = size

    async def read_at(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset >= self.size:
            return b""
        raise RemoteError(
            f"{self.what}: its {self.size} bytes are at the registry, which cannot read an "
            "upload back",
            status=0,
        )

    async def aclose(self) -> None:
        pass


class RemoteRepository:
    def __init__(self, registry: RemoteRegistry, name: str) -> None:
        self.registry = registry
        self.client = registry.client
        self.name = validate_name(name)
        self.tags = RemoteTags(self)
        self.manifests = RemoteManifests(self)
        self.layers = RemoteLayers(self)

    async def exists(self) -> bool:
        """Whether the registry knows the repository (tags/list answers)."""
        try:
            await self.client.request("GET", f"/v2/{self.name}/tags/list?n=1")
        except (RemoteNotFound, PermissionError):
            return False
        return True


class RemoteRegistry:
    def __init__(self, client: RemoteClient, state_dir: Path, listing_ttl: float = 5.0) -> None:
        self.client = client
        self.started_ns = time.time_ns()
        host = urlsplit(str(client.base_url)).netloc.replace(":", "_")
        self.records = UploadRecords(state_dir / "uploads" / host, base=state_dir.parent)
        # Blobs pushed through here (the repositories mkdir made: `created`).
        self.finished: dict[str, dict[Digest, BlobInfo]] = {}
        # Digest-addressed, so never stale; bounded in bytes so memory is too.
        self.manifest_cache: ByteCache[tuple[str, Digest], Manifest] = ByteCache(
            MANIFEST_CACHE_BYTES, lambda key, m: len(key[0]) + len(m.data) + ENTRY_OVERHEAD
        )
        self.blob_cache: ByteCache[tuple[str, Digest], BlobInfo] = ByteCache(
            BLOB_CACHE_BYTES, lambda key, _: len(key[0]) + ENTRY_OVERHEAD
        )
        # A repository's tags as its last listing found them, and their targets once a
        # lookup resolved them, each for `tag_reuse` seconds or as long as fetching them
        # took, up to the listing TTL (_TagSnapshot.until, .targets_until).
        self.listing_ttl = listing_ttl
        self.tag_reuse = min(listing_ttl, TAG_REUSE_MAX)
        self.tag_snapshots: ByteCache[str, _TagSnapshot] = ByteCache(
            TAG_SNAPSHOT_BYTES, lambda name, snapshot: len(name) + snapshot.size()
        )
        self.layer_walks: ByteCache[str, _LayerWalk] = ByteCache(
            LAYER_WALK_BYTES, lambda name, walked: len(name) + walked.size()
        )
        # Until when each repository's listed tags are looked up one at a time (`get`).
        self.slow_resolutions: ByteCache[str, float] = ByteCache(
            SLOW_RESOLUTIONS_BYTES, lambda name, _: len(name) + ENTRY_OVERHEAD
        )
        self._last_listed: dict[Listed, str] = {}  # the repository of each kind's last listing
        self._ahead_last: dict[Listed, str] = {}  # the last repository of each kind listed ahead
        # Repositories being listed in the background, and what of them.
        self._ahead: dict[tuple[str, Listed], trio.Event] = {}
        self.read_ahead = ReadAheadBudget()
        self.catalog = RemoteCatalog(client, self, listing_ttl)

    def repository(self, name: str) -> RemoteRepository:
        return RemoteRepository(self, name)

    async def listing(self, name: str, kind: Listed) -> None:
        """A listing of repository `name` is asked for: its tags, its tags' targets (a tag
        looked up, or manifests/ listed), or its layers/. When the one of that kind before
        was of the repository before it in the catalog as last fetched (never fetched for
        this), a walk is going through the catalog in order: the next LISTINGS_AHEAD
        repositories are listed the same way in the background, so their requests overlap
        this one's FUSE work. Returns when `name` itself is not being listed in the
        background (its caches are then filled)."""
        if _LISTING_AHEAD.get():
            return
        for event in [e for (n, _), e in self._ahead.items() if n == name]:
            await event.wait()
        names = self.catalog.known()
        at = bisect.bisect_left(names, name)
        previous, self._last_listed[kind] = self._last_listed.get(kind), name
        if at == len(names) or names[at] != name or at == 0 or names[at - 1] != previous:
            return
        window = names[at + 1 : at + 1 + LISTINGS_AHEAD]
        # Those up to the last listed ahead were listed for an earlier step of this walk:
        # listed again, each would only find its caches filled (or, were they expired by
        # now, ask the registry twice for one walk).
        last = self._ahead_last.get(kind, "")
        start = bisect.bisect_right(window, last) if window and name < last <= window[-1] else 0
        for ahead in window[start:]:
            if (ahead, kind) not in self._ahead:
                if self._kinds_ahead(kind) >= LISTINGS_AHEAD:
                    return
                before = [e for (n, _), e in self._ahead.items() if n == ahead]
                self._ahead[(ahead, kind)] = trio.Event()
                trio.lowlevel.spawn_system_task(self._list_ahead, ahead, kind, before)
            self._ahead_last[kind] = ahead

    def _kinds_ahead(self, kind: Listed) -> int:
        return sum(1 for _, k in self._ahead if k == kind)

    def listed_ahead(self) -> set[str]:
        """The repositories being listed in the background now."""
        return {name for name, _ in self._ahead}

    async def _list_ahead(self, name: str, kind: Listed, before: list[trio.Event]) -> None:
        """One repository listed ahead, once what was started before for it has ended (or
        both would ask its tags/list): only a head start, so a failure is left for the
        listing itself to meet. A system task must not raise."""
        _LISTING_AHEAD.set(True)
        try:
            for event in before:
                await event.wait()
            tags = self.repository(name).tags
            if kind == "tags":
                await tags.snapshot()
            elif kind == "targets":
                await tags.resolved(await tags.snapshot())
            else:
                await self.repository(name).layers.walk()
        except Exception as exc:
            log.debug("%s: listing ahead failed: %s", name, shown(exc))
        finally:
            self._ahead.pop((name, kind)).set()

    @property
    def created(self) -> frozenset[str]:
        """The repositories mkdir made (they exist at the registry once pushed to), kept
        beside the upload records: they last across remounts until rmdir, as on a root."""
        return self.records.made()

    async def create_repository(self, name: str) -> RemoteRepository:
        repo = self.repository(name)
        if name not in self.created:
            await self.records.change_made(add=name)
        return repo

    async def remove_repository(self, name: str) -> None:
        """rmdir: only a repository made by mkdir here (`created`) that holds nothing yet (no
        tag at the registry, no upload or blob of ours); the registry API cannot remove one."""
        at_registry = await self.repository(name).exists()
        if name not in self.created and not at_registry:
            raise UnknownRepository(name)
        if at_registry or self.records.of(name) or name in self.pushed():
            raise NotEmpty(f"repository {name} cannot be removed through the registry's API")
        await self.records.change_made(drop=name)

    def pushed(self) -> set[str]:
        """The repositories a blob was pushed to through this client."""
        return {name for name, blobs in self.finished.items() if blobs}

    def statvfs(self) -> os.statvfs_result | None:
        return None

    def forget(self) -> None:
        self.catalog.forget()
        self.tag_snapshots.clear()
        self.layer_walks.clear()
        self.slow_resolutions.clear()
        self.blob_cache.clear()  # a blob deleted beside the mount; manifests never change
        self._ahead_last.clear()  # what was listed ahead is gone with them

    async def aclose(self) -> None:
        """Close the connections and the records' directory (at unmount)."""
        self.records.close()
        await self.client.aclose()


def _other_blob(digest: Digest, headers: Mapping[str, str]) -> str | None:
    """The digest a blob's answer names (Docker-Content-Digest) if it is not the one asked:
    an answer meant for another request (a proxy out of step) or a lying registry, whose
    size is not this blob's. None where it agrees, or where the registry names none."""
    named = headers.get("docker-content-digest")
    return named if named is not None and named != str(digest) else None


def _size(length: str) -> int | None:
    """A blob's size from a Content-Length, or None if it is none a file can have."""
    if not (length.isascii() and length.isdigit()):  # "²".isdigit(), and int() refuses it
        return None
    return int(length) if int(length) <= SIZE_MAX else None


def _errors(response: httpx.Response) -> str:
    try:
        said = "; ".join(
            f"{e.get('code')}: {e.get('message')}"
            for e in jsontext.loads(response.content).get("errors", [])
        )
    except (ValueError, AttributeError, TypeError):
        said = response.text
    return shown(said, 300)
