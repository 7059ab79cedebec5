"""Walks of a whole registry: `find` and `du` through a mount against the same tools over the
storage root, and the listings of a remote mount against the HTTP requests a client makes.

Both run on a root of their own, `entries / 10` repositories (1,000 by default) of 10 tags
and 5 layers each (every tag its own manifest, the layers and the config shared within a
repository, none across): 26 files per repository in the mount, 10 tags, 10 manifests and 6
blobs in layers/. A walk of the bench's other root would count whatever the other scenarios
left there.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from storage.digests import Digest, digest_bytes
from storage.manifest_format import OCI_MANIFEST
from storage.paths import BlobData, LayerLink, RevisionLink, TagCurrentLink, TagIndexLink

from .config import Config
from .measure import BenchError, Row, median, run, sides, timed
from .registry import RegistryProcess
from .root import Root
from .scenarios import Env, Scenario

TAGS, LAYERS = 10, 5
LAYER_SIZE = 2048
NAMESPACE = "walk"
REMOTE_REPS = 3  # a remote walk is tens of thousands of requests a side
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Image:
    """One tag of a walk repository and what a client learns of it."""

    repo: str
    tag: str
    manifest: Digest
    size: int  # of the manifest


@dataclass(frozen=True)
class WalkRoot:
    """The walk's storage root and what it holds."""

    store: Root
    repos: list[str]
    images: list[Image]
    blobs: dict[str, list[tuple[Digest, int]]]  # per repository: config and layers

    @property
    def files(self) -> int:
        """Regular files a walk of the mount finds: tags, manifests and blobs."""
        return len(self.images) * 2 + sum(map(len, self.blobs.values()))

    @property
    def file_bytes(self) -> int:
        manifests = sum(i.size for i in self.images)
        return 2 * manifests + sum(s for blobs in self.blobs.values() for _, s in blobs)


def _write(store: Root, location: object, data: bytes) -> None:
    path = store.path(location)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _blob(store: Root, repo: str, data: bytes) -> tuple[Digest, int]:
    digest = digest_bytes(data)
    _write(store, BlobData(digest), data)
    _write(store, LayerLink(repo, digest), str(digest).encode())
    return digest, len(data)


def build(store: Root, repositories: int) -> WalkRoot:
    """Write the registry's layout directly (an upload per blob would time the set-up)."""
    repos = [f"{NAMESPACE}/r{i:04d}" for i in range(repositories)]
    images: list[Image] = []
    blobs: dict[str, list[tuple[Digest, int]]] = {}
    for repo in repos:
        config = json.dumps({"architecture": "amd64", "os": "linux", "repo": repo}).encode()
        found = [_blob(store, repo, config)]
        for n in range(LAYERS):
            head = f"{repo} layer {n}\n".encode()
            found.append(_blob(store, repo, head + b"\0" * (LAYER_SIZE - len(head))))
        blobs[repo] = found

        def descriptor(media_type: str, blob: tuple[Digest, int]) -> dict[str, object]:
            return {"mediaType": media_type, "digest": str(blob[0]), "size": blob[1]}

        for t in range(TAGS):
            tag = f"t{t:02d}"
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": descriptor(CONFIG_TYPE, found[0]),
                    "layers": [descriptor(LAYER_TYPE, b) for b in found[1:]],
                    "annotations": {"tag": tag},
                }
            ).encode()
            digest = digest_bytes(manifest)
            _write(store, BlobData(digest), manifest)
            link = str(digest).encode()
            _write(store, RevisionLink(repo, digest), link)
            _write(store, TagIndexLink(repo, tag, digest), link)
            _write(store, TagCurrentLink(repo, tag), link)
            images.append(Image(repo, tag, digest, len(manifest)))
    os.sync()
    return WalkRoot(store, repos, images, blobs)


@cache
def walk_root(workdir: Path, repositories: int) -> WalkRoot:
    """Built once per run, beside the bench's own root, for both scenarios."""
    base = workdir / "walk"
    return build(Root(base / "root", base / "scratch"), repositories)


