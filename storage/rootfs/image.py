"""What the rootfs view shows for a manifest: an image's ordered layers, or an index's platforms.

Everything comes through the source contract (`storage/api.py`), so it works on every source.
A manifest is hostile input: `parse_manifest` checks its shape, platform names are checked
before they become file names, and whatever is not an image (an artifact, a nested index)
is `NotAnImage`, which the view answers with EIO for that manifest only.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

from ..api import Repository
from ..digests import Digest
from ..errors import InvalidManifest, StorageError
from ..manifest_format import (
    DOCKER_MANIFEST,
    INDEXES,
    OCI_MANIFEST,
    load_json,
    parse_manifest,
)
from .index import LayerRef

log = logging.getLogger(__name__)

# An image's config says it is one; an artifact (a Helm chart, a signature, an SBOM) has
# another config type, and its "layers" are no root filesystem.
IMAGE_CONFIGS = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
ATTESTATION = ("vnd.docker.reference.type", "attestation-manifest")
# An eStargz layer's TOC digest: with it the indexer reads the TOC instead of making a pass.
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
# A platform field as it may appear in a file name: no `/`, no leading dot, bounded.
_PLATFORM_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,63}")


class NotAnImage(StorageError, LookupError):
    """A manifest with no root filesystem to show (an artifact, a malformed manifest): no
    name in rootfs/ (ENOENT), like a tag that is not there."""


@dataclass(frozen=True)
class Image:
    """An image manifest: its layers, base first."""

    digest: Digest
    layers: tuple[LayerRef, ...]


@dataclass(frozen=True)
class Platforms:
    """An image index: `<os>-<arch>[-<variant>]` → the image manifest for that platform
    (attestations and entries without a usable platform left out)."""

    digest: Digest
    platforms: tuple[tuple[str, Digest], ...]

    def get(self, name: str) -> Digest | None:
        return dict(self.platforms).get(name)


async def load(repo: Repository, digest: Digest) -> Image | Platforms:
    """The image or index the manifest `digest` of `repo` is; NotAnImage if neither."""
    manifest = await repo.manifests.get(digest)
    try:
        parsed = parse_manifest(manifest.data)
    except InvalidManifest as exc:
        raise NotAnImage(f"manifest {digest} in {repo.name}: {exc}") from None
    if parsed.media_type in INDEXES:
        return Platforms(digest, _platforms(load_json(manifest.data), digest))
    config, *layers = parsed.blobs
    if config.media_type not in IMAGE_CONFIGS:
        raise NotAnImage(
            f"manifest {digest} in {repo.name} is not an image (config {config.media_type!r})"
        )
    raw_layers = load_json(manifest.data)["layers"]  # parse_manifest checked each one
    return Image(
        digest,
        tuple(
            LayerRef(
                d.digest,
                d.size,
                d.media_type,
                functools.partial(repo.layers.fetch, d.digest, d.size),
                _annotation(raw, TOC_DIGEST),
            )
            for d, raw in zip(layers, raw_layers, strict=True)
        ),
    )


def _annotation(descriptor: dict[str, Any], key: str) -> str:
    annotations = descriptor.get("annotations")
    value = annotations.get(key) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else ""


def platform_name(entry: dict[str, Any]) -> str | None:
    """`<os>-<arch>[-<variant>]` of an index entry; None for an attestation, an entry that
    is no image manifest, or one whose platform is missing or no safe file name."""
    platform = entry.get("platform")
    annotations = entry.get("annotations")
    if entry.get("mediaType") not in IMAGE_MANIFESTS or not isinstance(platform, dict):
        return None
    if isinstance(annotations, dict) and annotations.get(ATTESTATION[0]) == ATTESTATION[1]:
        return None
    parts = [platform.get("os"), platform.get("architecture")]
    if platform.get("variant") is not None:
        parts.append(platform.get("variant"))
    if parts[:2] == ["unknown", "unknown"]:
        return None  # what buildkit names its attestation entries
    if not all(isinstance(p, str) and _PLATFORM_PART.fullmatch(p) for p in parts):
        return None
    return "-".join(str(p) for p in parts)


def _platforms(body: dict[str, Any], digest: Digest) -> tuple[tuple[str, Digest], ...]:
    found: dict[str, Digest] = {}
    for entry in body["manifests"]:  # parse_manifest checked each descriptor
        name = platform_name(entry)
        if name is None:
            continue
        if name in found:
            log.info("index %s: a second %s entry is not shown (%s)", digest, name, entry["digest"])
            continue
        found[name] = Digest.parse(entry["digest"])
    return tuple(sorted(found.items()))
