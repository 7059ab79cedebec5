"""Listings of a remote source: what a walk asks the registry, and what stays true.

A listing of tags/ asks one `tags/list` and nothing more; the first lookup of a listed tag
resolves them all (one manifest GET per tag, in parallel), for `ls -l` looks them all up next.
A walk of a repository (tags/, manifests/, layers/, each entry stat'ed) so asks one
`tags/list` and one manifest GET per tag (a blob's size is its descriptor's: no HEAD, where
a client would send one per blob), and reuses the tags for
`tag_reuse` seconds; a change through the source is seen at once, one behind it after the
reuse. The registry is Debian's docker-registry, behind the fault-injecting proxy
that records every request (tests/support/fault_server.py).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from support.fault_server import Fault, FaultServer
from support.mounts import Mount, hang_up, wait_until
from support.oci import image_manifest, sha256_digest
from support.registry import RegistryClient, RegistryServer
from support.tools import sh

import storage.remote.client as remote_client
import storage.remote.ranges as remote_ranges
import storage.remote.registry as remote_registry
from storage.digests import Digest
from storage.errors import (
    RemoteUnavailable,
    StorageError,
    UnknownLayer,
    UnknownManifest,
    UnknownTag,
)
from storage.manifest_format import parse_manifest
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry

pytestmark = [pytest.mark.registry, pytest.mark.remote]

TAGS = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Remote:
    """What the mounted tests share: the registry's client (to push and to compare with),
    and `mount(*args)`, a fresh mount of the registry through the recording proxy."""

    client: RegistryClient
    mount: Callable[..., Mount]


@pytest.fixture
def remote(
    remote_mount: Callable[..., Mount], proxy: FaultServer, module_registry_server: RegistryServer
) -> Remote:
    return Remote(module_registry_server.client(), partial(remote_mount, via=proxy.url))


def push_repo(client: RegistryClient, name: str, tags: tuple[str, ...] = TAGS) -> set[str]:
    """One image per tag (its own config, one layer shared by all): the blobs' digests."""
    layer = b"a shared layer\n"
    blobs = {client.push_blob(name, layer)}
    for tag in tags:
        config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        blobs.add(client.push_blob(name, config))
        client.put_manifest(name, tag, image_manifest(config, [layer]))
    return blobs


def asked(proxy: FaultServer, name: str) -> Counter[str]:
    """The requests for repository `name`, by kind: `GET tags/list`, `GET manifests/<tag>`,
    `HEAD manifests`, `HEAD blobs`, ..."""
    kinds: Counter[str] = Counter()
    for seen in proxy.seen:
        path = seen.path.split("?")[0]
        if not path.startswith(f"/v2/{name}/"):
            continue
        what = path[len(f"/v2/{name}/") :]
        if what.startswith("manifests/") and not what.startswith("manifests/sha256:"):
            what = "manifests/<tag>"
        kinds[f"{seen.method} {re.sub(r'sha256:[0-9a-f]{64}', '<digest>', what)}"] += 1
    return kinds


async def walk(source: RemoteRegistry, name: str) -> tuple[list[str], list[Digest]]:
    """What listing tags/, manifests/ and layers/ with readdirplus asks of the source."""
    repo = source.repository(name)
    tags = await repo.tags.list()
    for tag in tags:
        await repo.manifests.stat(await repo.tags.get(tag))
    for digest in await repo.manifests.list():
        await repo.manifests.stat(digest)
    layers = await repo.layers.list()
    for digest in layers:
        await repo.layers.stat(digest)
    return tags, layers


