"""storage/ against the real distribution registry 2.8, skopeo and umoci (issue 3).

Every test here shares one storage root between `storage/` (FilesystemDriver) and a real
`docker-registry`, so "byte-compatible" is checked by the reference implementation itself:
what the registry pushed, storage reads; what storage wrote, the registry serves and skopeo
pulls; uploads and their hash states move between the two mid-way.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pwd
import random
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import httpx
import pytest
from support import registry as harness
from support.oci import OciImage, build_image, build_large_image, run, skopeo_pull, skopeo_push
from support.registry import (
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    TEST_SECRET,
    RegistryClient,
    RegistryServer,
    blob_data_path,
    go_sha256_state,
    go_time,
    parse_state_token,
    repo_path,
    state_from_location,
    upload_path,
    upload_state_token,
)
from support.tools import digest_of

from storage.digests import Digest, Sha256State
from storage.drivers import FilesystemDriver
from storage.drivers.filesystem import LOCK_SUFFIX
from storage.errors import CorruptEntry, UnknownLayer, UnknownUpload
from storage.layers import LayerService
from storage.registry import Registry

pytestmark = [pytest.mark.registry, pytest.mark.storage]

RFC3339_SECONDS = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def dig(text: str) -> Digest:
    return Digest.parse(text)


def storage_on(root: Path) -> Registry:
    """storage/ opened on a registry's `rootdirectory`."""
    return Registry(FilesystemDriver(root))


def upload_url(server: RegistryServer, name: str, uuid: str, offset: int, started: str) -> str:
    """The URL the registry would hand out for an upload at `offset` (forged `_state`)."""
    token = upload_state_token(server.secret, name, uuid, offset, started)
    return str(httpx.URL(f"{server.url}/v2/{name}/blobs/uploads/{uuid}", params={"_state": token}))


def startedat_text(root: Path, name: str, uuid: str) -> str:
    return (upload_path(root, name, uuid) / "startedat").read_text()


def error_codes(resp: httpx.Response) -> list[str]:
    return [e["code"] for e in resp.json()["errors"]] if resp.content else []


async def read_all(layers: LayerService, digest: str) -> bytes:
    async with await layers.fetch(dig(digest)) as reader:
        return await reader.read()


# --------------------------------------------------------------------------- (a) registry → storage


@dataclass(frozen=True)
class Pushed:
    """Images pushed by skopeo into a registry that is still running on `root`."""

    server: RegistryServer
    root: Path
    image: OciImage  # library/demo:v1 and :latest (OCI, 3 layers)
    large: OciImage  # team/x/big:latest (a 4 MiB layer)
    docker: harness.FetchedManifest  # library/demo:docker, skopeo's v2s2 conversion of image


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:
    """Built once for the read-only tests below: umoci builds, skopeo pushes."""
    tmp = tmp_path_factory.mktemp("pushed")
    files = {
        "etc/motd": b"welcome\n",
        "usr/lib/libdemo.so": os.urandom(20_000),
        "usr/share/doc/demo/README": b"demo " * 500,
        "var/lib/demo/state": b"",
    }
    image = build_image(tmp / "layout", "v1", files, layers=3)
    large = build_large_image(tmp / "large", "big", 4 * 1024 * 1024 + 1234, seed=3)
    assert len(image.layer_digests) == 3 and len(large.layer_digests) == 2
    with RegistryServer(tmp / "root", workdir=tmp / "registry") as server:
        skopeo_push(tmp / "layout", "v1", server.host, "library/demo", "v1")
        skopeo_push(tmp / "layout", "v1", server.host, "library/demo", "latest")
        skopeo_push(tmp / "large", "big", server.host, "team/x/big", "latest")
        # skopeo converts to a Docker schema 2 manifest (new digest, same blobs).
        run(
            [
                "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                "--format", "v2s2",
                f"oci:{tmp / 'layout'}:v1", f"docker://{server.host}/library/demo:docker",
            ]
        )  # fmt: skip
        docker = server.client().get_manifest("library/demo", "docker")
        yield Pushed(server, server.root, image, large, docker)


