"""`python -m bench.s3`: regfs on an S3 bucket against its peers on the same bucket, in the
same run: docker-registry 2.8 (s3 driver) and boto3's own streamed GET, on moto in server
mode (docs/s3.md). Prints MB/s, ratios, the daemon's peak RSS, and how many S3
requests each side sent for the same work (moto's request recorder), for docs/scale-out.md.

`--before DIR` also mounts with the `storage/` and `regfs/` of DIR (an earlier tree:
`git archive REV storage regfs | tar -x -C DIR`), interleaved with the current one, so that
a change is measured before and after in one run, on one load.

moto reads a whole object for every ranged GET and UploadPartCopy range, and runs on the
same two cores as everything else: its figures bound both sides alike, not S3's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx

from storage.digests import Digest
from storage.paths import BlobData

from .config import parse_size
from .measure import MB, BenchError, mb_per_s, median, run, sides
from .mount import Mount
from .registry import RegistryProcess
from .root import Root

ACCESS_KEY, SECRET_KEY, REGION = "benchkey", "benchsecret", "us-east-1"
RSS_PART, RSS_LAYER = 256 << 20, 1 << 30  # the streamed RSS side's layers (streamed_rss)
ROOTDIRECTORY = "/regroot"
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")


@dataclass(eq=False)
class S3Registry(RegistryProcess):
    """The bench's registry, its storage in the bucket instead of a root (blobs proxied)."""

    endpoint: str = ""
    bucket: str = ""

    def _config(self) -> str:
        q = json.dumps
        return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  s3:
    accesskey: {ACCESS_KEY}
    secretkey: {SECRET_KEY}
    region: {REGION}
    regionendpoint: {q(self.endpoint)}
    bucket: {q(self.bucket)}
    rootdirectory: {ROOTDIRECTORY}
    secure: false
    v4auth: true
  redirect:
    disable: true
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
  secret: regfs-bench