async def test_a_walk_asks_each_thing_once(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """Before: three `tags/list` and three HEADs per tag (one per section), a GET per
    manifest and a HEAD per blob, one at a time; the blobs' sizes now come from the
    manifests' descriptors."""
    blobs = push_repo(module_registry_server.client(), "listing/once")
    proxied.tag_reuse = 60  # a loaded machine may take seconds between the steps
    proxy.seen.clear()
    tags, layers = await walk(proxied, "listing/once")
    assert tags == list(TAGS)
    assert {str(d) for d in layers} == blobs
    assert asked(proxy, "listing/once") == {"GET tags/list": 1, "GET manifests/<tag>": len(TAGS)}
    proxy.seen.clear()  # within the reuse, and the blobs' sizes are kept: nothing asked
    assert await walk(proxied, "listing/once") == (tags, layers)
    assert asked(proxy, "listing/once") == {}


async def test_a_blob_size_a_manifest_lies_about_is_caught_on_read(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A blob's size in layers/ is its descriptor's, a claim like a HEAD's Content-Length:
    one larger than a file can be is asked with a HEAD instead, and a wrong one is shown but
    fails the read (the bytes never match it), never served as the blob."""
    client = module_registry_server.client()
    config, layer = b'{"os": "linux"}', b"a layer whose size is lied about\n"
    client.push_blob("l/lies", config)
    client.push_blob("l/lies", layer)
    client.put_manifest("l/lies", "a", image_manifest(config, [layer]))
    lying = json.loads(image_manifest(config, [layer]))
    lying["config"]["size"] = 1 << 64
    lying["layers"][0]["size"] = len(layer) + 5
    body = json.dumps(lying).encode()
    proxy.inject(Fault(200, body=body, method="GET", path=r"/l/lies/manifests/a$"), times=1)
    repo = proxied.repository("l/lies")
    proxy.seen.clear()
    config_digest, layer_digest = (Digest.parse(sha256_digest(b)) for b in (config, layer))
    assert sorted(await repo.layers.list()) == sorted([config_digest, layer_digest])
    assert asked(proxy, "l/lies") == {
        "GET tags/list": 1,
        "GET manifests/<tag>": 1,
        "HEAD blobs/<digest>": 1,  # the config's: 2**64 bytes is no file's size
    }
    assert (await repo.layers.stat(config_digest)).size == len(config)
    assert (await repo.layers.stat(layer_digest)).size == len(layer) + 5
    reader = await repo.layers.fetch(layer_digest)
    with pytest.raises(StorageError):
        await reader.read_at(0, len(layer) + 5)


async def test_a_walk_of_the_same_tagged_manifests_parses_them_once(
    proxied: RemoteRegistry,
    module_registry_server: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """layers/ listed again (a walk listed ahead, then by the listing itself) parses none of
    the manifests again while the tags point where they did; a retag walks anew."""
    client = module_registry_server.client()
    blobs = push_repo(client, "listing/parsed")
    parsed: list[bytes] = []

    def counted(data: bytes, *args: Any) -> Any:
        parsed.append(data)
        return parse_manifest(data, *args)

    monkeypatch.setattr(remote_registry, "parse_manifest", counted)
    repo = proxied.repository("listing/parsed")
    assert {str(d) for d in await repo.layers.list()} == blobs
    assert len(parsed) == len(TAGS)
    assert {str(d) for d in await repo.layers.walk()} == blobs
    assert len(parsed) == len(TAGS)
    extra = client.push_blob("listing/parsed", b"one more layer\n")
    config = b'{"os": "linux"}'
    client.push_blob("listing/parsed", config)
    client.put_manifest("listing/parsed", "a", image_manifest(config, [b"one more layer\n"]))
    repo.tags.forget()  # as a change through the mount does
    assert extra in {str(d) for d in await repo.layers.walk()}
    assert len(parsed) == 2 * len(TAGS)


async def test_stats_of_a_listing_say_what_stat_says_and_ask_each_thing_once(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """`stats` (what a listing of layers/ or manifests/ asks before readdir): each blob's
    HEAD and each manifest's GET once, in parallel, nothing for what a listing already
    asked; what the registry does not know is None, for `stat` to report."""
    blobs = sorted(Digest.parse(b) for b in push_repo(module_registry_server.client(), "l/s"))
    repo = proxied.repository("l/s")
    manifests = [await repo.tags.ask(tag) for tag in TAGS]
    unknown = Digest.parse("sha256:" + "0" * 64)
    proxy.seen.clear()
    layer_stats = await repo.layers.stats([*blobs, unknown])
    manifest_stats = await repo.manifests.stats([*manifests, unknown])
    assert asked(proxy, "l/s") == {
        "HEAD blobs/<digest>": len(blobs) + 1,
        "GET manifests/<digest>": len(manifests) + 1,
    }
    proxy.seen.clear()
    assert layer_stats == [*[await repo.layers.stat(d) for d in blobs], None]
    assert manifest_stats == [*[await repo.manifests.stat(d) for d in manifests], None]
    assert await repo.layers.stats(blobs) == layer_stats[:-1]
    assert asked(proxy, "l/s") == {}  # all kept
    with pytest.raises(UnknownLayer):
        await repo.layers.stat(unknown)


async def test_a_listing_of_tags_resolves_nothing_until_a_lookup(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """`ls tags/` asks `tags/list` only; the first lookup of one of them fetches every tag's
    manifest at once (before: the listing did, a GET per tag for a plain `ls`)."""
    many = tuple(f"t{i:02d}" for i in range(12))
    client = module_registry_server.client()
    push_repo(client, "listing/lazy", many)
    digests = {tag: client.get_manifest("listing/lazy", tag).digest for tag in many}
    proxied.tag_reuse = 60  # a loaded machine may take seconds between the steps
    proxy.seen.clear()
    repo = proxied.repository("listing/lazy")
    assert await repo.tags.list() == list(many)
    assert asked(proxy, "listing/lazy") == {"GET tags/list": 1}
    assert str(await repo.tags.get("t05")) == digests["t05"]
    assert asked(proxy, "listing/lazy") == {"GET tags/list": 1, "GET manifests/<tag>": len(many)}
    assert {tag: str(await repo.tags.get(tag)) for tag in many} == digests
    assert asked(proxy, "listing/lazy") == {"GET tags/list": 1, "GET manifests/<tag>": len(many)}
    snapshot = proxied.tag_snapshots.get("listing/lazy")
    assert snapshot is not None
    snapshot.targets_until = 0  # the reuse over (at the default 1 s, a loaded test's steps)
    assert {tag: str(await repo.tags.get(tag)) for tag in many} == digests
    assert asked(proxy, "listing/lazy") == {
        "GET tags/list": 1,
        "GET manifests/<tag>": 2 * len(many),
    }
    proxy.seen.clear()  # not listed: a tag of another repository is asked on its own
    push_repo(client, "listing/unlisted")
    await proxied.repository("listing/unlisted").tags.get("a")
    assert asked(proxy, "listing/unlisted") == {"HEAD manifests/<tag>": 1}


async def test_a_listing_again_keeps_the_targets_resolved_since(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A walk lists manifests/ after layers/; when resolving the tags took longer than the
    names are reused, the listing again asks `tags/list`, not every tag's manifest again."""
    push_repo(module_registry_server.client(), "listing/again")
    repo = proxied.repository("listing/again")
    proxy.seen.clear()
    await repo.layers.list()
    resolved = {"GET tags/list": 1, "GET manifests/<tag>": len(TAGS)}
    assert asked(proxy, "listing/again") == resolved
    snapshot = proxied.tag_snapshots.get("listing/again")
    assert snapshot is not None
    snapshot.until = 0  # the names expired, the targets not
    proxy.seen.clear()
    assert len(await repo.manifests.list()) == len(TAGS)
    for tag in TAGS:
        await repo.tags.get(tag)
    assert asked(proxy, "listing/again") == {"GET tags/list": 1}
    proxied.forget()  # SIGHUP: nothing kept is carried into the next listing
    proxy.seen.clear()
    await repo.manifests.list()
    assert asked(proxy, "listing/again") == resolved


async def test_a_change_through_the_source_is_seen_at_once(
    proxied: RemoteRegistry, module_registry_server: RegistryServer
) -> None:
    push_repo(module_registry_server.client(), "listing/through")
    repo = proxied.repository("listing/through")
    await walk(proxied, "listing/through")
    b = await repo.tags.get("b")
    await repo.tags.put("a", b)
    assert await repo.tags.get("a") == b
    await repo.tags.put("new", b)
    assert await repo.tags.list() == [*TAGS, "new"]
    assert sorted(await repo.manifests.delete(b)) == ["a", "b", "new"]
    assert await repo.tags.list() == ["c", "d"]
    assert b not in await repo.manifests.list()


async def test_a_delete_whose_answer_was_lost_is_done_when_its_retry_is_404(
    proxied: RemoteRegistry, module_registry_server: RegistryServer, proxy: FaultServer
) -> None:
    # The registry deleted the manifest, but its answer never came back (a slow registry
    # under load: ReadTimeout): the retry of the idempotent DELETE is answered 404, which
    # is the first try's success, not an unknown manifest (was: rm said ENOENT, done).
    push_repo(module_registry_server.client(), "listing/lost-delete")
    repo = proxied.repository("listing/lost-delete")
    b = await repo.tags.get("b")
    await repo.tags.put("a", b)
    proxy.inject(Fault(lose_answer=True, method="DELETE", path=r"/manifests/sha256:"))
    proxy.seen.clear()
    assert sorted(await repo.manifests.delete(b)) == ["a", "b"]
    deletes = [s.status for s in proxy.seen if s.method == "DELETE"]
    assert deletes == [None, 404]
    assert await repo.tags.list() == ["c", "d"]
    # A DELETE of what is not there, with no try lost, is still unknown.
    with pytest.raises(UnknownManifest):
        await repo.manifests.delete(b)


async def test_a_change_behind_the_source_is_seen_after_the_reuse(
    proxied: RemoteRegistry, module_registry_server: RegistryServer
) -> None:
    client = module_registry_server.client()
    push_repo(client, "listing/behind")
    repo = proxied.repository("listing/behind")
    await walk(proxied, "listing/behind")
    before = await repo.tags.get("a")
    client.put_manifest("listing/behind", "a", client.get_manifest("listing/behind", "b").body)
    assert await repo.tags.get("a") == before  # the listing's, for up to tag_reuse
    assert proxied.tag_reuse == remote_registry.TAG_REUSE_MAX
    deadline = time.monotonic() + proxied.tag_reuse + 5
    while await repo.tags.get("a") == before:
        assert time.monotonic() < deadline, "the retag behind the source was never seen"
        await trio.sleep(0.05)
    assert "c" in await repo.tags.list()


async def test_no_reuse_without_a_listing_ttl(
    proxy: FaultServer, module_registry_server: RegistryServer, tmp_path: Path
) -> None:
    """--tag-ttl 0: every listing and lookup asks the registry, and tags/ fetches nothing
    ahead that nothing would keep."""
    push_repo(module_registry_server.client(), "listing/ttl0")
    source = RemoteRegistry(RemoteClient(proxy.url, timeout=5), tmp_path / "state", 0)
    try:
        assert source.tag_reuse == 0
        proxy.seen.clear()
        repo = source.repository("listing/ttl0")
        assert await repo.tags.list() == list(TAGS)
        assert asked(proxy, "listing/ttl0") == {"GET tags/list": 1}
        await repo.manifests.list()
        await repo.manifests.list()
        assert asked(proxy, "listing/ttl0")["GET tags/list"] == 3
    finally:
        await source.aclose()


async def test_tags_past_the_cap_are_asked_one_by_one(
    proxied: RemoteRegistry,
    proxy: FaultServer,
    module_registry_server: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Memory stays bounded: a lookup resolves at most TAGS_RESOLVED_MAX tags ahead; the
    others are still listed, and resolved when asked (a lookup of one never starts a
    resolution of the first ones again)."""
    monkeypatch.setattr(remote_registry, "TAGS_RESOLVED_MAX", 2)
    push_repo(module_registry_server.client(), "listing/cap")
    proxy.seen.clear()
    repo = proxied.repository("listing/cap")
    assert await repo.tags.list() == list(TAGS)
    await repo.tags.get("a")
    assert asked(proxy, "listing/cap") == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    assert len(await repo.manifests.list()) == len(TAGS)
    assert asked(proxy, "listing/cap")["HEAD manifests/<tag>"] == 2
    snapshot = proxied.tag_snapshots.get("listing/cap")
    assert snapshot is not None
    snapshot.targets_until = 0  # expired: "d" is still asked on its own
    await repo.tags.get("d")
    assert asked(proxy, "listing/cap") == {
        "GET tags/list": 1,
        "GET manifests/<tag>": 2,
        "HEAD manifests/<tag>": 3,
    }


async def test_a_page_size_refused_once_is_not_asked_again(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A registry that refuses pages of 1,000 (400 PAGINATION_NUMBER_INVALID, as its
    catalog does past `maxentries`): the page is asked again smaller (the refusal twice:
    `small`, then the `request` that reports it), and every listing after it asks that size
    at once."""
    client = module_registry_server.client()
    for name in ("listing/paged1", "listing/paged2"):
        push_repo(client, name)
    refused = b'{"errors":[{"code":"PAGINATION_NUMBER_INVALID","message":"too many"}]}'
    proxy.inject(Fault(400, body=refused, method="GET", path=r"/tags/list$"), times=2)
    proxy.seen.clear()
    for name in ("listing/paged1", "listing/paged2"):
        assert await proxied.repository(name).tags.list() == list(TAGS)
    assert [s.path for s in proxy.seen] == [
        "/v2/listing/paged1/tags/list?n=1000",
        "/v2/listing/paged1/tags/list?n=1000",
        "/v2/listing/paged1/tags/list?n=100",
        "/v2/listing/paged2/tags/list?n=100",
    ]


async def test_a_listing_past_its_first_page_asks_the_rest_at_once(
    proxied: RemoteRegistry,
    proxy: FaultServer,
    module_registry_server: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first page asks FIRST_PAGE names (docker-registry allocates `n` for each
    `_catalog`), the next one, its `last` kept, as many as the registry allows: this one
    refuses 100,000 (its catalog.maxentries is the default 1,000), so the page is asked
    again at 1,000, and the next listing asks that at once."""
    monkeypatch.setattr(remote_registry, "FIRST_PAGE", 2)
    client = module_registry_server.client()
    for name in ("listing/pages1", "listing/pages2", "listing/pages3"):
        push_repo(client, name)
    proxy.seen.clear()
    names = await proxied.catalog.repositories()
    assert {"listing/pages1", "listing/pages2", "listing/pages3"} <= set(names)
    last = f"last={quote(names[1], safe='')}"  # the first page's last name: the Link's
    assert [s.path for s in proxy.seen] == [
        "/v2/_catalog?n=2",
        f"/v2/_catalog?{last}&n=100000",
        f"/v2/_catalog?{last}&n=100000",
        f"/v2/_catalog?{last}&n=1000",
    ]
    proxied.catalog.forget()
    proxy.seen.clear()
    assert await proxied.catalog.repositories() == names
    assert [s.path for s in proxy.seen] == ["/v2/_catalog?n=2", f"/v2/_catalog?{last}&n=1000"]


async def test_a_failing_registry_stops_the_fetching_ahead(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """503s past the retries: the first lookup's resolution stops, the rest is not asked
    for ahead (a registry that is down is not hammered), and the lookup reports the error
    itself."""
    many = tuple(f"t{i:02d}" for i in range(30))
    push_repo(module_registry_server.client(), "listing/down", many)
    proxy.seen.clear()
    repo = proxied.repository("listing/down")
    assert await repo.tags.list() == list(many)
    proxy.inject(Fault(503, path=r"/manifests/t\d\d$"), times=100)
    with pytest.raises(RemoteUnavailable):
        await repo.tags.get("t29")
    fetched = {s.path for s in proxy.seen if s.method == "GET" and "/manifests/t" in s.path}
    # The batch asks the first path of each connection's share, and nothing more; the
    # lookups one by one that follow, LISTING_PARALLEL at once, stop at their first failure.
    connections = -(-len(many) // remote_ranges.PIPELINE_DEPTH)
    assert len(fetched) <= remote_registry.LISTING_PARALLEL + connections < len(many)
    proxy.clear()
    assert await repo.tags.get("t29") == Digest.parse(
        module_registry_server.client().get_manifest("listing/down", "t29").digest
    )


async def test_a_tag_gone_midway_stops_the_batch_and_the_rest_are_asked_once(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """The tags' manifests are asked by worker threads in one batch; a tag the registry no
    longer knows stops it, and each tag it left is asked once on its own: every other tag
    resolves with one GET, the gone one is unknown."""
    many = tuple(f"t{i:02d}" for i in range(24))
    client = module_registry_server.client()
    push_repo(client, "listing/gone", many)
    proxied.tag_reuse = 60  # a loaded machine may take seconds between the steps
    repo = proxied.repository("listing/gone")
    assert await repo.tags.list() == list(many)
    unknown = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
    proxy.inject(Fault(404, body=unknown, path=r"/listing/gone/manifests/t05$"), times=20)
    proxy.seen.clear()
    for tag in ("t00", "t23"):
        assert await repo.tags.get(tag) == Digest.parse(
            client.get_manifest("listing/gone", tag).digest
        )
    with pytest.raises(UnknownTag):
        await repo.tags.get("t05")
    gets = Counter(s.path for s in proxy.seen if s.method == "GET" and "/manifests/t" in s.path)
    assert {path for path, count in gets.items() if count != 1} == {
        "/v2/listing/gone/manifests/t05"
    }
    assert len(gets) == len(many)


async def test_an_answer_lost_midway_is_the_only_one_asked_again(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A connection that hangs up after the registry took the request (a reset under load)
    stops the batch; the answers already received are kept, and only the tags that got none
    are asked again: the lost one twice in all, every other tag once."""
    many = tuple(f"t{i:02d}" for i in range(24))
    client = module_registry_server.client()
    push_repo(client, "listing/lost", many)
    proxied.tag_reuse = 60  # a loaded machine may take seconds between the steps
    repo = proxied.repository("listing/lost")
    assert await repo.tags.list() == list(many)
    proxy.inject(Fault(lose_answer=True, method="GET", path=r"/listing/lost/manifests/t05$"))
    proxy.seen.clear()
    assert await repo.tags.get("t00") == Digest.parse(
        client.get_manifest("listing/lost", "t00").digest
    )
    gets = Counter(s.path for s in proxy.seen if s.method == "GET" and "/manifests/t" in s.path)
    assert gets == {f"/v2/listing/lost/manifests/{tag}": 1 + (tag == "t05") for tag in many}
    for tag in many:
        await repo.tags.get(tag)
    assert len(proxy.seen) == sum(gets.values())


async def test_a_batch_of_manifests_holds_a_bounded_number_of_bytes(
    proxied: RemoteRegistry,
    proxy: FaultServer,
    module_registry_server: RegistryServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch holds its answers until its last: past SMALL_MANY_BYTES it asks nothing more
    (a registry answering 100,000 tags with 4 MiB manifests must not grow the daemon), and
    the next batch asks what it left. Here one answer passes the budget: each batch stops
    after the answers in flight, and every tag still resolves with one GET."""
    monkeypatch.setattr(remote_client, "SMALL_MANY_BYTES", 1)
    many = tuple(f"t{i:02d}" for i in range(24))
    client = module_registry_server.client()
    push_repo(client, "listing/budget", many)
    repo = proxied.repository("listing/budget")
    assert await repo.tags.list() == list(many)
    paths = [f"/v2/listing/budget/manifests/{tag}" for tag in many]
    accept = {"Accept": remote_registry.ACCEPT}
    batch = await proxied.client.small_many("GET", paths, headers=accept, parallel=4)
    answered = [a for a in batch.answers if a is not None]
    assert 1 <= len(answered) <= 4 and not batch.failed
    proxy.seen.clear()
    assert await repo.tags.get("t23") == Digest.parse(
        client.get_manifest("listing/budget", "t23").digest
    )
    gets = Counter(s.path for s in proxy.seen if s.method == "GET" and "/manifests/t" in s.path)
    assert gets == {path: 1 for path in paths}


HOSTILE_TAGS = ["../../../v2/_catalog", "ok?n=1", "a/b", "a\nb", "t" * 129, "-x", "good"]


async def test_tag_names_from_the_registry_are_checked_before_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile `tags/list` (a path, a query, a newline): those names are not listed, said
    in one warning, and never put in a URL."""
    with FaultServer() as stub:
        body = json.dumps({"name": "evil/repo", "tags": HOSTILE_TAGS}).encode()
        stub.inject(Fault(200, body=body, method="GET", path=r"/tags/list$"))
        source = RemoteRegistry(RemoteClient(stub.url, timeout=5), tmp_path / "state", 30.0)
        try:
            repo = source.repository("evil/repo")
            assert await repo.tags.list() == ["good"]
            await repo.tags.get("good")  # resolves the listed tags
        finally:
            await source.aclose()
        fetched = [s.path for s in stub.seen if "/manifests/" in s.path]
        assert fetched == ["/v2/evil/repo/manifests/good"]
    assert "ignoring 6 invalid tag names" in caplog.text
    assert "a\\nb" in caplog.text and "a\nb" not in caplog.text  # no forged log line


def test_ls_of_a_hostile_tags_list_shows_the_valid_tags(remote: Remote, proxy: FaultServer) -> None:
    """A `tags/list` naming `a/b` beside real tags: `ls tags/` lists the real ones (a name
    with a `/` handed to the kernel fails the whole listing with EIO), and they read."""
    client = remote.client
    push_repo(client, "listing/hostile", ("good",))
    body = json.dumps({"name": "listing/hostile", "tags": HOSTILE_TAGS}).encode()
    proxy.inject(Fault(200, body=body, method="GET", path=r"/listing/hostile/tags/list$"), times=5)
    m = remote.mount()
    tags = m.path("listing", "hostile", "tags")
    assert sh("ls", tags).stdout.split() == ["good"]
    assert (tags / "good").read_bytes() == client.get_manifest("listing/hostile", "good").body
    assert "ignoring 6 invalid tag names" in m.log_text()


def test_find_and_ls_of_a_remote_mount(remote: Remote, proxy: FaultServer) -> None:
    """`find` and `ls -l` of a remote mount: every file found, with its size, for one
    `tags/list` and one GET per tag (no HEAD per blob: the manifests give their sizes)."""
    client = remote.client
    blobs = push_repo(client, "listing/mounted")
    m = remote.mount()
    proxy.seen.clear()
    where = m.path("listing", "mounted")
    found = sh("find", where, "-type", "f", "-printf", "%P %s\\n").stdout.splitlines()
    sizes = dict(line.rsplit(" ", 1) for line in found)
    assert sorted(k for k in sizes if k.startswith("tags/")) == [f"tags/{t}" for t in TAGS]
    assert {k.split("/")[1] for k in sizes if k.startswith("layers/")} == blobs
    for tag in TAGS:
        assert int(sizes[f"tags/{tag}"]) == len(client.get_manifest("listing/mounted", tag).body)
    for digest in blobs:
        assert int(sizes[f"layers/{digest}"]) == len(client.get_blob("listing/mounted", digest))
    assert asked(proxy, "listing/mounted") == {
        "GET tags/list": 1,
        "GET manifests/<tag>": len(TAGS),
    }
    listed = sh("ls", "-l", where / "layers").stdout.splitlines()
    assert len([line for line in listed if line.startswith("-")]) == len(blobs)


def test_ls_of_a_namespace_asks_the_catalog_once(remote: Remote, proxy: FaultServer) -> None:
    """`ls` of a namespace on a fresh remote mount is one `_catalog` (read as the mount
    starts, or by the lookup: one at a time either way) and nothing per repository it shows;
    again within the catalog's TTL, nothing: what is left of its time is the registry's
    answer and FUSE (issue 18)."""
    client = remote.client
    names = [f"r{i:02d}" for i in range(12)]
    for name in names:
        client.push_blob(f"spread/{name}", name.encode())
    proxy.seen.clear()
    m = remote.mount()
    assert sh("ls", m.path("spread")).stdout.split() == names
    asked_for = [(s.method, s.path, s.status) for s in proxy.seen if s.path != "/v2/"]
    assert asked_for == [("GET", "/v2/_catalog?n=1000", 200)]
    seen = len(proxy.seen)
    assert sh("ls", m.path("spread")).stdout.split() == names
    assert len(proxy.seen) == seen


def test_ls_of_tags_asks_tags_list_only(remote: Remote, proxy: FaultServer) -> None:
    """`ls tags/` of a remote mount is one `tags/list` (before: a GET per tag too); `ls -l`
    then resolves them all at its first lookup, 8 at once (a GET per tag, no HEAD: no tag
    looked up on its own), with every size right."""
    many = tuple(f"t{i:02d}" for i in range(20))
    client = remote.client
    push_repo(client, "listing/plain", many)
    m = remote.mount()
    tags = m.path("listing", "plain", "tags")
    proxy.seen.clear()
    assert sh("ls", tags).stdout.split() == list(many)
    assert asked(proxy, "listing/plain") == {"GET tags/list": 1}
    listed = [line.split() for line in sh("ls", "-l", tags).stdout.splitlines()[1:]]
    sizes = {fields[-1]: int(fields[4]) for fields in listed}
    assert sizes == {t: len(client.get_manifest("listing/plain", t).body) for t in many}
    kinds = asked(proxy, "listing/plain")
    assert kinds["GET manifests/<tag>"] == len(many)
    assert kinds["GET tags/list"] <= 2  # the tree's listing may have expired meanwhile
    assert set(kinds) == {"GET tags/list", "GET manifests/<tag>"}


def test_a_retag_behind_a_remote_mount_is_seen_within_the_ttl(remote: Remote) -> None:
    """`ls -l tags/` resolves the tags once; a tag moved behind the mount is then read within
    --tag-ttl plus the time the resolution is reused (TAG_REUSE_MAX, at most the TTL)."""
    client = remote.client
    push_repo(client, "listing/retag")
    ttl = 1.0
    m = remote.mount("--tag-ttl", str(ttl))
    tags = m.path("listing", "retag", "tags")
    sh("ls", "-l", tags)
    assert (tags / "a").read_bytes() == client.get_manifest("listing/retag", "a").body
    moved = client.get_manifest("listing/retag", "b").body
    client.put_manifest("listing/retag", "a", moved)
    moved_at = time.monotonic()
    wait_until(lambda: (tags / "a").read_bytes() == moved, 10, "the retag to show")
    assert time.monotonic() - moved_at < 2 * ttl + 2  # + a loaded machine's slack


def test_sighup_drops_what_a_remote_mount_keeps(remote: Remote, proxy: FaultServer) -> None:
    """`kill -HUP` drops every cache of a remote mount too: with a tag TTL of an hour, a
    retag and a repository pushed behind the mount are seen right after SIGHUP (the source's
    tag snapshot and catalog, not only the tree's caches)."""
    client = remote.client
    push_repo(client, "listing/hup")
    m = remote.mount("--tag-ttl", "3600")
    tags = m.path("listing", "hup", "tags")
    sh("ls", "-l", tags)
    assert "listing" in sh("ls", m.mountpoint).stdout.split()
    moved = client.get_manifest("listing/hup", "b").body
    client.put_manifest("listing/hup", "a", moved)
    push_repo(client, "hupped/late", ("x",))
    assert (tags / "a").read_bytes() != moved  # kept for the hour
    assert "hupped" not in sh("ls", m.mountpoint).stdout.split()
    hang_up(m)
    assert (tags / "a").read_bytes() == moved
    assert "hupped" in sh("ls", m.mountpoint).stdout.split()


async def test_a_walk_in_catalog_order_is_listed_ahead(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """Two repositories listed in the order of the catalog fetched: the next LISTINGS_AHEAD
    are listed in the background (tags, or layers/ with its manifests, as the walk lists
    them), and their own listings then ask nothing. Out of order, nothing is listed ahead."""
    client = module_registry_server.client()
    ahead = remote_registry.LISTINGS_AHEAD
    names = [f"zz/r{i:02d}" for i in range(ahead + 3)]  # last in the catalog, in order
    blobs = {name: push_repo(client, name, ("x", "y")) for name in names}
    proxied.tag_reuse = 60  # a loaded machine may take seconds between the steps
    await proxied.repository(names[0]).tags.list()
    await proxied.repository(names[1]).tags.list()
    assert proxied.listed_ahead() == set(), "listed ahead with no catalog fetched"
    # A walk goes through the catalog first (find and the shell's glob list zz/).
    assert await proxied.catalog.children("zz") == [n.split("/")[1] for n in names]
    proxy.seen.clear()
    await proxied.repository(names[0]).tags.list()
    await proxied.repository(names[-1]).tags.list()  # not the next one: no walk
    assert proxied.listed_ahead() == set()

    proxy.seen.clear()
    await proxied.repository(names[0]).layers.list()
    await proxied.repository(names[1]).layers.list()
    await listed_ahead(proxied)
    for name in names[2 : 2 + ahead]:
        assert asked(proxy, name) == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    assert asked(proxy, names[-1]) == {}  # one more than LISTINGS_AHEAD
    proxy.seen.clear()
    layers = await proxied.repository(names[2]).layers.list()
    assert {str(d) for d in layers} == blobs[names[2]]
    for digest in layers:
        await proxied.repository(names[2]).layers.stat(digest)
    assert asked(proxy, names[2]) == {}


async def test_a_slow_resolution_is_reused_as_long_as_it_took(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """`ls -l` of a big tags/ consumes the resolution for a while: it is reused for as long
    as it took to take (here ≥ 0.6 s of retries), not only the minimum, never past the TTL.
    A resolution right after the listing (a walk's) keeps the names as long: the next
    section's listing asks no `tags/list` again."""
    push_repo(module_registry_server.client(), "listing/slow")
    proxied.tag_reuse = 0.5
    repo = proxied.repository("listing/slow")
    await repo.tags.list()
    # Two 503s end the batch's and `small`'s http.client tries; three more are retried.
    proxy.inject(Fault(503, method="GET", path=r"/listing/slow/manifests/a$"), times=5)
    started = time.monotonic()
    await repo.tags.get("b")
    took = time.monotonic() - started
    assert took >= 0.6  # 0.1 + 0.2 + 0.4 s of backoff, jittered
    snapshot = proxied.tag_snapshots.get("listing/slow")
    assert snapshot is not None and snapshot.targets_until - time.monotonic() > took - 0.2
    assert snapshot.targets_until - started <= took + proxied.listing_ttl
    proxy.seen.clear()
    assert await repo.tags.list() == list(TAGS)
    assert await repo.manifests.list()
    assert asked(proxy, "listing/slow") == {}


async def test_tags_slower_to_resolve_than_the_ttl_are_then_asked_one_by_one(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A resolution that took longer than the listing TTL is reused no longer than the TTL:
    had each lookup after it resolved every tag again, `ls -l` beside `watch ls` (each
    listing a new snapshot without targets) asked for every tag per tag (300 tags, TTL 0.2
    s: 4 s alone, 200 s beside the loop). Such a repository's listed tags are then asked
    one at a time (a HEAD each); after SIGHUP a lookup resolves them all again."""
    push_repo(module_registry_server.client(), "listing/slowttl")
    proxied.listing_ttl = proxied.tag_reuse = 0.3
    repo = proxied.repository("listing/slowttl")
    await repo.tags.list()
    # Two 503s end the batch's and `small`'s http.client tries; three more are retried.
    proxy.inject(Fault(503, method="GET", path=r"/listing/slowttl/manifests/a$"), times=5)
    started = time.monotonic()
    await repo.tags.get("b")
    assert time.monotonic() - started >= 0.6  # 0.1 + 0.2 + 0.4 s of backoff: past the TTL
    await trio.sleep(0.35)  # the targets have expired
    proxy.seen.clear()
    for tag in ("c", "d"):
        assert await repo.tags.list() == list(TAGS)  # a listing before each, as `watch ls`
        await repo.tags.get(tag)
    seen = asked(proxy, "listing/slowttl")
    assert seen["HEAD manifests/<tag>"] == 2 and seen["GET manifests/<tag>"] == 0, seen
    proxied.forget()  # SIGHUP
    proxy.seen.clear()
    await repo.tags.list()
    await repo.tags.get("a")
    assert asked(proxy, "listing/slowttl") == {
        "GET tags/list": 1,
        "GET manifests/<tag>": len(TAGS),
    }


async def repositories_in_order(
    proxied: RemoteRegistry, proxy: FaultServer, server: RegistryServer, prefix: str, count: int
) -> list[str]:
    """`count` repositories of tags x and y under prefix, the catalog fetched (as a walk's
    first step), their tags reused for long (a loaded machine may take seconds between the
    steps), and the requests seen so far forgotten."""
    names = [f"{prefix}/r{i:02d}" for i in range(count)]  # in the catalog's order
    for name in names:
        push_repo(server.client(), name, ("x", "y"))
    proxied.tag_reuse = 60
    await proxied.catalog.children(prefix)
    proxy.seen.clear()
    return names


async def listed_ahead(proxied: RemoteRegistry) -> None:
    """Once nothing is being listed in the background."""
    deadline = time.monotonic() + 10
    while proxied.listed_ahead():
        assert time.monotonic() < deadline, "the listings ahead never finished"
        await trio.sleep(0.02)


async def test_manifests_listed_in_catalog_order_resolve_ahead(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """`ls -l */manifests` resolves the next repositories' tags ahead (their tags' targets
    are what it lists), as lookups of their tags do: each asked once, none by its own
    listing."""
    ahead = remote_registry.LISTINGS_AHEAD
    names = await repositories_in_order(proxied, proxy, module_registry_server, "zx", ahead + 3)
    for name in names[:2]:
        assert len(await proxied.repository(name).manifests.list()) == 2
    await listed_ahead(proxied)
    for name in names[2 : 2 + ahead]:
        assert asked(proxy, name) == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    assert asked(proxy, names[-1]) == {}
    for name in names[2:]:  # the window moves on: the last is resolved ahead too
        assert len(await proxied.repository(name).manifests.list()) == 2
        assert asked(proxy, name) == {"GET tags/list": 1, "GET manifests/<tag>": 2}


async def test_lookups_in_catalog_order_resolve_ahead(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """`ls */tags` lists the next repositories' tags ahead, and nothing more; `ls -l */tags`
    (a tag of each looked up in turn) resolves the next ones' tags ahead too, and goes on
    resolving ahead as it reaches those resolved ahead (before, only a repository it had to
    wait for moved the window: a third of a walk's repositories waited). What was listed
    ahead for the walk is not listed again (here, their caches dropped, it would be asked
    again), and each repository is asked once."""
    ahead = remote_registry.LISTINGS_AHEAD
    names = await repositories_in_order(proxied, proxy, module_registry_server, "zy", ahead + 4)
    for name in names[:2]:
        assert await proxied.repository(name).tags.list() == ["x", "y"]
    await listed_ahead(proxied)
    for name in names[2 : 2 + ahead]:
        assert asked(proxy, name) == {"GET tags/list": 1}
    for name in names[:2]:
        await proxied.repository(name).tags.get("x")
    await listed_ahead(proxied)
    for name in names[2 : 2 + ahead]:
        assert asked(proxy, name) == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    assert asked(proxy, names[2 + ahead]) == {}
    for name in names[3 : 2 + ahead]:
        proxied.tag_snapshots.pop(name)  # listed ahead already: not listed again
    await proxied.repository(names[2]).tags.get("x")
    await listed_ahead(proxied)
    assert asked(proxy, names[2]) == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    for name in names[3 : 2 + ahead]:
        assert asked(proxy, name) == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    assert asked(proxy, names[2 + ahead]) == {"GET tags/list": 1, "GET manifests/<tag>": 2}
    assert asked(proxy, names[-1]) == {}  # one past the window
