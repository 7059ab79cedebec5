"""Manifests, tags and the catalog on both drivers."""

from __future__ import annotations

import json

import pytest

from storage.digests import Digest, digest_bytes
from storage.drivers.filesystem import FilesystemDriver
from storage.errors import CorruptEntry, InvalidManifest, InvalidName
from storage.manifest_format import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from storage.paths import RepositoryDir, TagCurrentLink, TagIndexDir, path_for
from storage.registry import Registry

pytestmark = pytest.mark.storage

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"


async def push_blob(repo, data: bytes) -> dict:
    upload = await repo.layers.upload()
    await upload.write(data)
    digest = digest_bytes(data)
    await upload.finish(digest)
    return {"mediaType": LAYER_TYPE, "digest": str(digest), "size": len(data)}


def image_manifest(config: dict, layers: list[dict], media_type: str | None = OCI_MANIFEST):
    body = {"schemaVersion": 2, "config": {**config, "mediaType": CONFIG_TYPE}, "layers": layers}
    if media_type:
        body["mediaType"] = media_type
    return json.dumps(body).encode()


@pytest.fixture
async def image(registry):
    repo = registry.repository("library/app")
    config = await push_blob(repo, b'{"architecture":"amd64","os":"linux"}')
    layers = [await push_blob(repo, b"layer one"), await push_blob(repo, b"layer two")]
    return repo, image_manifest(config, layers)


async def test_put_get_tag_roundtrip(image):
    repo, body = image
    digest = await repo.manifests.put(body)
    assert digest == digest_bytes(body)
    manifest = await repo.manifests.get(digest)
    assert (manifest.data, manifest.media_type) == (body, OCI_MANIFEST)
    await repo.tags.put("v1", digest)
    await repo.tags.put("latest", digest)
    assert await repo.tags.list() == ["latest", "v1"]
    assert await repo.tags.get("v1") == digest
    assert sorted(await repo.tags.lookup(digest)) == ["latest", "v1"]
    assert await repo.manifests.list() == [digest]


async def test_tag_keeps_its_history_in_index(image, registry):
    repo, body = image
    first = await repo.manifests.put(body)
    second = await repo.manifests.put(body.replace(b'"schemaVersion": 2', b'"schemaVersion":2'))
    await repo.tags.put("v1", first)
    await repo.tags.put("v1", second)
    index = await registry.driver.list(path_for(TagIndexDir(repo.name, "v1")))
    assert sorted(index) == sorted([first.hex, second.hex])
    raw = await registry.driver.get_content(path_for(TagCurrentLink(repo.name, "v1")))
    assert raw == str(second).encode()  # no trailing newline


async def test_index_needs_its_children(image):
    repo, body = image
    child = {"mediaType": OCI_MANIFEST, "digest": str(digest_bytes(body)), "size": len(body)}
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]})
    with pytest.raises(InvalidManifest, match=r"manifests\[0\] names manifest"):
        await repo.manifests.put(index.encode())
    await repo.manifests.put(body)
    digest = await repo.manifests.put(index.encode())
    assert (await repo.manifests.get(digest)).media_type == OCI_INDEX


async def test_oci_media_type_may_be_omitted(image):
    repo, body = image
    parsed = json.loads(body)
    del parsed["mediaType"]
    digest = await repo.manifests.put(json.dumps(parsed).encode())
    assert (await repo.manifests.get(digest)).media_type == OCI_MANIFEST


