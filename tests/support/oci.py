"""Build real OCI images offline (umoci) and move them to and from a registry (skopeo).

Gives tests genuine images (several gzip layers, a config, an OCI manifest) whose digests
can be compared on both sides of a push or pull, without any network beyond 127.0.0.1;
and `image_manifest`, the manifest of blobs a test pushes by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storage.digests import Digest, digest_bytes
from storage.registry import Repository
from support.registry import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, RegistryClient

log = logging.getLogger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


class CommandError(RuntimeError):
    """An external tool failed; the message carries its command line and stderr."""


def run(args: Sequence[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a tool with a timeout and check=True, turning failures into readable errors."""
    cmd = shlex.join(args)
    log.debug("run %s", cmd)
    try:
        return subprocess.run(
            list(args),
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise CommandError(f"{args[0]} is not installed (`make deb` installs it)") from None
    except subprocess.CalledProcessError as e:
        out = (e.stderr or "").strip() or (e.stdout or "").strip()
        raise CommandError(f"`{cmd}` exited with {e.returncode}:\n{out}") from None
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise CommandError(f"`{cmd}` timed out after {timeout}s:\n{err or ''}") from None


# --------------------------------------------------------------------------- reading layouts


@dataclass(frozen=True)
class OciImage:
    """One tagged image manifest of an OCI layout, with the digests tests compare."""

    layout_dir: Path
    manifest: bytes
    digest: str
    media_type: str
    config_digest: str
    layer_digests: tuple[str, ...]

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config then layers: every blob a registry must link into the repository."""
        return (self.config_digest, *self.layer_digests)

    def blob(self, digest: str) -> bytes:
        return blob_path(self.layout_dir, digest).read_bytes()


def blob_path(layout_dir: Path, digest: str) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return Path(layout_dir) / "blobs" / algo / hexdigest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_oci_layout(layout_dir: Path, tag: str) -> OciImage:
    """Find `tag` in index.json and read its manifest; checks the manifest's digest."""
    layout_dir = Path(layout_dir)
    index = json.loads((layout_dir / "index.json").read_text())
    found = [d for d in index.get("manifests", []) if d.get("annotations", {}).get(REF_NAME) == tag]
    if not found:
        raise KeyError(f"tag {tag!r} not in {layout_dir}/index.json")
    desc = found[-1]
    body = blob_path(layout_dir, desc["digest"]).read_bytes()
    if sha256_digest(body) != desc["digest"]:
        raise ValueError(f"{layout_dir}: manifest blob does not match {desc['digest']}")
    manifest = json.loads(body)
    if "config" not in manifest:
        raise ValueError(f"{layout_dir}:{tag} is not an image manifest ({desc['mediaType']})")
    return OciImage(
        layout_dir=layout_dir,
        manifest=body,
        digest=desc["digest"],
        media_type=desc["mediaType"],
        config_digest=manifest["config"]["digest"],
        layer_digests=tuple(layer["digest"] for layer in manifest["layers"]),
    )


# --------------------------------------------------------------------------- building images


def image_manifest(
    config: bytes,
    layers: Sequence[bytes],
    layer_type: str = LAYER_TAR,
    annotations: Sequence[Mapping[str, str]] = (),
) -> bytes:
    """The bytes of an OCI image manifest naming `config` and `layers` by digest and size,
    for tests that push the blobs themselves (through storage/, the client or HTTP);
    `annotations`, if given, one mapping per layer (an eStargz layer's TOC digest)."""

    def descriptor(media_type: str, data: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}

    described = [descriptor(layer_type, layer) for layer in layers]
    for layer, notes in zip(described, annotations or [{}] * len(layers), strict=True):
        if notes:
            layer["annotations"] = dict(notes)
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": described,
    }
    return json.dumps(body).encode()


def push_images(client: RegistryClient, name: str, count: int, tags: Sequence[str]) -> list[bytes]:
    """`count` images pushed into repository `name` over HTTP (a config each, one shared
    layer; manifests of distinct sizes, so `ls -l` tells them apart), `tags` on the first:
    their manifests."""
    layer = b"a layer\n"
    client.push_blob(name, layer)
    manifests = []
    for n in range(count):
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode()
        client.push_blob(name, config)
        manifests.append(image_manifest(config, [layer]) + b" " * n)
    for tag in tags:
        client.put_manifest(name, tag, manifests[0])
    return manifests


def image_index(platforms: Mapping[str, OciImage]) -> bytes:
    """The bytes of an OCI index of one image per platform, named `<os>-<arch>[-<variant>]`
    (as rootfs/ names its directories)."""
    entries = []
    for name, image in platforms.items():
        os_, arch, *variant = name.split("-")
        platform = {"os": os_, "architecture": arch} | ({"variant": variant[0]} if variant else {})
        descriptor = {
            "mediaType": OCI_MANIFEST,
            "digest": image.digest,
            "size": len(image.manifest),
        }
        entries.append(descriptor | {"platform": platform})
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


async def empty_image(repo: Repository) -> Digest:
    """An image of an empty config (`{}`) and no layers put into repo: its manifest's digest,
    for tests that need a tag to point somewhere."""
    upload = await repo.layers.upload()
    await upload.write(b"{}")
    await upload.finish(digest_bytes(b"{}"))
    return await repo.manifests.put(image_manifest(b"{}", []))


def _rootless() -> list[str]:
    return [] if os.geteuid() == 0 else ["--rootless"]