async def test_catalog_of_pushed_registry(pushed: Pushed) -> None:
    """The catalog, walked by storage, equals the registry's `_catalog`, nesting included."""
    catalog = storage_on(pushed.root).catalog
    names = ["library/demo", "team/x/big"]
    assert await catalog.repositories() == names == pushed.server.client().catalog()
    assert await catalog.repositories(n=1) == ["library/demo"]
    assert await catalog.repositories(last="library/demo") == ["team/x/big"]
    assert await catalog.children() == ["library", "team"]
    assert await catalog.children("library") == ["demo"]
    assert await catalog.children("team/x") == ["big"]
    assert await catalog.children("library/demo") == []  # `_layers` etc. are not names
    assert await catalog.is_repository("library/demo")
    assert await catalog.is_repository("team/x/big")
    assert not await catalog.is_repository("team/x")
    assert not await catalog.is_repository("library")


async def test_tags_and_manifests_of_pushed_images(pushed: Pushed) -> None:
    """Tags resolve to the layout's digests; manifest bytes and media types are the registry's."""
    client, image = pushed.server.client(), pushed.image
    repo = storage_on(pushed.root).repository("library/demo")
    assert await repo.tags.list() == ["docker", "latest", "v1"]
    assert sorted(client.tags("library/demo")) == ["docker", "latest", "v1"]
    assert await repo.tags.get("v1") == await repo.tags.get("latest") == dig(image.digest)
    assert await repo.tags.get("docker") == dig(pushed.docker.digest)
    assert sorted(await repo.tags.lookup(dig(image.digest))) == ["latest", "v1"]

    oci = await repo.manifests.get(dig(image.digest))
    assert oci.data == image.manifest == client.get_manifest("library/demo", "v1").body
    assert oci.media_type == OCI_MANIFEST == image.media_type  # inferred: umoci omits mediaType
    docker = await repo.manifests.get(dig(pushed.docker.digest))
    assert (docker.data, docker.media_type) == (pushed.docker.body, DOCKER_MANIFEST)
    assert pushed.docker.media_type == DOCKER_MANIFEST
    assert sorted(map(str, await repo.manifests.list())) == sorted(
        [image.digest, pushed.docker.digest]
    )
    info = await repo.manifests.stat(dig(image.digest))
    assert info.size == len(image.manifest)
    # Manifests are blobs in the shared store too.
    assert await storage_on(pushed.root).blobs.get(dig(image.digest)) == image.manifest

    big = storage_on(pushed.root).repository("team/x/big")
    assert await big.tags.list() == ["latest"]
    assert await big.tags.get("latest") == dig(pushed.large.digest)
    assert (await big.manifests.get(dig(pushed.large.digest))).data == pushed.large.manifest


async def test_layers_of_pushed_images(pushed: Pushed) -> None:
    """`_layers` holds config + layers (not manifests); each blob reads back to its digest."""
    docker_blobs = json.loads(pushed.docker.body)
    docker_digests = {docker_blobs["config"]["digest"]} | {
        layer["digest"] for layer in docker_blobs["layers"]
    }
    assert docker_digests == set(pushed.image.blob_digests)  # the conversion kept the blobs
    for name, image in (("library/demo", pushed.image), ("team/x/big", pushed.large)):
        layers = storage_on(pushed.root).repository(name).layers
        assert sorted(map(str, await layers.list())) == sorted(image.blob_digests)
        assert not await layers.exists(dig(image.digest))
        for digest in image.blob_digests:
            want = image.blob(digest)
            info = await layers.stat(dig(digest))
            assert (str(info.digest), info.size) == (digest, len(want))
            assert info.mtime_ns == blob_data_path(pushed.root, digest).stat().st_mtime_ns
            data = await read_all(layers, digest)
            assert digest_of(data) == digest and data == want


