"""Manifests as the registry reads them: media types, the checks it makes on a put that need
no storage, and its JSON rules. Shared by every source (a storage root, a remote registry)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .digests import Digest
from .errors import InvalidManifest, InvalidName

MAX_MANIFEST_SIZE = 4 << 20
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SUPPORTED = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
INDEXES = (DOCKER_LIST, OCI_INDEX)
UNKNOWN_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Descriptor:
    where: str
    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...]


def media_type_of(body: dict[str, Any]) -> str | None:
    """The body's media type, inferring OCI ones (their mediaType field is optional)."""
    declared = body.get("mediaType")
    if isinstance(declared, str):
        return declared
    if "manifests" in body:
        return OCI_INDEX
    if "config" in body:
        return OCI_MANIFEST
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def load_json(data: bytes) -> Any:
    """JSON as Go's encoding/json (the registry's) reads it: UTF-8 only (json.loads would take
    a BOM, UTF-16 and UTF-32), no NaN or Infinity. ValueError for anything else, nesting too
    deep for Python's parser included (RecursionError)."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def sniff_media_type(data: bytes) -> str:
    """The media type of stored bytes, without judging them."""
    try:
        body = load_json(data)
    except ValueError:
        return UNKNOWN_TYPE
    return (media_type_of(body) if isinstance(body, dict) else None) or UNKNOWN_TYPE


def _descriptor(raw: object, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidManifest(f"{where} is not a descriptor object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidManifest(f"{where} has no mediaType")
    if not isinstance(digest, str):
        raise InvalidManifest(f"{where} has no digest")
    try:
        parsed = Digest.parse(digest)
    except InvalidName as exc:
        raise InvalidManifest(f"{where}: {exc}") from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"{where} has no valid size")
    urls = raw.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise InvalidManifest(f"{where} has invalid urls")
    return Descriptor(where, media_type, parsed, size, tuple(urls))


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    blobs: tuple[Descriptor, ...]  # config and layers: must be linked in the repository
    children: tuple[Descriptor, ...]  # manifests an index names: must be revisions here


def parse_manifest(data: bytes, content_type: str | None = None) -> ParsedManifest:
    """Every check the registry makes that needs no storage; InvalidManifest names the failure."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise InvalidManifest(f"manifest is {len(data)} bytes, over the 4 MiB limit")
    try:
        body = load_json(data)
    except ValueError as exc:
        raise InvalidManifest(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidManifest("manifest is not a JSON object")
    if body.get("schemaVersion") != 2:
        raise InvalidManifest(f"unsupported schemaVersion {body.get('schemaVersion')!r} (want 2)")
    declared = body.get("mediaType")
    media_type = declared if declared is not None else content_type or media_type_of(body)
    if media_type not in SUPPORTED:
        raise InvalidManifest(f"unsupported manifest media type {media_type!r}")
    if declared is None and media_type not in (OCI_MANIFEST, OCI_INDEX):
        raise InvalidManifest(f"a {media_type} manifest must declare its mediaType")
    if content_type is not None and content_type != media_type:
        raise InvalidManifest(f"content type {content_type!r} does not match {media_type!r}")
    if media_type in INDEXES:
        if "config" in body or "layers" in body:
            raise InvalidManifest("an index must not have config or layers")
        entries = body.get("manifests")
        if not isinstance(entries, list):
            raise InvalidManifest("an index needs a manifests list")
        children = tuple(_descriptor(d, f"manifests[{i}]") for i, d in enumerate(entries))
        return ParsedManifest(media_type, (), children)
    if "manifests" in body:
        raise InvalidManifest("an image manifest must not have manifests")
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("an image manifest needs a layers list")
    config = _descriptor(body.get("config"), "config")
    blobs = (config, *(_descriptor(d, f"layers[{i}]") for i, d in enumerate(layers)))
    return ParsedManifest(media_type, blobs, ())
