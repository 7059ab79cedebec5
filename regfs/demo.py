"""`make demo`: build a small registry of real OCI images, mount it, say what to try.

The images are written with storage/ (real gzip tar layers, a config with their diff_ids,
an OCI manifest and index-free tags), so `docker-registry` and `skopeo` can serve and pull
them too.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import trio

from storage.api import RegistrySource, Repository
from storage.digests import digest_bytes
from storage.manifest_format import OCI_MANIFEST

from .mountpoint import mounted_filesystem
from .sources import open_root

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
HERE = Path("demo")


def tar_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzipped tar of files, and the digest of the uncompressed tar (its diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), mtime=0), diff_id


async def push_blob(repo: Repository, data: bytes, media_type: str) -> dict[str, object]:
    digest = digest_bytes(data)
    if not await repo.layers.exists(digest):
        upload = await repo.layers.upload()
        await upload.write_at(0, data)
        await upload.finish(digest)
    return {"mediaType": media_type, "digest": str(digest), "size": len(data)}


async def push_image(
    registry: RegistrySource, name: str, tag: str, layers: list[dict[str, bytes]]
) -> None:
    repo = registry.repository(name)
    descriptors, diff_ids = [], []
    for files in layers:
        blob, diff_id = tar_layer(files)
        descriptors.append(await push_blob(repo, blob, LAYER_TYPE))
        diff_ids.append(diff_id)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": await push_blob(repo, config, CONFIG_TYPE),
            "layers": descriptors,
        },
        indent=2,
    ).encode()
    await repo.tags.put(tag, await repo.manifests.put(manifest))


async def build(root: Path) -> None:
    registry = open_root(str(root))
    base = {
        "etc/os-release": Path("/etc/os-release").read_bytes(),
        "etc/motd": b"Hello from a layer served by regfs.\n",
    }
    app = {
        "app/hello.sh": b"#!/bin/sh\necho hello from regfs\n",
        "app/data.bin": os.urandom(4 << 20),
    }
    await push_image(registry, "library/hello", "latest", [base, app])
    await push_image(registry, "library/hello", "v1", [base])
    await push_image(registry, "myorg/team/tools", "1.0", [base, {"tools/README": b"tools\n"}])


def main() -> int:
    root, mnt = (HERE / "registry").resolve(), (HERE / "mnt").resolve()
    if not root.exists():
        print(f"building a sample registry in {root}")
        trio.run(build, root)
    mnt.mkdir(parents=True, exist_ok=True)
    regfs = [sys.executable, "-m", "regfs"]
    if mounted_filesystem(str(mnt)) is not None:
        subprocess.run([*regfs, "umount", str(mnt)], check=False)
    subprocess.run([*regfs, "mount", str(root), str(mnt)], check=True)
    r = mnt / "library/hello"
    layer = json.loads((r / "tags/latest").read_bytes())["layers"][-1]["digest"]
    print(f"""
regfs has mounted the sample registry {root}
on {mnt}. Try:

  ls -R {mnt} | head -30
  cat {r}/tags/latest | python3 -m json.tool
  tar -tzvf {r}/layers/{layer}
  sha256sum {r}/layers/*
  getfattr -d {r}/tags/latest
  dd if={r}/layers/{layer} bs=1 skip=100 count=16 | xxd

Unmount with:  .venv/bin/regfs umount {mnt}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