"""


@contextlib.contextmanager
def moto(workdir: Path) -> Iterator[str]:
    """moto_server with its request recorder on (off until `Requests` starts it)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        number = s.getsockname()[1]
    env = dict(os.environ, MOTO_ENABLE_RECORDING="1")
    env["MOTO_RECORDER_FILEPATH"] = str(workdir / "recording")
    url = f"http://127.0.0.1:{number}"
    with (workdir / "moto.log").open("wb") as log:
        proc = subprocess.Popen(
            [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(number)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/moto-api/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.05)
        httpx.post(f"{url}/moto-api/recorder/stop-recording")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


class Requests:
    """S3 requests moto saw between start() and counts(), by operation (few bytes only:
    the recorder keeps every body)."""

    def __init__(self, url: str, recording: Path) -> None:
        self.url, self.recording = url, recording

    def start(self) -> None:
        httpx.post(f"{self.url}/moto-api/recorder/reset-recording")
        httpx.post(f"{self.url}/moto-api/recorder/start-recording")

    def counts(self) -> dict[str, int]:
        httpx.post(f"{self.url}/moto-api/recorder/stop-recording")
        found: collections.Counter[str] = collections.Counter()
        for entry in json_objects(self.recording.read_text()):
            found[operation(entry["method"], entry["url"])] += 1
        return dict(sorted(found.items()))


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of moto's recording, one after another: its server threads append
    an entry and its newline in separate writes, so two entries may share a line."""
    decoder, at = json.JSONDecoder(), 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return
        entry, at = decoder.raw_decode(text, at)
        yield entry


def operation(method: str, url: str) -> str:
    """The S3 operation of a request, from its method and query (path-style URLs)."""
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    path = urlsplit(url).path.strip("/")
    if "uploads" in query:
        return "ListMultipartUploads" if method == "GET" else "CreateMultipartUpload"
    if "uploadId" in query:
        return {
            "PUT": "UploadPart",
            "GET": "ListParts",
            "POST": "CompleteMultipartUpload",
            "DELETE": "AbortMultipartUpload",
        }[method]
    if "delete" in query:
        return "DeleteObjects"
    if "/" not in path:
        return {"GET": "ListObjects", "HEAD": "HeadBucket"}.get(method, method + " bucket")
    return {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject/Copy"}.get(
        method, "DeleteObject" if method == "DELETE" else method
    )


def seconds_of(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


@dataclass
class Setup:
    """moto, a bucket, the registry on it, and what a mount of it needs."""

    work: Path
    url: str
    s3: Any
    bucket: str
    registry: S3Registry
    requests: Requests

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}{ROOTDIRECTORY}"

    @contextlib.contextmanager
    def mount(self, code: Path | None = None) -> Iterator[Mount]:
        """A fresh mount of the bucket; with code, its daemon runs code's storage/ and
        regfs/ (PYTHONPATH, which `python -P` still reads) instead of this tree's."""
        saved = os.environ.get("PYTHONPATH")
        if code is not None:
            os.environ["PYTHONPATH"] = str(code)
        try:
            mount = Mount(self.source, self.work / "mnt", self.work / "logs").start()
        finally:
            os.environ.pop("PYTHONPATH", None)
            if saved is not None:
                os.environ["PYTHONPATH"] = saved
        try:
            yield mount
        finally:
            mount.stop()


@contextlib.contextmanager
def setup(work: Path) -> Iterator[Setup]:
    """moto on loopback, a bucket, docker-registry 2.8 on it; the AWS chain of the mounts
    started meanwhile points at them (and at no AWS file of this machine)."""
    saved = dict(os.environ)
    os.environ.pop("AWS_CA_BUNDLE", None)  # the registry's 2.8 s3 driver panics on it
    try:
        with moto(work) as url:
            os.environ.update(
                AWS_ACCESS_KEY_ID=ACCESS_KEY,
                AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                AWS_DEFAULT_REGION=REGION,
                AWS_ENDPOINT_URL=url,
                AWS_CONFIG_FILE=str(work / "none"),
                AWS_SHARED_CREDENTIALS_FILE=str(work / "none"),
            )
            s3 = boto3.client("s3", endpoint_url=url)
            s3.create_bucket(Bucket="bench")
            registry = S3Registry(work / "unused", work / "registry", endpoint=url, bucket="bench")
            with registry:
                yield Setup(work, url, s3, "bench", registry, Requests(url, work / "recording"))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def random_blob(path: Path, size: int) -> str:
    """A file of size random bytes; its digest."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(max(size >> 20, 1)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    return "sha256:" + digest.hexdigest()


def renewed(path: Path) -> str:
    """Give the file new first bytes; its new digest."""
    with path.open("r+b") as f:
        f.write(os.urandom(32))
        f.seek(0)
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def registry_put(env: Setup, blob: Path, digest: str) -> float:
    """Seconds of a monolithic POST + PUT of blob through the registry."""
    with httpx.Client(timeout=3600) as client:
        start = time.monotonic()
        post = client.post(f"{env.registry.url}/v2/peer/app/blobs/uploads/")
        location = httpx.URL(post.headers["Location"]).copy_merge_params({"digest": digest})
        with blob.open("rb") as f:
            put = client.put(str(location), content=f)
        if put.status_code != 201:
            raise BenchError(f"registry PUT: {put.status_code} {put.text[:200]}")
        return time.monotonic() - start


def mount_push(env: Setup, blob: Path, digest: str, code: Path | None) -> float:
    """Seconds of `cp` to uploads/ and `mv` to layers/ through a fresh mount."""
    with env.mount(code) as m:
        repo = m.path("mine", "app")
        repo.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        run(["cp", blob, repo / "uploads" / "x"])
        run(["mv", repo / "uploads" / "x", repo / "layers" / digest])
        return time.monotonic() - start


def mount_cat(env: Setup, digest: str, code: Path | None) -> tuple[float, float]:
    """Seconds of a cold `cat` of the layer through a fresh mount, and the daemon's peak
    RSS (MB) after it."""
    with env.mount(code) as m:
        layer = m.path("mine", "app", "layers", digest)
        layer.stat()
        seconds = seconds_of(lambda: run(["cat", layer]))
        return seconds, m.status("VmHWM") / MB


def local_cat(env: Setup, blob: Path, digest: str) -> float:
    """Seconds of a cold `cat` of the same bytes through a fresh mount of a local root (the
    filesystem driver, the file in the page cache): what FUSE and the daemon's request path
    cost on this load, without S3."""
    root = Root(env.work / "local-root", env.work)
    data = root.path(BlobData(Digest.parse(digest)))
    data.parent.mkdir(parents=True, exist_ok=True)
    os.link(blob, data)
    root.link("local/app", Digest.parse(digest))
    try:
        with Mount(root.root, env.work / "mnt", env.work / "logs") as m:
            layer = m.path("local", "app", "layers", digest)
            layer.stat()
            return seconds_of(lambda: run(["cat", layer]))
    finally:
        shutil.rmtree(root.root)


def blob_key(digest: str) -> str:
    hexdigest = digest.removeprefix("sha256:")
    return f"{ROOTDIRECTORY[1:]}/docker/registry/v2/blobs/sha256/{hexdigest[:2]}/{hexdigest}/data"


def streamed_rss(env: Setup, work: Path, size: int) -> dict[str, object]:
    """The daemon's peak RSS while one `cat` streams layers of size bytes in all through a
    fresh mount: layers of up to 1 GiB (moto fails to complete a 4 GiB multipart upload:
    500), each a 256 MiB part of random bytes repeated by UploadPartCopy in moto (nothing of
    that size on disk), its digest computed here as the repetitions pass by."""
    part = min(size, RSS_PART)
    repeats = max(1, min(size, RSS_LAYER) // part)
    names = [
        rss_layer(env, work / "rss-part", part, repeats)
        for _ in range(size // (part * repeats) or 1)
    ]
    with env.mount() as m:
        layers = [m.path("mine", "app", "layers", name) for name in names]
        for layer in layers:
            layer.stat()
        seconds = seconds_of(lambda: run(["cat", *layers]))
        peak = m.status("VmHWM") / MB
    streamed = len(names) * repeats * part
    return {
        "size": streamed,
        "layers": len(names),
        "MB/s": round(mb_per_s(streamed, seconds), 1),
        "daemon peak RSS MB": round(peak, 1),
    }


def rss_layer(env: Setup, piece: Path, part: int, repeats: int) -> str:
    """A layer of `repeats` copies of a new random part, linked into mine/app; its digest."""
    random_blob(piece, part)
    env.s3.upload_file(str(piece), env.bucket, "rss-part")
    digest = hashlib.sha256()
    for _ in range(repeats):
        with piece.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    piece.unlink()
    name = "sha256:" + digest.hexdigest()
    key = blob_key(name)
    upload = env.s3.create_multipart_upload(Bucket=env.bucket, Key=key)["UploadId"]
    parts = [
        {
            "PartNumber": n,
            "ETag": env.s3.upload_part_copy(
                Bucket=env.bucket,
                Key=key,
                UploadId=upload,
                PartNumber=n,
                CopySource={"Bucket": env.bucket, "Key": "rss-part"},
            )["CopyPartResult"]["ETag"],
        }
        for n in range(1, repeats + 1)
    ]
    env.s3.complete_multipart_upload(
        Bucket=env.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
    )
    link = f"{ROOTDIRECTORY[1:]}/docker/registry/v2/repositories/mine/app/_layers/"
    env.s3.put_object(
        Bucket=env.bucket, Key=f"{link}sha256/{digest.hexdigest()}/link", Body=name.encode()
    )
    return name


def boto3_get(env: Setup, digest: str) -> float:
    """Seconds of boto3's own streamed GET of the same object."""
    key = blob_key(digest)

    def get() -> None:
        body = env.s3.get_object(Bucket=env.bucket, Key=key)["Body"]
        while body.read(1 << 20):
            pass

    return seconds_of(get)


def main() -> None:
    """Figures for docs/scale-out.md, as JSON: MB/s, peak RSS and S3 requests per side."""
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--counted-size", type=parse_size, default=parse_size("32M"))
    parser.add_argument(
        "--rss-size",
        type=parse_size,
        default=parse_size("4G"),
        help="size of the layer streamed for the daemon's peak RSS (0: none)",
    )
    parser.add_argument("--tags", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each timed side")
    parser.add_argument("--listing-reps", type=int, default=9, help="repetitions of ls")
    parser.add_argument("--before", type=Path, help="an earlier tree's storage/ and regfs/")
    parser.add_argument("--listings-only", action="store_true", help="only the ls side")
    args = parser.parse_args()
    codes: dict[str, Path | None] = {"": None}
    if args.before is not None:
        codes["before: "] = args.before.resolve()
    work = Path(tempfile.mkdtemp(prefix="regfs-bench-s3-"))
    try:
        with setup(work) as env:
            results: dict[str, Any] = {}
            for label, size, counted in (
                ("timed", args.size, False),
                ("counted", args.counted_size, True),
            )[: 0 if args.listings_only else 2]:
                reps = args.reps if not counted else 1
                results[label] = side_by_side(env, work / label, size, counted, reps, codes)
            results["listing"] = listings(env, args.tags, args.listing_reps, codes)
            if args.rss_size and not args.listings_only:
                try:
                    results["streamed"] = streamed_rss(env, work, args.rss_size)
                except Exception as exc:  # the figures above are kept, and printed
                    results["streamed"] = {"error": repr(exc)[:500]}
        if args.listings_only:
            print(json.dumps(results, indent=2))
            return
        results["targets"] = {
            f"{name}{target}": value
            for name in codes
            for target, value in targets(
                results["timed"], results["listing"], results.get("streamed"), name
            ).items()
        }
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def targets(
    timed: dict[str, Any], listing: dict[str, Any], streamed: dict[str, Any] | None, name: str
) -> dict[str, object]:
    """The issue's targets for the tree labelled name: medians, ratios, met or not."""

    def mb(prefix: str) -> float:
        return median([v["MB/s"] for k, v in timed.items() if k.startswith(prefix)])

    def faster(regfs: str, registry: str) -> dict[str, object]:
        ratio = listing[f"registry {registry}"]["ms"] / listing[f"{name}regfs {regfs}"]["ms"]
        return {"ratio": round(ratio, 2), "met": ratio >= 1}

    read = mb(f"{name}regfs cold cat") / mb("boto3 streamed GET")
    fuse = mb(f"{name}regfs cold cat") / mb("local root cold cat")
    push = mb(f"{name}regfs cp + mv") / mb("registry monolithic PUT")
    rss = max(v for k, v in timed.items() if k.startswith(f"{name}daemon peak RSS"))
    streaming = {}
    if streamed is not None and "error" not in streamed and not name:
        peak = streamed["daemon peak RSS MB"]
        what = f"daemon peak RSS streaming {streamed['size'] / 2**30:.1f} GiB (< 150 MB)"
        streaming[what] = {"MB": peak, "met": peak < 150}
    return {
        **streaming,
        "cold read vs boto3 GET (>= 0.9x)": {"ratio": round(read, 2), "met": read >= 0.9},
        "cold read vs the same through a local root (no target)": {"ratio": round(fuse, 2)},
        "cp + mv vs registry PUT (>= 1.5x)": {"ratio": round(push, 2), "met": push >= 1.5},
        "daemon peak RSS (< 150 MB)": {"MB": rss, "met": rss < 150},
        "ls tags vs tags/list (>= 1x)": faster("ls tags", "tags/list"),
        "ls / vs _catalog (>= 1x)": faster("ls /", "_catalog"),
    }


def side_by_side(
    env: Setup, blob: Path, size: int, counted: bool, reps: int, codes: dict[str, Path | None]
) -> dict[str, object]:
    """Each side reps times, interleaved (either side first in turn), each regfs side once
    per tree in codes; beside boto3's GET, the same bytes through a local root's mount."""
    digest = random_blob(blob, size)
    out: dict[str, object] = {"size": size}

    def measured(name: str, fn: Callable[[], float | tuple[float, float]]) -> None:
        if counted:
            env.requests.start()
        result = fn()
        seconds, peak = result if isinstance(result, tuple) else (result, None)
        found: dict[str, object] = {"MB/s": round(mb_per_s(size, seconds), 1)}
        if counted:
            found["requests"] = env.requests.counts()
        out[name] = found
        if peak is not None:
            out[name.replace("regfs cold cat", "daemon peak RSS MB")] = round(peak, 1)

    measured("registry monolithic PUT", lambda: registry_put(env, blob, digest))
    for name, code in codes.items():
        digest = renewed(blob)  # each push a blob the bucket does not hold yet
        measured(
            f"{name}regfs cp + mv",
            lambda code=code, digest=digest: mount_push(env, blob, digest, code),
        )
    for rep in range(reps):
        for side in sides(rep):
            if side == "peer":
                measured(f"boto3 streamed GET #{rep}", lambda: boto3_get(env, digest))
                if not counted:
                    measured(f"local root cold cat #{rep}", lambda: local_cat(env, blob, digest))
                continue
            for name, code in codes.items():
                measured(
                    f"{name}regfs cold cat #{rep}",
                    lambda code=code: mount_cat(env, digest, code),
                )
    blob.unlink()
    return out


def listings(env: Setup, tags: int, reps: int, codes: dict[str, Path | None]) -> dict[str, object]:
    """`ls` of a repository's tags and of the catalog (each through a fresh mount, cold) vs
    the registry's tags/list and _catalog: median ms of reps, and the S3 requests of one."""
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    url = env.registry.url
    out: dict[str, object] = {"tags": tags}
    timings: dict[str, list[float]] = collections.defaultdict(list)
    counts: dict[str, dict[str, int]] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        env.requests.start()
        timings[name].append(seconds_of(fn) * 1000)
        counts[name] = env.requests.counts()

    with httpx.Client(timeout=60) as client:
        post = client.post(f"{url}/v2/many/app/blobs/uploads/")
        location = httpx.URL(post.headers["Location"]).copy_merge_params({"digest": config_digest})
        client.put(str(location), content=config).raise_for_status()
        kind = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        for i in range(tags):
            client.put(f"{url}/v2/many/app/manifests/t{i}", content=manifest, headers=kind)
        for rep in range(reps):
            for side in sides(rep):
                if side == "peer":
                    for name, path in (
                        ("tags/list", "/v2/many/app/tags/list"),
                        ("_catalog", "/v2/_catalog"),
                    ):
                        timed(
                            f"registry {name}",
                            lambda path=path: client.get(url + path).raise_for_status(),
                        )
                    continue
                for label, code in codes.items():
                    for name, parts, settle in (
                        ("ls tags", ("many", "app", "tags"), 0.0),
                        ("ls /", (), 0.0),
                        # What the mount's own stats at start no longer show (DIR_SEEN).
                        ("ls tags 1.5 s after the mount", ("many", "app", "tags"), 1.5),
                    ):
                        with env.mount(code) as m:
                            where = m.path(*parts)
                            time.sleep(settle)
                            timed(f"{label}regfs {name}", lambda where=where: os.listdir(where))
    for name, ms in timings.items():
        out[name] = {"ms": round(median(ms), 1), "each": [round(t, 1) for t in ms], **counts[name]}
    return out


if __name__ == "__main__":
    main()
