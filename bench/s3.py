"""`python -m bench.s3`: regfs on an S3 bucket against its peers on the same bucket, in the
same run: docker-registry 2.8 (s3 driver) and boto3's own streamed GET, on moto in server
mode (../shared/S3.md). Prints MB/s, ratios, the daemon's peak RSS, and how many S3
requests each side sent for the same work (moto's request recorder), for docs/scale-out.md.

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
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx

from .config import parse_size
from .mount import Mount
from .registry import RegistryProcess

ACCESS_KEY, SECRET_KEY, REGION = "benchkey", "benchsecret", "us-east-1"
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
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            found[operation(entry["method"], entry["url"])] += 1
        return dict(sorted(found.items()))


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


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__)
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--counted-size", type=parse_size, default=parse_size("64M"))
    parser.add_argument("--tags", type=int, default=200)
    args = parser.parse_args()
    os.environ.pop("AWS_CA_BUNDLE", None)  # the registry's 2.8 s3 driver panics on it
    work = Path(tempfile.mkdtemp(prefix="regfs-bench-s3-"))
    try:
        with moto(work) as url:
            run(work, url, args.size, args.counted_size, args.tags)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, url: str, size: int, counted: int, tags: int) -> None:
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_ENDPOINT_URL=url,
        AWS_CONFIG_FILE=str(work / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(work / "none"),
    )
    s3 = boto3.client("s3", endpoint_url=url)
    bucket = "bench"
    s3.create_bucket(Bucket=bucket)
    source = f"s3://{bucket}{ROOTDIRECTORY}"
    requests = Requests(url, work / "recording")
    results: dict[str, object] = {}
    with S3Registry(work / "unused", work / "registry", endpoint=url, bucket=bucket) as reg:
        for label, nbytes, counting in (("timed", size, False), ("counted", counted, True)):
            blob = work / f"blob-{label}"
            with blob.open("wb") as f:
                for _ in range(nbytes >> 20):
                    f.write(os.urandom(1 << 20))
            digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
            results[label] = side_by_side(
                work, source, reg, s3, bucket, blob, digest, requests if counting else None
            )
        results["listing"] = listings(work, source, reg, requests, tags)
    print(json.dumps(results, indent=2))


def side_by_side(
    work: Path,
    source: str,
    reg: S3Registry,
    s3: object,
    bucket: str,
    blob: Path,
    digest: str,
    requests: Requests | None,
) -> dict[str, object]:
    size = blob.stat().st_size
    out: dict[str, object] = {"size": size}

    def measured(name: str, fn: Callable[[], object]) -> None:
        if requests is not None:
            requests.start()
        seconds = timed(fn)
        out[name] = {"MB/s": round(mb_s(size, seconds), 1), "s": round(seconds, 2)}
        if requests is not None:
            out[name]["requests"] = requests.counts()  # type: ignore[index]

    def registry_put() -> None:
        with httpx.Client(timeout=3600) as client:
            post = client.post(f"{reg.url}/v2/peer/app/blobs/uploads/")
            location = httpx.URL(post.headers["Location"]).copy_merge_params({"digest": digest})
            with blob.open("rb") as f:
                put = client.put(str(location), content=f)
            if put.status_code != 201:
                raise RuntimeError(f"registry PUT: {put.status_code} {put.text[:200]}")

    measured("registry monolithic PUT", registry_put)
    with Mount(source, work / "mnt", work / "logs") as m:
        repo = m.path("mine", "app")
        repo.mkdir(parents=True, exist_ok=True)

        def push() -> None:
            subprocess.run(["cp", str(blob), str(repo / "uploads" / "x")], check=True)
            subprocess.run(["mv", str(repo / "uploads" / "x"), str(repo / "layers" / digest)])

        measured("regfs cp + mv", push)
    key = f"{ROOTDIRECTORY[1:]}/docker/registry/v2/blobs/sha256/{digest[7:9]}/{digest[7:]}/data"

    def boto3_get() -> None:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]  # type: ignore[attr-defined]
        while body.read(1 << 20):
            pass

    for rep in range(2):  # either side first once
        order = ("boto3", "regfs") if rep else ("regfs", "boto3")
        for side in order:
            if side == "boto3":
                measured(f"boto3 streamed GET #{rep}", boto3_get)
                continue
            with Mount(source, work / "mnt", work / "logs") as m:
                layer = m.path("mine", "app", "layers", digest)
                layer.stat()
                measured(f"regfs cold cat #{rep}", lambda layer=layer: cat(layer))
                out[f"daemon peak RSS MB #{rep}"] = round(peak_rss_mb(m.pid), 1)
    return out


def cat(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def listings(
    work: Path, source: str, reg: S3Registry, requests: Requests, tags: int
) -> dict[str, object]:
    """`ls` of a repository's tags and of the catalog vs the registry's tags/list and
    _catalog, with the S3 requests each costs."""
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    manifest += b'"config":{"mediaType":"application/vnd.oci.image.config.v1+json",'
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest += f'"digest":"{config_digest}","size":2}},"layers":[]}}'.encode()
    with httpx.Client(timeout=60) as client:
        post = client.post(f"{reg.url}/v2/many/app/blobs/uploads/")
        location = httpx.URL(post.headers["Location"]).copy_merge_params({"digest": config_digest})
        client.put(str(location), content=config)
        kind = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        for i in range(tags):
            client.put(f"{reg.url}/v2/many/app/manifests/t{i}", content=manifest, headers=kind)
        out: dict[str, object] = {"tags": tags}
        for name, path in (("tags/list", "/v2/many/app/tags/list"), ("_catalog", "/v2/_catalog")):
            requests.start()
            seconds = timed(lambda path=path: client.get(reg.url + path).raise_for_status())
            out[f"registry {name}"] = {"ms": round(seconds * 1000, 1), **requests.counts()}
    with Mount(source, work / "mnt", work / "logs") as m:
        for name, path in (("ls tags", m.path("many", "app", "tags")), ("ls /", m.mountpoint)):
            requests.start()
            seconds = timed(lambda path=path: os.listdir(path))
            out[f"regfs {name}"] = {"ms": round(seconds * 1000, 1), **requests.counts()}
    return out


if __name__ == "__main__":
    main()