def _root_for(env: Env) -> WalkRoot:
    """`entries / 10` repositories; 4 in a quick run (a smoke test of the code paths)."""
    repositories = 4 if env.config.quick else max(1, env.config.entries // 10)
    return walk_root(env.store.root.parent, repositories)


def _ms(fn: Callable[[], bytes]) -> tuple[float, bytes]:
    t, out = timed(fn)
    return t * 1000, out


def _shell(script: str, path: Path) -> Callable[[], bytes]:
    return lambda: run(["sh", "-c", script, "sh", str(path)], stdout=subprocess.PIPE)


FIND = 'find "$1" -type f | wc -l'
DU = 'du -sb "$1"'


def _check_find(out: bytes, want: int | None, where: str) -> int:
    found = int(out.split()[0])
    if want is not None and found != want:
        raise BenchError(f"find {where}: {found} files, not {want}")
    return found


def walk(env: Env) -> list[Row]:
    """`find MNT -type f | wc -l` and `du -sb MNT` on a fresh mount of the walk root, caches
    dropped (both sides start from disk), against the same command over the root itself."""
    root = _root_for(env)
    times: dict[str, list[float]] = {k: [] for k in ("find", "find_peer", "du", "du_peer")}
    native: dict[str, int] = {}
    for rep in range(env.config.reps):
        for key, script in (("find", FIND), ("du", DU)):
            for side in sides(rep):
                env.drop_cold()
                if side == "peer":
                    ms, out = _ms(_shell(script, root.store.root))
                    native[key] = int(out.split()[0])
                    times[f"{key}_peer"].append(ms)
                    continue
                with env.mount(str(root.store.root)) as m:
                    ms, out = _ms(_shell(script, m.mountpoint))
                if key == "find":
                    _check_find(out, root.files, "of the mount")
                elif int(out.split()[0]) < root.file_bytes:
                    raise BenchError(f"du -sb of the mount: {out!r} < {root.file_bytes} bytes")
                times[key].append(ms)
    what = f"{len(root.repos)} repositories x {TAGS} tags x {LAYERS} layers"
    return [
        _row("walk", f"find -type f | wc -l, {what}", times, "find",
             f"find of the storage root ({native['find']} files)", 3.0),
        _row("walk", f"du -sb, {what}", times, "du", "du -sb of the storage root", 3.0),
    ]  # fmt: skip


def _row(
    measure: str,
    metric: str,
    times: dict[str, list[float]],
    key: str,
    peer_name: str,
    at_most: float | None,
    at_least: float | None = None,
) -> Row:
    """A time row: ratio = peer / regfs; target at most `at_most` x the peer's time, or at
    least `at_least` x as fast."""
    mine, theirs = median(times[key]), median(times[f"{key}_peer"])
    ratio = theirs / mine
    if at_most is not None:
        target, passed = f"at most {at_most:g}x peer's time", mine <= at_most * theirs
    elif at_least is not None:
        target, passed = f"≥ {at_least:g}x peer", ratio >= at_least
    else:
        target, passed = "", None
    samples = {"regfs": times[key], "peer": times[f"{key}_peer"]}
    return Row(measure, metric, "ms", mine, peer_name, theirs, ratio, target, passed, samples)


# --------------------------------------------------------------------------- remote


class Curl:
    """One `curl` process per round of requests, asking them in turn over one kept-alive
    connection (`curl -K`): the requests a plain client makes, at curl's speed."""

    def __init__(self, base: str, scratch: Path) -> None:
        self.base = base
        self.scratch = scratch

    def _round(self, paths: list[str], outputs: list[str], *options: str) -> bytes:
        with tempfile.NamedTemporaryFile("w", dir=self.scratch, suffix=".curl") as config:
            for path, output in zip(paths, outputs, strict=True):
                config.write(f'url = "{self.base}{path}"\noutput = "{output}"\n')
            config.flush()
            return run(["curl", "-sS", "-f", *options, "-K", config.name], stdout=subprocess.PIPE)

    def get(self, paths: list[str], *options: str) -> list[bytes]:
        """The bodies of GETs of paths, in order (a failed one fails the round)."""
        with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
            self._round(paths, [f"{tmp}/{i}" for i in range(len(paths))], *options)
            return [Path(tmp, str(i)).read_bytes() for i in range(len(paths))]

    def head(self, paths: list[str], *options: str) -> list[int]:
        """Content-Length of HEADs of paths, in order."""
        lengths = "%header{content-length}\n"
        out = self._round(paths, ["/dev/null"] * len(paths), "-I", "-w", lengths, *options)
        sizes = [int(line) for line in out.decode().split()]
        if len(sizes) != len(paths):
            raise BenchError(f"curl HEAD: {len(sizes)} answers to {len(paths)} requests")
        return sizes


ACCEPT = f"Accept: {OCI_MANIFEST}"


def _catalog(curl: Curl, repos: int) -> list[str]:
    (body,) = curl.get([f"/v2/_catalog?n={repos + 10}"])
    names = [n for n in json.loads(body)["repositories"] if n.startswith(f"{NAMESPACE}/")]
    if len(names) != repos:
        raise BenchError(f"_catalog: {len(names)} repositories, not {repos}")
    return names


def _tags(curl: Curl, repos: list[str]) -> list[tuple[str, str]]:
    bodies = curl.get([f"/v2/{r}/tags/list" for r in repos])
    return [(r, t) for r, body in zip(repos, bodies, strict=True) for t in json.loads(body)["tags"]]


def peer_tags(curl: Curl, repos: list[str]) -> int:
    """`ls -l` of every repository's tags/: tags/list each, a HEAD of each tag (its size)."""
    tags = _tags(curl, repos)
    sizes = curl.head([f"/v2/{r}/manifests/{t}" for r, t in tags], "-H", ACCEPT)
    return len(sizes)


def peer_layers(curl: Curl, repos: list[str]) -> int:
    """`ls -l` of every repository's layers/: tags/list each, the manifest of each tag (what
    it names), one HEAD per blob (its size)."""
    return _blob_heads(curl, _tags(curl, repos))


def _manifests(curl: Curl, tags: list[tuple[str, str]]) -> list[bytes]:
    """The manifest of each (repository, tag), in order."""
    return curl.get([f"/v2/{r}/manifests/{t}" for r, t in tags], "-H", ACCEPT)


def peer_manifests(curl: Curl, repos: list[str]) -> int:
    """`ls -l` of every repository's manifests/: tags/list each, then a GET of each tag's
    manifest (the API lists no manifests: their digests and sizes come from the bodies)."""
    tags = _tags(curl, repos)
    bodies = _manifests(curl, tags)
    return len({(r, digest_bytes(b)) for (r, _), b in zip(tags, bodies, strict=True)})


def _blob_heads(curl: Curl, tags: list[tuple[str, str]]) -> int:
    """The manifest of each (repository, tag), then one HEAD per blob they name: how many."""
    manifests = _manifests(curl, tags)
    blobs: dict[tuple[str, str], None] = {}
    for (repo, _), body in zip(tags, manifests, strict=True):
        parsed = json.loads(body)
        for d in [parsed["config"], *parsed["layers"]]:
            blobs[(repo, d["digest"])] = None
    return len(curl.head([f"/v2/{r}/blobs/{d}" for r, d in blobs]))


def peer_walk(curl: Curl, repos: int) -> int:
    """find/du of the whole namespace: the catalog, then all that tags/ and layers/ need
    (each tag's manifest is fetched once: it answers the tag's size and its blobs)."""
    names = _catalog(curl, repos)
    tags = _tags(curl, names)
    return 2 * len(tags) + _blob_heads(curl, tags)


TAGGED = "bench/tagged"  # the bench root's repository of `entries` tags (scenarios.ls's too)


@dataclass(frozen=True)
class Step:
    """One command timed on a fresh remote mount of `source`, after `ready` (untimed, on the
    same mount), and what it must count; `peer` makes a client's requests for the same."""

    script: str
    want: int | None
    peer: Callable[[], int]
    source: str
    ready: str = ""


def remote_walk(env: Env) -> list[Row]:
    """The walk root served by docker-registry and mounted by URL: `ls` of the namespace,
    `ls` and `ls -l` of every repository's tags/ (one `ls` each), `ls -l` of their layers/
    and manifests/, `find | wc -l` and `du -sb` of the namespace, and `ls` of `entries` tags of one
    repository of the bench's root (its path looked up first), each on a fresh mount,
    against the requests a client makes for the same answer (curl, one kept-alive
    connection)."""
    root = _root_for(env)
    n = len(root.repos)
    tagged = len(env.store.add_tags(TAGGED, env.config.entries))
    times: dict[str, list[float]] = {}
    registry = RegistryProcess(root.store.root, root.store.root.parent / "registry")
    with registry:
        curl = Curl(registry.url, env.store.scratch)
        ns, url = NAMESPACE, registry.url
        one = Curl(env.registry_url, env.store.scratch)
        steps: dict[str, Step] = {
            "ls": Step(f'ls "$1"/{ns} | wc -l', n, lambda: len(_catalog(curl, n)), url),
            "ls_tags": Step(f'ls "$1"/{ns}/*/tags | grep -c "^t"', len(root.images),
                            lambda: len(_tags(curl, root.repos)), url),
            "tags": Step(f'ls -l "$1"/{ns}/*/tags | grep -c "^-"', len(root.images),
                         lambda: peer_tags(curl, root.repos), url),
            "layers": Step(f'ls -l "$1"/{ns}/*/layers | grep -c "^-"',
                           sum(map(len, root.blobs.values())),
                           lambda: peer_layers(curl, root.repos), url),
            "manifests": Step(f'ls -l "$1"/{ns}/*/manifests | grep -c "^-"', len(root.images),
                              lambda: peer_manifests(curl, root.repos), url),
            "find": Step(f'find "$1"/{ns} -type f | wc -l', root.files,
                         lambda: peer_walk(curl, n), url),
            "du": Step(f'du -sb "$1"/{ns}', None, lambda: peer_walk(curl, n), url),
            "one": Step(f'ls "$1"/{TAGGED}/tags | wc -l', tagged,
                        lambda: len(_tags(one, [TAGGED])), env.registry_url,
                        f'stat "$1"/{TAGGED}/tags'),
        }  # fmt: skip
        for rep in range(min(env.config.reps, REMOTE_REPS)):
            for key, step in steps.items():
                for side in sides(rep):
                    if side == "peer":
                        t, got = timed(step.peer)
                        if step.want is not None and got != step.want:
                            raise BenchError(f"{key}: the client found {got}, not {step.want}")
                        times.setdefault(f"{key}_peer", []).append(t * 1000)
                        continue
                    with env.mount(step.source) as m:
                        if step.ready:
                            _shell(step.ready, m.mountpoint)()
                        ms, out = _ms(_shell(step.script, m.mountpoint))
                    if step.want is not None:
                        _check_find(out, step.want, f"{key} of the remote mount")
                    times.setdefault(key, []).append(ms)
    what = f"{n} repositories"
    tags, blobs = len(root.images), sum(map(len, root.blobs.values()))
    return [
        _row("remote_walk", f"remote mount: ls of a namespace of {what}", times, "ls",
             "registry _catalog (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: ls of tags/ of {what} ({tags} tags)", times,
             "ls_tags", "tags/list each (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: ls -l of tags/ of {what} ({tags} tags)", times,
             "tags", "tags/list + HEAD per tag (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: ls -l of layers/ of {what} ({blobs} blobs)", times,
             "layers", "tags/list + manifests + HEAD per blob (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: ls -l of manifests/ of {what} ({tags} manifests)",
             times, "manifests", "tags/list + GET per manifest (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: find -type f | wc -l, {what}", times, "find",
             "catalog, tags/list, manifests, HEAD per blob (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: du -sb, {what}", times, "du",
             "catalog, tags/list, manifests, HEAD per blob (curl)", None, 1.0),
        _row("remote_walk", f"remote mount: ls of {tagged} tags of one repository", times,
             "one", "registry tags/list (curl)", None, 1.0),
    ]  # fmt: skip


def _disk(config: Config) -> int:
    """The walk root: ~100 directories and 50 small files per repository."""
    return config.entries // 10 * 600 * 1024


def _remote_disk(config: Config) -> int:
    """The walk root, and `entries` tags in the bench's root (as scenarios.ls's)."""
    return _disk(config) + config.entries * 64 * 1024


SCENARIOS = (
    Scenario("walk", walk, False, _disk),
    Scenario("remote_walk", remote_walk, True, _remote_disk),
)
