"""A real S3 server on loopback for tests: moto in server mode (docs/s3.md), with boto3
clients and buckets on it.

moto accepts any credentials and keeps everything in memory: a bucket made by one test is
gone when the server stops. `s3_environment` is what a regfs daemon (a subprocess) needs to
find the server through the standard AWS chain, with no ~/.aws file of the machine read.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import boto3
import httpx
import pytest
from botocore.config import Config

from storage.digests import Digest, digest_bytes
from storage.registry import Repository
from support.fault_server import Seen
from support.oci import image_manifest
from support.servers import StartStop

log = logging.getLogger(__name__)

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
REGION = "us-east-1"


@dataclass(eq=False)
class MotoServer(StartStop):
    """`moto_server` on 127.0.0.1 and a free port; its log in a temp dir removed on stop."""

    startup_timeout: float = 20.0
    stop_timeout: float = 5.0
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        if self._workdir is None:
            return "<no moto log>"
        text = (self._workdir / "moto.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start and poll until it answers, with a deadline; a port taken meanwhile is
        retried on another."""
        if self._proc is not None:
            raise RuntimeError("moto server already started")
        self._workdir = Path(tempfile.mkdtemp(prefix="regfs-moto-"))
        return self.bind_and_start("moto")

    def _try_start(self) -> bool:
        assert self._workdir is not None
        with (self._workdir / "moto.log").open("wb") as logf:
            self._proc = subprocess.Popen(
                [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        self.track()
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    self._proc = None
                    self.track(False)
                    if "in use" in self.log_tail():
                        return False
                    raise RuntimeError(f"moto exited with {code} at start:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/moto-api/").status_code == 200:
                        log.info("moto pid %d on %s", self._proc.pid, self.url)
                        return True
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto not ready after {self.startup_timeout}s")
                time.sleep(0.05)  # poll interval, bounded by the deadline above

    def stop(self) -> None:
        """Terminate, wait, kill after `stop_timeout`; idempotent. `start` may follow (same
        port when free), but moto's state is gone."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self.stop_timeout)
        self.track(False)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 S3 client of this server (or of a proxy in front of it, at endpoint),
        with the test credentials and no retries of its own."""
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def new_bucket(self) -> str:
        """A new, empty bucket with a name of its own."""
        name = f"regfs-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def environment(self, home: Path) -> dict[str, str]:
        """What a daemon needs to reach this server through the standard AWS chain (and no
        AWS file of the machine's: they would point at `home`, which has none)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        }


PROFILE_KEY, PROFILE_REGION = "AKIAPROFILE", "eu-west-3"


def use_profile(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AWS chain with no key in the environment: a credentials file whose profile
    `bench` (PROFILE_KEY; `default` has another key) AWS_PROFILE picks, and its region
    (PROFILE_REGION) in the config file, both written under home. boto3's default session
    (`MotoServer.client`) has read other files already: a client made after this is
    `storage.drivers.s3.s3_client`'s, from a new session."""
    (home / "aws-credentials").write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n"
        f"[bench]\naws_access_key_id = {PROFILE_KEY}\naws_secret_access_key = p\n"
    )
    (home / "aws-config").write_text(f"[profile bench]\nregion = {PROFILE_REGION}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_PROFILE", "bench")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def signed_by_profile(seen: Seen) -> bool:
    """Whether a request through the fault proxy was signed with the profile's key and
    region (its Authorization header's credential and scope)."""
    auth = seen.authorization or ""
    return f"Credential={PROFILE_KEY}/" in auth and f"/{PROFILE_REGION}/s3/aws4_request" in auth


def registry_s3_config(server: MotoServer, bucket: str, rootdirectory: str) -> dict[str, Any]:
    """The `storage: s3:` section of a docker-registry 2.8 config for this bucket (docs/s3.md)."""
    return {
        "accesskey": ACCESS_KEY,
        "secretkey": SECRET_KEY,
        "region": REGION,
        "regionendpoint": server.url,
        "bucket": bucket,
        "rootdirectory": rootdirectory,
        "secure": False,
        "v4auth": True,
    }


_UPLOAD_CALLS = {
    "GET": "ListParts",
    "PUT": "UploadPart",
    "POST": "CompleteMultipartUpload",
    "DELETE": "AbortMultipartUpload",
}


def s3_call(seen: Seen) -> str:
    """The S3 operation a request through the fault proxy (tests/support/fault_server.py)
    was, for tests that count them."""
    if seen.method == "GET" and "list-type=2" in seen.path:
        return "ListObjects"
    if seen.method == "GET" and "uploads&" in seen.path:
        return "ListMultipartUploads"
    if "uploadId=" in seen.path:
        return _UPLOAD_CALLS.get(seen.method, seen.method)
    if seen.method == "POST" and "?delete" in seen.path:
        return "DeleteObjects"
    return {"GET": "GetObject", "HEAD": "HeadObject"}.get(seen.method, seen.method)


def bucket_keys(s3: Any, bucket: str) -> list[str]:
    """Every key in the bucket (up to 1000), as a plain S3 client lists them."""
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


async def store_image(repo: Repository, tags: Iterable[str], layer_size: int = 1000) -> Digest:
    """An image of a config and one random layer stored in repo through the storage API (no
    server: the S3 tests fill a bucket as a registry would), tagged with each of tags."""
    blobs = [b'{"os":"linux"}', os.urandom(layer_size)]
    for data in blobs:
        upload = await repo.layers.upload()
        await upload.write(data)
        await upload.finish(digest_bytes(data))
    manifest = await repo.manifests.put(image_manifest(blobs[0], blobs[1:]))
    for tag in tags:
        await repo.tags.put(tag, manifest)
    return manifest