def _bad_cases(config: dict, layer: dict) -> list[tuple[bytes, str]]:
    missing = {**layer, "digest": str(digest_bytes(b"absent"))}
    good = json.loads(image_manifest(config, [layer]))
    return [
        (b"{not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({**good, "schemaVersion": 1}).encode(), "schemaVersion"),
        (json.dumps({**good, "mediaType": "text/plain"}).encode(), "unsupported manifest media"),
        (image_manifest(config, [missing]), r"layers\[0\] names blob"),
        (image_manifest({**config, "digest": str(digest_bytes(b"no"))}, [layer]), "config names"),
        (json.dumps({**good, "manifests": []}).encode(), "must not have manifests"),
        (json.dumps({**good, "mediaType": OCI_INDEX}).encode(), "must not have config"),
        (json.dumps({"schemaVersion": 2, "mediaType": DOCKER_LIST}).encode(), "manifests list"),
        (
            json.dumps(
                {k: v for k, v in good.items() if k != "mediaType"} | {"layers": 3}
            ).encode(),
            "layers list",
        ),
        (image_manifest(config, [{**layer, "digest": "sha256:short"}]), r"layers\[0\]: invalid"),
        (image_manifest(config, [{**layer, "size": -1}]), "valid size"),
        (image_manifest(config, [{**layer, "size": True}]), "valid size"),
        (b" " * (4 << 20) + b"{}", "4 MiB"),
    ]


async def test_invalid_manifests_store_nothing(image, registry):
    repo, body = image
    good = json.loads(body)
    before = [i.path async for i in registry.driver.walk("/")]
    for data, why in _bad_cases(good["config"], good["layers"][0]):
        with pytest.raises(InvalidManifest, match=why):
            await repo.manifests.put(data)
    assert [i.path async for i in registry.driver.walk("/")] == before


async def test_content_type_must_match(image):
    repo, body = image
    with pytest.raises(InvalidManifest, match="does not match"):
        await repo.manifests.put(body, DOCKER_MANIFEST)


async def test_docker_types_must_declare_their_media_type(image):
    repo, body = image
    parsed = json.loads(body)
    del parsed["mediaType"]
    with pytest.raises(InvalidManifest, match="must declare its mediaType"):
        await repo.manifests.put(json.dumps(parsed).encode(), DOCKER_MANIFEST)


async def test_external_urls_are_not_checked(image):
    repo, body = image
    parsed = json.loads(body)
    parsed["layers"].append(
        {
            "mediaType": LAYER_TYPE,
            "digest": str(digest_bytes(b"foreign")),
            "size": 7,
            "urls": ["https://example.invalid/layer"],
        }
    )
    await repo.manifests.put(json.dumps(parsed).encode())


@pytest.mark.parametrize("tag", ["", "../x", "a/b", ".hidden", "x" * 129])
async def test_invalid_tags_refused(image, tag):
    repo, _ = image
    with pytest.raises(InvalidName):
        await repo.tags.get(tag)
    with pytest.raises(InvalidName):
        await repo.tags.put(tag, digest_bytes(b""))


async def test_garbage_tag_link(image, registry):
    repo, _ = image
    await registry.driver.put_content(path_for(TagCurrentLink(repo.name, "bad")), b"\xff\xfe")
    with pytest.raises(CorruptEntry):
        await repo.tags.get("bad")
    assert await repo.tags.lookup(Digest.parse("sha256:" + "0" * 64)) == []


async def test_catalog_levels_and_listing(registry):
    for name in ("a/b", "a/b/c", "a-x", "z", "lib/alpine"):
        upload = await registry.repository(name).layers.upload()
        await upload.finish(digest_bytes(b""))
    await registry.driver.put_content(path_for(RepositoryDir("a/Bad")) + "/f", b"")
    cat = registry.catalog
    assert await cat.children() == ["a", "a-x", "lib", "z"]
    assert await cat.children("a") == ["b"]  # "Bad" is logged and skipped
    assert await cat.children("a/b") == ["c"]
    assert not await cat.is_repository("a")
    assert await cat.is_repository("a/b") and await cat.is_repository("a/b/c")
    assert await cat.exists("lib") and not await cat.exists("nope")
    assert await cat.repositories() == ["a-x", "a/b", "a/b/c", "lib/alpine", "z"]
    assert await cat.repositories(n=2, last="a/b") == ["a/b/c", "lib/alpine"]


async def test_a_linked_marker_makes_no_repository(tmp_path):
    """A symlink in a root is never followed: a `_layers` that is one makes no repository
    (is_repository says so, as the listing it falls back on does), where a real `_manifests`
    beside it does."""
    registry = Registry(FilesystemDriver(tmp_path / "root"))
    repo = tmp_path / "root" / path_for(RepositoryDir("org/loop")).lstrip("/")
    repo.mkdir(parents=True)
    (repo / "_layers").symlink_to(tmp_path)
    assert not await registry.catalog.is_repository("org/loop")
    (repo / "_manifests").mkdir()
    assert await registry.catalog.is_repository("org/loop")


async def test_repository_names_validated(registry):
    for bad in ("", "UP", "a/../b", "/abs", "a" * 256):
        with pytest.raises(InvalidName):
            registry.repository(bad)