async def test_random_access_reads_of_pushed_layer(pushed: Pushed) -> None:
    """seek + read and read_at at random offsets equal slices of the registry's blob."""
    digest = pushed.large.layer_digests[0]
    want = pushed.large.blob(digest)
    assert len(want) > 4 * 1024 * 1024
    rng = random.Random(42)
    layers = storage_on(pushed.root).repository("team/x/big").layers
    async with await layers.fetch(dig(digest)) as reader:
        assert reader.length == len(want)
        for _ in range(200):
            offset = rng.randrange(len(want))
            size = rng.choice([1, 511, 4096, 65_536, 1 << 20])
            assert reader.seek(offset) == offset
            assert await reader.read(size) == want[offset : offset + size]
            assert reader.tell() == min(offset + size, len(want))
            offset = rng.randrange(len(want))
            assert await reader.read_at(offset, size) == want[offset : offset + size]
        assert reader.seek(-100, os.SEEK_END) == len(want) - 100
        assert await reader.read(1000) == want[-100:]  # short read at the end
        assert await reader.read(10) == b""
        assert await reader.read_at(len(want) + 5, 10) == b""
        reader.seek(0)
        streamed = hashlib.sha256()
        while chunk := await reader.read(300_001):
            streamed.update(chunk)
        assert "sha256:" + streamed.hexdigest() == digest


# --------------------------------------------------------------------------- (b) storage → registry