def _write_files(rootfs: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        rel = PurePosixPath(name.lstrip("/"))
        if not rel.parts or ".." in rel.parts:
            raise ValueError(f"bad image path {name!r}")
        dest = rootfs.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def _groups(files: Mapping[str, bytes], layers: int) -> list[dict[str, bytes]]:
    """Split sorted paths into `layers` contiguous groups; empty ones get a marker file
    so that no two layers are identical (identical layers would share a digest)."""
    items = sorted(files.items())
    n = len(items)
    groups = [dict(items[i * n // layers : (i + 1) * n // layers]) for i in range(layers)]
    for i, group in enumerate(groups):
        if not group:
            group[f".regfs-layer-{i}"] = f"layer {i}\n".encode()
    return groups


def new_image(layout_dir: Path, tag: str) -> str:
    """An empty image `layout_dir:tag` (the layout made if needed); returns that reference."""
    image = f"{layout_dir}:{tag}"
    if not (layout_dir / "oci-layout").exists():
        run(["umoci", "init", "--layout", str(layout_dir)])
    run(["umoci", "new", "--image", image])
    return image


def push_with_tools(repo: Path, layout: Path, image: OciImage) -> None:
    """Push `image` into a mounted repository with cp and mv alone, as a user would: every
    other blob by `cp` into uploads/ then `mv` to layers/<digest>, the rest by `cp` to
    uploads/<digest>, then the manifest by `cp` to tags/v1."""
    for i, digest in enumerate(image.blob_digests):
        src = blob_path(layout, digest)
        if i % 2 == 0:
            run(["cp", str(src), str(repo / "uploads" / f"part{i}")])
            run(["mv", str(repo / "uploads" / f"part{i}"), str(repo / "layers" / digest)])
        else:
            run(["cp", str(src), str(repo / "uploads" / digest)])
    run(["cp", str(blob_path(layout, image.digest)), str(repo / "tags" / "v1")])


def build_image(
    layout_dir: Path, tag: str, files: Mapping[str, bytes], layers: int = 2
) -> OciImage:
    """Build `layout_dir:tag` (created if needed) with `files` spread over `layers` layers.

    Uses `umoci unpack` + `repack --refresh-bundle` once per layer rather than
    `umoci insert`: umoci 0.4.7's insert writes tar streams without padding or the
    end-of-archive blocks (GNU tar calls them truncated); repack writes proper tars.
    Orphans of the intermediate manifests and configs are removed with `umoci gc`, so the
    layout's blobs are exactly the image's. Digests differ between builds (timestamps).
    """
    if layers < 1:
        raise ValueError("an image needs at least one layer")
    layout_dir = Path(layout_dir)
    image = new_image(layout_dir, tag)
    with tempfile.TemporaryDirectory(prefix="regfs-umoci-") as tmp:
        bundle = Path(tmp) / "bundle"
        run(["umoci", "unpack", *_rootless(), "--image", image, str(bundle)])
        for i, group in enumerate(_groups(files, layers)):
            _write_files(bundle / "rootfs", group)
            run(
                [
                    "umoci", "repack", "--refresh-bundle",
                    "--history.created_by", f"regfs test layer {i}",
                    "--image", image, str(bundle),
                ]
            )  # fmt: skip
    run(["umoci", "gc", "--layout", str(layout_dir)])
    built = read_oci_layout(layout_dir, tag)
    log.info("built %s: %s, %d layers", image, built.digest, len(built.layer_digests))
    return built


def build_large_image(
    layout_dir: Path, tag: str, size: int, seed: int = 0, path: str = "big.bin"
) -> OciImage:
    """An image whose first layer holds `size` random bytes at `path` (so its gzip blob is
    slightly over `size` bytes), plus a small second layer; content is fixed by `seed`."""
    data = random.Random(seed).randbytes(size)
    return build_image(layout_dir, tag, {path: data, "zz/small.txt": b"small\n"}, layers=2)


# --------------------------------------------------------------------------- skopeo


def _skopeo_copy(src: str, dest: str, flags: list[str], timeout: float) -> None:
    # --insecure-policy: never depend on the host's /etc/containers/policy.json (it may be
    # missing, or reject unsigned images); tests copy their own images only.
    run(["skopeo", "--insecure-policy", "copy", "--quiet", *flags, src, dest], timeout=timeout)


def skopeo_push(
    layout_dir: Path,
    tag: str,
    registry_host: str,
    repo: str,
    dest_tag: str | None = None,
    preserve_digests: bool = True,
    timeout: float = 120.0,
) -> None:
    """`skopeo copy oci:DIR:TAG docker://HOST/REPO:DEST_TAG` over plain HTTP.

    With `preserve_digests`, skopeo fails rather than rewrite the manifest; skopeo 1.9
    keeps umoci's OCI manifests byte for byte even without the flag.
    """
    flags = ["--dest-tls-verify=false"] + (["--preserve-digests"] if preserve_digests else [])
    _skopeo_copy(
        f"oci:{layout_dir}:{tag}",
        f"docker://{registry_host}/{repo}:{dest_tag or tag}",
        flags,
        timeout,
    )


def skopeo_pull(
    registry_host: str,
    repo: str,
    tag: str,
    layout_dir: Path,
    dest_tag: str | None = None,
    preserve_digests: bool = True,
    timeout: float = 120.0,
) -> OciImage:
    """`skopeo copy docker://HOST/REPO:TAG oci:DIR:DEST_TAG` over plain HTTP; reads it back."""
    flags = ["--src-tls-verify=false"] + (["--preserve-digests"] if preserve_digests else [])
    _skopeo_copy(
        f"docker://{registry_host}/{repo}:{tag}",
        f"oci:{layout_dir}:{dest_tag or tag}",
        flags,
        timeout,
    )
    return read_oci_layout(layout_dir, dest_tag or tag)