def tar_layer(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """A real gzip tar layer (parent directories included) and its uncompressed diff_id.

    `*.sh` files are executable; content and timestamps are fixed, so digests are stable.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path, data in sorted(files.items()):
            for parent in reversed(PurePosixPath(path).parents[:-1]):
                if str(parent) not in dirs:
                    dirs.add(str(parent))
                    entry = tarfile.TarInfo(str(parent))
                    entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(entry)
            entry = tarfile.TarInfo(path)
            entry.size, entry.mtime = len(data), 1_700_000_000
            entry.mode = 0o755 if path.endswith(".sh") else 0o644
            tar.addfile(entry, io.BytesIO(data))
    plain = raw.getvalue()
    return gzip.compress(plain, mtime=0), digest_of(plain)


async def push_with_storage(reg: Registry, name: str, blob: bytes, split: int = 0) -> dict:
    """Upload through storage like a client would: write, (close, resume, write), finish."""
    layers = reg.repository(name).layers
    upload = await layers.upload()
    if split:
        await upload.write(blob[:split])
        await upload.close()
        upload = await layers.resume(upload.uuid)
        assert upload.hashed_size == split
    await upload.write(blob[split:])
    info = await upload.finish(dig(digest_of(blob)), size=len(blob))
    assert info.size == len(blob)
    return {"digest": digest_of(blob), "size": len(blob)}


LAYER_FILES = (
    {
        "etc/regfs/hello.txt": b"hello from regfs\n",
        "etc/regfs/version": b"1\n",
        "usr/share/regfs/data.bin": random.Random(5).randbytes(150_000),
        "usr/share/regfs/gone.txt": b"deleted by the next layer\n",
    },
    {
        "etc/regfs/version": b"2\n",  # overrides layer 0
        "opt/app/run.sh": b"#!/bin/sh\necho regfs\n",
        "usr/share/regfs/.wh.gone.txt": b"",  # OCI whiteout of layer 0's file
    },
)


async def test_registry_serves_image_written_by_storage(tmp_path: Path) -> None:
    """storage writes an image into a fresh root; a registry started on it serves it
    byte for byte, skopeo pulls it with the same digests, umoci unpacks the right files."""
    root, name = tmp_path / "root", "myorg/team/app"
    reg = storage_on(root)
    layers = [tar_layer(files) for files in LAYER_FILES]
    config = json.dumps(
        {
            "created": "2026-01-01T00:00:00Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/opt/app/run.sh"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            "history": [{"created_by": f"regfs layer {i}"} for i in range(len(layers))],
        }
    ).encode()
    config_desc = await push_with_storage(reg, name, config)
    layer_descs = [
        await push_with_storage(reg, name, blob, split=len(blob) // 3) for blob, _ in layers
    ]
    # Indented, with a trailing newline: the registry must serve these bytes, not re-encode.
    manifest = (
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **config_desc},
                "layers": [{"mediaType": OCI_LAYER, **d} for d in layer_descs],
                "annotations": {"org.opencontainers.image.title": "regfs"},
            },
            indent=2,
        ).encode()
        + b"\n"
    )
    repo = reg.repository(name)
    digest = await repo.manifests.put(manifest, OCI_MANIFEST)
    assert str(digest) == digest_of(manifest)
    await repo.tags.put("v1", digest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": str(digest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    index_digest = await repo.manifests.put(index, OCI_INDEX)
    await repo.tags.put("multi", index_digest)
    blobs = {config_desc["digest"]: config} | {
        d["digest"]: blob for d, (blob, _) in zip(layer_descs, layers, strict=True)
    }

    with RegistryServer(root, workdir=tmp_path / "registry") as server:
        client = server.client()
        for ref in ("v1", str(digest)):
            got = client.get_manifest(name, ref)
            assert got == (manifest, OCI_MANIFEST, str(digest)), ref
            head = client.request(
                "HEAD", f"/v2/{name}/manifests/{ref}", headers={"Accept": OCI_MANIFEST}
            )
            assert head.status_code == 200
            assert int(head.headers["Content-Length"]) == len(manifest)
            assert head.headers["Docker-Content-Digest"] == str(digest)
        assert client.get_manifest(name, "multi") == (
            index,
            OCI_INDEX,
            str(index_digest),
        )
        for blob_digest, blob in blobs.items():
            assert client.get_blob(name, blob_digest) == blob
            head = client.request("HEAD", f"/v2/{name}/blobs/{blob_digest}")
            assert int(head.headers["Content-Length"]) == len(blob)
            assert head.headers["Docker-Content-Digest"] == blob_digest
        assert sorted(client.tags(name)) == ["multi", "v1"]
        assert client.catalog() == [name]

        pulled = skopeo_pull(server.host, name, "v1", tmp_path / "pulled")
    assert (pulled.digest, pulled.manifest, pulled.media_type) == (
        str(digest),
        manifest,
        OCI_MANIFEST,
    )
    assert pulled.blob_digests == tuple(blobs)
    for blob_digest, blob in blobs.items():
        assert pulled.blob(blob_digest) == blob

    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run(["umoci", "unpack", *rootless, "--image", f"{tmp_path / 'pulled'}:v1", str(bundle)])
    rootfs = bundle / "rootfs"
    assert (rootfs / "etc/regfs/hello.txt").read_bytes() == b"hello from regfs\n"
    assert (rootfs / "etc/regfs/version").read_bytes() == b"2\n"
    data = LAYER_FILES[0]["usr/share/regfs/data.bin"]
    assert (rootfs / "usr/share/regfs/data.bin").read_bytes() == data
    assert not (rootfs / "usr/share/regfs/gone.txt").exists()
    assert not (rootfs / "usr/share/regfs/.wh.gone.txt").exists()
    run_sh = rootfs / "opt/app/run.sh"
    assert run_sh.read_bytes() == b"#!/bin/sh\necho regfs\n"
    assert run_sh.stat().st_mode & 0o111


# --------------------------------------------------------------------------- (c) uploads both ways


@pytest.fixture
def disk(registry_server: RegistryServer) -> Registry:
    """storage/ on the running registry's root."""
    return storage_on(registry_server.root)


async def test_http_upload_resumed_and_finished_by_storage(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """POST + two PATCHes over HTTP, then storage resumes from the registry's own hash
    state (no re-read), appends, finishes; the registry then serves the blob."""
    name = "up/http2storage"
    head, middle, tail = os.urandom(65_537), os.urandom(1_000), os.urandom(70_001)
    location, uuid = client.start_upload(name)
    location = client.patch_chunk(location, head, 0)
    location = client.patch_chunk(location, middle, len(head))
    size = len(head) + len(middle)

    layers = disk.repository(name).layers
    assert await layers.uploads() == [uuid]
    info = await layers.upload_info(uuid)
    started = startedat_text(registry_server.root, name, uuid)
    assert (info.size, info.started_at) == (size, datetime.fromisoformat(started))
    upload = await layers.resume(uuid)
    assert upload.size == size
    assert upload.hashed_size == size  # the registry's state file at `size` was loaded
    assert await upload.digest() == dig(digest_of(head + middle))
    assert upload.seek(0, os.SEEK_END) == size
    await upload.write(tail)
    data = head + middle + tail
    blob = await upload.finish(dig(digest_of(data)))
    assert (str(blob.digest), blob.size) == (digest_of(data), len(data))

    assert client.get_blob(name, digest_of(data)) == data
    resp = client.request("GET", location)  # the upload is gone for the registry too
    assert resp.status_code == 404 and error_codes(resp) == ["BLOB_UPLOAD_UNKNOWN"]
    assert not upload_path(registry_server.root, name, uuid).exists()
    assert await layers.uploads() == []


async def test_storage_resume_survives_registry_gap_state(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """A PATCH onto data with no state at its size leaves a state of the new bytes alone
    under their count (see test_harness); storage must still finish with the right digest."""
    name, layers = "up/gap", disk.repository("up/gap").layers
    first = os.urandom(1_000)
    upload = await layers.upload()
    await upload.write(first)
    await upload.close()
    states = upload_path(registry_server.root, name, upload.uuid) / "hashstates/sha256"
    (states / "1000").unlink()  # as if written by something that saves no state
    patch = os.urandom(100)
    url = upload_url(registry_server, name, upload.uuid, 1000, go_time(upload.started_at))
    client.patch_chunk(url, patch, 1000)
    assert (states / "100").read_bytes() == go_sha256_state(patch)  # the misleading state

    resumed = await layers.resume(upload.uuid)
    assert resumed.hashed_size == 100  # nearest lower state: the registry's bogus one
    blob = await resumed.finish(dig(digest_of(first + patch)))
    assert client.get_blob(name, str(blob.digest)) == first + patch


async def test_storage_upload_finished_by_registry(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """storage writes and closes; the registry finishes it over HTTP and serves the blob.
    A second storage upload, continued by a registry PATCH, goes round trip as well."""
    name, layers = "up/storage2http", disk.repository("up/storage2http").layers
    data = os.urandom(100_003)
    upload = await layers.upload()
    await upload.write(data[:40_000])
    await upload.write(data[40_000:])
    await upload.close()
    started = go_time(upload.started_at)
    assert started == startedat_text(registry_server.root, name, upload.uuid)
    url = upload_url(registry_server, name, upload.uuid, len(data), started)
    resp = client.request("GET", url)
    assert resp.status_code == 204 and resp.headers["Range"] == f"0-{len(data) - 1}"
    resp = client.finish_upload(url, digest_of(data))
    assert resp.headers["Docker-Content-Digest"] == digest_of(data)
    assert client.get_blob(name, digest_of(data)) == data
    assert await layers.exists(dig(digest_of(data)))
    assert await layers.uploads() == []

    # storage → registry PATCH → storage → registry PUT.
    parts = [os.urandom(n) for n in (3_001, 4_097, 555, 10)]
    upload = await layers.upload()
    await upload.write(parts[0])
    await upload.close()
    started = go_time(upload.started_at)
    url = upload_url(registry_server, name, upload.uuid, len(parts[0]), started)
    location = client.patch_chunk(url, parts[1], len(parts[0]))
    upload = await layers.resume(upload.uuid)
    assert upload.hashed_size == upload.size == len(parts[0] + parts[1])
    await upload.write(parts[2])
    await upload.close()
    offset = len(parts[0] + parts[1] + parts[2])
    assert parse_state_token(TEST_SECRET, state_from_location(location)).offset == len(
        parts[0] + parts[1]
    )
    url = upload_url(registry_server, name, upload.uuid, offset, started)
    client.finish_upload(url, digest_of(b"".join(parts)), parts[3])
    assert client.get_blob(name, digest_of(b"".join(parts))) == b"".join(parts)


async def test_registry_trusts_storage_hash_state(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """After close, scribble over the start of the upload's data on disk: the registry still
    accepts the ORIGINAL digest, so it finished from regfs's saved hash state and did not
    re-read. Control: without that state the same scribble is caught (DIGEST_INVALID)."""
    name, layers = "up/trust", disk.repository("up/trust").layers
    results = {}
    for keep_state in (True, False):
        data = os.urandom(200_000)
        upload = await layers.upload()
        await upload.write(data)
        await upload.close()
        updir = upload_path(registry_server.root, name, upload.uuid)
        if not keep_state:
            (updir / "hashstates/sha256" / str(len(data))).unlink()
        with (updir / "data").open("r+b") as f:
            f.write(b"\0" * 1000)
        url = upload_url(registry_server, name, upload.uuid, len(data), go_time(upload.started_at))
        url = str(httpx.URL(url).copy_merge_params({"digest": digest_of(data)}))
        resp = client.request("PUT", url, headers={"Content-Type": "application/octet-stream"})
        results[keep_state] = (resp.status_code, error_codes(resp))
    assert results == {True: (201, []), False: (400, ["DIGEST_INVALID"])}


async def test_hash_state_files_are_interchangeable(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """The same bytes, sent in the same chunks over HTTP and through storage (close/resume
    between chunks), leave byte-identical `hashstates/sha256/<n>` files, equal to Go's
    MarshalBinary; each of the registry's states unmarshals and hashes on correctly."""
    sizes = (1, 62, 1, 1, 935, 3_113, 64)  # cumulative 1, 63, 64, 65, 1000, 4113, 4177
    data = os.urandom(sum(sizes))
    chunks, pos = [], 0
    for n in sizes:
        chunks.append((pos, data[pos : pos + n]))
        pos += n

    location, http_uuid = client.start_upload("hs/http")
    for start, chunk in chunks:
        location = client.patch_chunk(location, chunk, start)

    layers = disk.repository("hs/storage").layers
    upload = await layers.upload()
    uuid = upload.uuid
    for _, chunk in chunks:
        await upload.write(chunk)
        await upload.close()
        upload = await layers.resume(uuid)
        assert upload.hashed_size == upload.size
    await upload.close()

    root = registry_server.root
    theirs = upload_path(root, "hs/http", http_uuid) / "hashstates/sha256"
    ours = upload_path(root, "hs/storage", uuid) / "hashstates/sha256"
    offsets = sorted(int(p.name) for p in theirs.iterdir())
    assert offsets == [0, 1, 63, 64, 65, 1000, 4113, 4177]
    assert sorted(int(p.name) for p in ours.iterdir()) == offsets
    more = os.urandom(77)
    for n in offsets:
        registry_state = (theirs / str(n)).read_bytes()
        assert registry_state == (ours / str(n)).read_bytes() == go_sha256_state(data[:n]), n
        state = Sha256State.unmarshal(registry_state)
        assert state.size == n and state.marshal() == registry_state
        assert str(state.digest()) == digest_of(data[:n])
        state.update(more)
        assert str(state.digest()) == digest_of(data[:n] + more)


# --------------------------------------------------------------------------- (d) startedat


async def test_startedat_and_upload_lifecycle_across_implementations(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """Both sides write `startedat` the same way and accept each other's uploads: the
    registry reports and cancels storage's uploads, storage cancels the registry's."""
    name, root = "up/life", registry_server.root
    layers = disk.repository(name).layers
    before = datetime.now(UTC).replace(microsecond=0)
    upload = await layers.upload()
    location, http_uuid = client.start_upload(name)
    ours = (upload_path(root, name, upload.uuid) / "startedat").read_bytes()
    theirs = (upload_path(root, name, http_uuid) / "startedat").read_bytes()
    for raw in (ours, theirs):
        assert RFC3339_SECONDS.fullmatch(raw) and len(raw) == 20, raw
        assert before <= datetime.fromisoformat(raw.decode()) <= datetime.now(UTC)
    assert sorted(await layers.uploads()) == sorted([upload.uuid, http_uuid])
    assert (await layers.upload_info(http_uuid)).started_at == datetime.fromisoformat(
        theirs.decode()
    )

    started = ours.decode()
    url = upload_url(registry_server, name, upload.uuid, 0, started)
    resp = client.request("GET", url)
    assert resp.status_code == 204
    assert resp.headers["Range"] == "0-0" and resp.headers["Docker-Upload-UUID"] == upload.uuid
    # The registry parsed our startedat and echoes it unchanged in the next token.
    assert parse_state_token(TEST_SECRET, state_from_location(resp.headers["Location"])) == (
        harness.UploadState(name, upload.uuid, 0, started)
    )
    await upload.write(os.urandom(5_000))
    await upload.close()
    url = upload_url(registry_server, name, upload.uuid, 5_000, started)
    resp = client.request("GET", url)
    assert resp.status_code == 204 and resp.headers["Range"] == "0-4999"
    assert client.request("DELETE", url).status_code == 204  # the registry cancels ours
    # 2.8.2 quirk: its deferred Close re-saves state 0 after the upload was removed.
    leftover = upload_path(root, name, upload.uuid)
    assert [str(p.relative_to(leftover)) for p in leftover.rglob("*") if p.is_file()] == [
        "hashstates/sha256/0"
    ]
    assert await layers.uploads() == [http_uuid]  # so storage must not list it
    with pytest.raises(UnknownUpload):
        await layers.resume(upload.uuid)

    await (await layers.resume(http_uuid)).cancel()  # storage cancels the registry's
    resp = client.request("GET", location)
    assert resp.status_code == 404 and error_codes(resp) == ["BLOB_UPLOAD_UNKNOWN"]
    assert await layers.uploads() == []


# --------------------------------------------------------------------------- (e) bad input


async def test_corrupt_entries_in_registry_root(
    registry_server: RegistryServer, client: RegistryClient, disk: Registry
) -> None:
    """Damage done to real registry content fails that entry alone, with a typed error;
    every listing and the intact entries keep working."""
    name, root = "bad/repo", registry_server.root
    sizes = {}
    for n in (100, 200, 300, 400):
        sizes[client.push_blob(name, os.urandom(n))] = n
    cfg, good, broken, missing = sizes
    manifests: list[str] = []
    for blobs in ((good, broken, missing), (good,)):
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": 100},
                "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": sizes[d]} for d in blobs],
            }
        ).encode()
        client.put_manifest(name, f"m{len(manifests)}", body)
        manifests.append(digest_of(body))
    for tag in ("good", "junk"):
        client.put_manifest(name, tag, (blob_data_path(root, manifests[0])).read_bytes())

    repo = repo_path(root, name)
    (repo / "_layers/sha256" / broken.split(":")[1] / "link").write_bytes(b"garbage\n")
    shutil.rmtree(blob_data_path(root, missing).parent)
    (repo / "_layers/sha256/not-a-digest").mkdir()
    (repo / "_manifests/tags/junk/current/link").write_bytes(b"sha256:zz")
    revision = repo / "_manifests/revisions/sha256" / manifests[1].split(":")[1] / "link"
    revision.write_bytes(b"\xff\xfe")
    (root / harness.V2_ROOT / "repositories/Not_A_Repo/_layers").mkdir(parents=True)
    bad_time, _ = client.start_upload(name)
    bad_time_uuid = httpx.URL(bad_time).path.rsplit("/", 1)[1]
    (upload_path(root, name, bad_time_uuid) / "startedat").write_bytes(b"garbage")
    no_time, no_time_uuid = client.start_upload(name)
    (upload_path(root, name, no_time_uuid) / "startedat").unlink()
    _, fine_uuid = client.start_upload(name)

    storage = disk.repository(name)
    layers = storage.layers
    assert sorted(map(str, await layers.list())) == sorted([cfg, good, broken, missing])
    for call in (layers.stat, layers.fetch):
        with pytest.raises(CorruptEntry, match="not a digest link") as err:
            await call(dig(broken))
        assert err.value.path.endswith(f"/_layers/sha256/{broken.split(':')[1]}/link")
        with pytest.raises(UnknownLayer, match="blob is gone"):
            await call(dig(missing))
    assert not await layers.exists(dig(broken)) and not await layers.exists(dig(missing))
    assert await read_all(layers, good) == client.get_blob(name, good)
    # The registry itself: 500 for the garbage link, 404 for the missing blob.
    assert client.request("GET", f"/v2/{name}/blobs/{broken}").status_code == 500
    assert client.request("GET", f"/v2/{name}/blobs/{missing}").status_code == 404

    assert await storage.tags.list() == ["good", "junk", "m0", "m1"]
    with pytest.raises(CorruptEntry, match="not a digest link"):
        await storage.tags.get("junk")
    assert await storage.tags.get("good") == dig(manifests[0])
    assert sorted(await storage.tags.lookup(dig(manifests[0]))) == ["good", "m0"]
    assert sorted(map(str, await storage.manifests.list())) == sorted(manifests)
    with pytest.raises(CorruptEntry):
        await storage.manifests.get(dig(manifests[1]))
    assert (await storage.manifests.get(dig(manifests[0]))).data == client.get_manifest(
        name, "good"
    ).body

    # Garbage startedat: listed, and fails alone; none: unknown to the registry, not listed.
    assert sorted(await layers.uploads()) == sorted([bad_time_uuid, fine_uuid])
    for call in (layers.upload_info, layers.resume):
        with pytest.raises(CorruptEntry, match="startedat"):
            await call(bad_time_uuid)
        with pytest.raises(UnknownUpload):
            await call(no_time_uuid)
    assert (await layers.upload_info(fine_uuid)).size == 0
    assert client.request("GET", bad_time).status_code == 500  # the registry fails it too
    assert error_codes(client.request("GET", no_time)) == ["BLOB_UPLOAD_UNKNOWN"]

    assert await disk.catalog.repositories() == [name]
    assert await disk.catalog.children() == ["bad"]


# --------------------------------------------------------------------------- file modes


async def test_registry_as_its_own_user_serves_storage_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian runs the registry as user `docker-registry`: it must be able to read what
    regfs (here root) wrote. Files must get the registry's own 0666-minus-umask modes;
    mkstemp's 0600 links and tags gave 500 "permission denied"."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the registry as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    try:
        pwd.getpwnam("docker-registry")
    except KeyError:
        pytest.skip("no docker-registry user")
    base = Path(tempfile.mkdtemp(prefix="regfs-perm-"))  # tmp_path's parents are 0700
    try:
        base.chmod(0o755)
        wrapper = base / "docker-registry-as-user"
        wrapper.write_text(
            "#!/bin/sh\nexec setpriv --reuid=docker-registry --regid=docker-registry "
            '--init-groups docker-registry "$@"\n'
        )
        wrapper.chmod(0o755)
        monkeypatch.setattr(harness, "REGISTRY_BIN", str(wrapper))
        old_umask = os.umask(0o022)
        try:
            reg = storage_on(base / "root")
            desc = await push_with_storage(reg, "perm/app", b'{"os":"linux"}', split=5)
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, **desc},
                    "layers": [],
                }
            ).encode()
            repo = reg.repository("perm/app")
            await repo.tags.put("v1", await repo.manifests.put(manifest))
            await (await repo.layers.upload()).close()
        finally:
            os.umask(old_umask)
        for path in (base / "root").rglob("*"):
            want = 0o755 if path.is_dir() else 0o644
            if path.name.endswith(LOCK_SUFFIX):  # regfs's alone: others must not flock it
                want = 0o600
            assert stat.S_IMODE(path.stat().st_mode) == want, path
        (base / "work").mkdir(mode=0o755)
        with RegistryServer(base / "root", workdir=base / "work") as server:
            client = server.client()
            assert client.get_manifest("perm/app", "v1").body == manifest
            assert client.get_blob("perm/app", desc["digest"]) == b'{"os":"linux"}'
    finally:
        shutil.rmtree(base, ignore_errors=True)
