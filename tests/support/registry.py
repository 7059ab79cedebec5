"""Run the real distribution registry (Debian's `docker-registry`, v2.8) for tests.

Tests use it as the reference implementation: whatever regfs writes on disk must be served by
this registry, and whatever it writes must be readable by regfs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, Self

import httpx

from support.servers import StartStop

log = logging.getLogger(__name__)

REGISTRY_BIN = "docker-registry"
TEST_SECRET = "regfs-test-secret"
"""`http.secret` of every test registry; it keys the HMAC of upload `_state` tokens."""

V2_ROOT = Path("docker/registry/v2")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"


# --------------------------------------------------------------------------- on-disk paths


def v2_root(root: Path) -> Path:
    """`<rootdirectory>/docker/registry/v2`, where every registry path starts."""
    return Path(root) / V2_ROOT


def blob_data_path(root: Path, digest: str) -> Path:
    """`blobs/sha256/<hex[:2]>/<hex>/data` for a `sha256:<hex>` digest."""
    algo, hexdigest = digest.split(":", 1)
    return v2_root(root) / "blobs" / algo / hexdigest[:2] / hexdigest / "data"


def repo_path(root: Path, name: str) -> Path:
    """`repositories/<name>`; `name` keeps its `/` separators as nested directories."""
    return v2_root(root) / "repositories" / name


def upload_path(root: Path, name: str, uuid: str) -> Path:
    """`repositories/<name>/_uploads/<uuid>`: data, startedat, hashstates/sha256/<offset>."""
    return repo_path(root, name) / "_uploads" / uuid


# --------------------------------------------------------------------------- _state token


@dataclass(frozen=True)
class UploadState:
    """What the registry signs into an upload URL's `_state` query parameter.

    Facts from distribution v2.8.2 `registry/handlers/hmac.go` and `blobupload.go`, checked
    byte for byte against the Debian 2.8.2 binary (tests/test_harness.py):

    - The payload is Go's `json.Marshal` of struct `blobUploadState`: compact JSON with the
      keys, in this order, `Name` (repository name), `UUID`, `Offset` (integer, bytes in the
      upload so far) and `StartedAt` (a Go `time.Time`, i.e. RFC 3339 with nanoseconds and
      trailing zeros trimmed, `Z` for UTC). No `DigestAlgorithm` key: that is v3 only.
    - token = base64 **URL-safe alphabet with `=` padding** (`base64.URLEncoding`) of
      HMAC-SHA256(key = `http.secret` as bytes, msg = JSON) followed by the JSON itself
      (32 MAC bytes, then the payload). In the `Location` header it is URL-quoted (`%3D`).
    - On every request naming an upload UUID the registry decodes the token, checks the MAC
      (else 404 BLOB_UPLOAD_INVALID), parses the JSON, requires `Name` == the repository in
      the URL and `UUID` == the UUID in the URL, then resumes the upload from storage (needs
      `startedat`, else BLOB_UPLOAD_UNKNOWN) and requires `Offset` == the size of the
      upload's `data` file. Each failure answers 404 with BLOB_UPLOAD_INVALID (or
      BLOB_UPLOAD_UNKNOWN when there is no upload). On an offset mismatch the code means to
      cancel the upload, but a deferred Close runs first so the Cancel fails and, in 2.8.2,
      the upload survives untouched (tested).
    - `StartedAt` is not compared with anything: the registry re-reads `startedat` from disk.
      It only echoes it: the POST's token carries the in-memory start time with nanoseconds,
      later tokens carry `startedat` as read back from disk (whole seconds).
    - Only the MAC is verified over the bytes as sent, so any JSON that decodes to the right
      values works; `to_json` still reproduces Go's bytes so tests can compare tokens exactly.
    - If `http.secret` is unset the registry picks a random one at start (tokens then do not
      survive a restart); test registries always set `TEST_SECRET`.
    """

    name: str
    uuid: str
    offset: int
    started_at: str

    def to_json(self) -> bytes:
        """The payload as Go marshals it (compact, struct field order, UTF-8)."""
        obj = {"Name": self.name, "UUID": self.uuid, "Offset": self.offset}
        obj["StartedAt"] = self.started_at
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def go_time(t: datetime | str) -> str:
    """Format like Go's `time.Time` JSON (RFC 3339, trailing zero fraction trimmed, UTC `Z`).

    A string is passed through unchanged (e.g. a `startedat` file's contents); a naive
    datetime is taken as UTC.
    """
    if isinstance(t, str):
        return t
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    frac = f"{t.microsecond:06d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def upload_state_token(
    secret: str, name: str, uuid: str, offset: int, started_at: datetime | str
) -> str:
    """The `_state` value the registry would put in the upload URL (see `UploadState`).

    Lets a test finish over HTTP an upload written directly in storage:
    `PUT /v2/<name>/blobs/uploads/<uuid>?_state=<token>&digest=sha256:...`, where `offset`
    must equal the size of `_uploads/<uuid>/data` and `startedat` must exist.
    """
    payload = UploadState(name, uuid, offset, go_time(started_at)).to_json()
    mac = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac + payload).decode("ascii")


def parse_state_token(secret: str, token: str) -> UploadState:
    """Decode and verify a registry `_state` token (ValueError if the MAC does not match)."""
    raw = base64.urlsafe_b64decode(token)
    mac, payload = raw[:32], raw[32:]
    want = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    if len(raw) < 32 or not hmac.compare_digest(mac, want):
        raise ValueError("upload state token: bad HMAC (wrong secret or tampered)")
    obj = json.loads(payload)
    return UploadState(obj["Name"], obj["UUID"], obj["Offset"], obj["StartedAt"])


def state_from_location(location: str) -> str:
    """The (unquoted) `_state` token of an upload `Location` URL."""
    return httpx.URL(location).params["_state"]


# --------------------------------------------------------------------------- hash states


def _first_primes(n: int) -> list[int]:
    primes: list[int] = []
    k = 2
    while len(primes) < n:
        if all(k % p for p in primes):
            primes.append(k)
        k += 1
    return primes


def _icbrt(n: int) -> int:
    lo, hi = 0, 1 << (n.bit_length() // 3 + 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if mid**3 <= n else (lo, mid - 1)
    return lo


_PRIMES = _first_primes(64)
_K = [_icbrt(p << 96) & 0xFFFFFFFF for p in _PRIMES]
_IV = [math.isqrt(p << 64) & 0xFFFFFFFF for p in _PRIMES[:8]]


def _compress(h: list[int], block: bytes) -> list[int]:
    def rotr(x: int, n: int) -> int:
        return ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF

    w = list(struct.unpack(">16I", block))
    for i in range(16, 64):
        s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w.append((w[i - 16] + s0 + w[i - 7] + s1) & 0xFFFFFFFF)
    a, b, c, d, e, f, g, hh = h
    for i in range(64):
        t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[i] + w[i]
        t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))
        a, b, c, d, e, f, g, hh = (t1 + t2) & 0xFFFFFFFF, a, b, c, (d + t1) & 0xFFFFFFFF, e, f, g
    return [(x + y) & 0xFFFFFFFF for x, y in zip(h, (a, b, c, d, e, f, g, hh), strict=True)]


def go_sha256_state(data: bytes) -> bytes:
    """Go's `crypto/sha256` `MarshalBinary` after hashing `data`, computed independently.

    108 bytes: `sha\x03`, the eight chaining words (big-endian uint32) after every whole
    64-byte block, the `len % 64` pending bytes zero-padded to 64, the total length as
    big-endian uint64. This is what the registry stores in `hashstates/sha256/<len>`.
    Pure Python (about 1 MB/s): a reference for small inputs in tests only.
    """
    h = list(_IV)
    whole = len(data) - len(data) % 64
    for i in range(0, whole, 64):
        h = _compress(h, data[i : i + 64])
    pending = data[whole:].ljust(64, b"\0")
    return b"sha\x03" + struct.pack(">8I", *h) + pending + struct.pack(">Q", len(data))


# --------------------------------------------------------------------------- auth and TLS


class TLSFiles(NamedTuple):
    """PEM files for `http.tls` (and a CA bundle a client can trust: the certificate)."""

    cert: Path
    key: Path


def write_self_signed_cert(
    cert_path: Path, key_path: Path, name: str = "127.0.0.1", days: int = 2
) -> TLSFiles:
    """A self-signed RSA certificate for `name` (SAN IP 127.0.0.1 and DNS localhost), usable
    as a server certificate and as its own CA, e.g. the `rootcertbundle` of token auth."""
    # Imported here: only the auth and TLS tests need cryptography.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TLSFiles(Path(cert_path), Path(key_path))


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file with bcrypt entries (`htpasswd -Bbn`; registry 2.8 reads only bcrypt)."""
    if shutil.which("htpasswd") is None:
        raise RuntimeError("htpasswd not found: `make deb` installs apache2-utils")
    lines = [
        subprocess.run(
            ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
        ).stdout.strip()
        for user, password in users.items()
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def htpasswd_auth(path: Path, realm: str = "regfs-test") -> dict[str, Any]:
    """The `auth:` section of a registry config for Basic auth against `path`."""
    return {"htpasswd": {"realm": realm, "path": str(path)}}


def _yaml(section: Mapping[str, Any], indent: int) -> list[str]:
    """Nested mappings as YAML; scalars as JSON, which YAML reads as the same values."""
    lines = []
    for key, value in section.items():
        if isinstance(value, Mapping):
            lines.append(f"{' ' * indent}{key}:")
            lines.extend(_yaml(value, indent + 2))
        else:
            lines.append(f"{' ' * indent}{key}: {json.dumps(value)}")
    return lines


# --------------------------------------------------------------------------- the server


@dataclass(eq=False)
class RegistryServer(StartStop):
    """A `docker-registry serve` on 127.0.0.1 with the filesystem driver rooted at `root`.

    The config and log live in `workdir` (a new temp dir, removed on stop, if not given),
    never inside `root`, so the storage tree holds only what the registry writes.
    Upload purging is off so tests' hand-made uploads are not deleted behind their back.

    Options: `auth`, the config's `auth:` section as a mapping (e.g. `htpasswd_auth(path)` or
    `TokenServer.registry_auth()`), `tls`, a certificate and key for `http.tls` (the
    server then speaks https only: `url` says so), and `s3`, the `storage: s3:` section
    (support.s3.registry_s3_config) to keep the storage in a bucket instead of `root`: blobs
    are then proxied, not redirected, and the registry starts without `AWS_CA_BUNDLE`, with
    which its 2.8 s3 driver panics (docs/s3.md).
    """

    root: Path
    workdir: Path | None = None
    secret: str = TEST_SECRET
    log_level: str = "info"
    startup_timeout: float = 20.0
    stop_timeout: float = 5.0
    port: int = 0
    auth: Mapping[str, Any] | None = None
    tls: TLSFiles | None = None
    s3: Mapping[str, Any] | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _own_workdir: bool = field(default=False, init=False, repr=False)

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, as skopeo's `docker://HOST/REPO:TAG` wants it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "config.yml"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "registry.log"

    def config_text(self) -> str:
        # JSON strings are valid YAML scalars: safe quoting for any path or secret.
        q = json.dumps
        tls = {"certificate": str(self.tls.cert), "key": str(self.tls.key)} if self.tls else None
        if self.s3 is None:
            store = ["  filesystem:", f"    rootdirectory: {q(str(self.root))}"]
        else:
            store = _yaml({"s3": self.s3, "redirect": {"disable": True}}, 2)
        return "\n".join(
            [
                "version: 0.1",
                "log:",
                f"  level: {self.log_level}",
                "storage:",
                *store,
                "  delete:",
                "    enabled: true",
                "  maintenance:",
                "    uploadpurging:",
                "      enabled: false",
                "http:",
                f"  addr: {self.host}",
                f"  secret: {q(self.secret)}",
                *_yaml({"tls": tls} if tls else {}, 2),
                *_yaml({"auth": self.auth} if self.auth else {}, 0),
                "",
            ]
        )

    def range_gets(self, repo: str, digest: str, at_least: int = 0) -> list[int]:
        """Body sizes of the 206 answers to GETs of blob `digest` so far (the access log),
        once there are `at_least` and the log has stopped growing: a request is logged
        just after its answer. Polled, until a deadline."""
        pattern = re.compile(rf'"GET /v2/{repo}/blobs/{digest} HTTP/[\d.]+" 206 (\d+)')
        size, deadline = -1, time.monotonic() + 10
        while True:
            text = self.log_path.read_text(errors="replace")
            found = [int(n) for n in pattern.findall(text)]
            if (len(found) >= at_least and len(text) == size) or time.monotonic() > deadline:
                return found
            size = len(text)
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return "<no registry log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start and wait until `GET /v2/` answers 200; retry on a port taken meanwhile."""
        if self._proc is not None:
            raise RuntimeError("registry already started")
        if shutil.which(REGISTRY_BIN) is None:
            raise RuntimeError(
                f"{REGISTRY_BIN} not found: `make deb` installs it, "
                "or deselect these tests with -m 'not registry'"
            )
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="regfs-registry-"))
            self._own_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.workdir.resolve().is_relative_to(self.root):
            raise ValueError(f"workdir {self.workdir} must not be inside the storage root")
        return self.bind_and_start("registry")

    def _try_start(self) -> bool:
        """One start attempt; False only when the port was taken by someone else."""
        self.config_path.write_text(self.config_text())
        env = None
        if self.s3 is not None:
            env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        with self.log_path.open("wb") as logf:
            self._proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
        self.track()
        log.info("registry pid %d on %s, root %s", self._proc.pid, self.host, self.root)
        deadline = time.monotonic() + self.startup_timeout
        # Readiness only: a test server's self-signed certificate is checked by the tests.
        ready = (200, 401) if self.auth else (200,)
        with httpx.Client(timeout=1.0, verify=not self.tls) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    self._proc = None
                    self.track(False)
                    tail = self.log_tail()
                    if "address already in use" in tail:
                        log.warning("port %d taken, retrying", self.port)
                        return False
                    raise RuntimeError(f"registry exited with {code} at start:\n{tail}")
                # Both: a 200 alone could come from another process that won the port.
                if f"listening on {self.host}" in self.log_tail(200):
                    try:
                        if client.get(f"{self.url}/v2/").status_code in ready:
                            return True
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"registry not ready after {self.startup_timeout}s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)  # poll interval, bounded by the deadline above

    def stop(self) -> None:
        """Terminate, wait, kill after `stop_timeout`; idempotent. `start` may follow
        (same root and port when free), e.g. to check a restarted registry reads the tree."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("registry pid %d ignored SIGTERM, killing", proc.pid)
                    proc.kill()
                    proc.wait(self.stop_timeout)
            log.info("registry pid %d stopped (%s)", proc.pid, proc.returncode)
        self.track(False)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir, self._own_workdir = None, False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> RegistryClient:
        return RegistryClient(self.url)


def running_registry(
    root: Path, workdir: Path | None = None, **options: Any
) -> Iterator[RegistryServer]:
    """Generator for a pytest fixture: `yield from running_registry(tmp_path / "root")`;
    `options` are RegistryServer's (`auth=`, `tls=`, ...)."""
    with RegistryServer(root, workdir=workdir, **options) as server:
        yield server


def started_registries(tmp_path: Path) -> Iterator[Callable[..., RegistryServer]]:
    """Generator for a pytest fixture: yields start(**options) → a started RegistryServer on
    a fresh root under tmp_path; all are stopped when the generator ends."""
    with ExitStack() as stack:
        count = 0

        def start(**options: object) -> RegistryServer:
            nonlocal count
            count += 1
            server = RegistryServer(
                tmp_path / f"root{count}", workdir=tmp_path / f"registry{count}", **options
            )
            return stack.enter_context(server)

        yield start


# --------------------------------------------------------------------------- HTTP helpers


class RegistryHTTPError(AssertionError):
    """An unexpected status, with the registry's error body for the test report."""


class FetchedManifest(NamedTuple):
    body: bytes
    media_type: str
    digest: str


def _expect(resp: httpx.Response, *codes: int) -> httpx.Response:
    if resp.status_code not in codes:
        raise RegistryHTTPError(
            f"{resp.request.method} {resp.request.url}: {resp.status_code}, "
            f"wanted {codes}: {resp.text[:500]}"
        )
    return resp


@dataclass
class RegistryClient:
    """Small synchronous wrappers over the distribution HTTP API, for assertions."""

    url: str
    timeout: float = 30.0

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """Any request; `url` may be a path (`/v2/...`) or a full `Location`."""
        if url.startswith("/"):
            url = self.url + url
        with httpx.Client(timeout=self.timeout) as client:
            return client.request(method, url, **kw)

    def start_upload(self, name: str) -> tuple[str, str]:
        """POST a new upload: (Location, UUID)."""
        resp = _expect(self.request("POST", f"/v2/{name}/blobs/uploads/"), 202)
        return resp.headers["Location"], resp.headers["Docker-Upload-UUID"]

    def patch_chunk(self, location: str, data: bytes, start: int) -> str:
        """PATCH one chunk at `start`; returns the next Location (with the new `_state`)."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(data) - 1}",
        }
        resp = _expect(self.request("PATCH", location, content=data, headers=headers), 202)
        return resp.headers["Location"]

    def finish_upload(self, location: str, digest: str, data: bytes = b"") -> httpx.Response:
        """PUT `location?digest=` (with an optional last chunk); expects 201."""
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        return _expect(self.request("PUT", str(url), content=data, headers=headers), 201)

    def push_blob(self, name: str, data: bytes) -> str:
        """Monolithic upload (POST then PUT with the body); returns the digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        location, _ = self.start_upload(name)
        self.finish_upload(location, digest, data)
        return digest

    def get_blob(self, name: str, digest: str) -> bytes:
        return _expect(self.request("GET", f"/v2/{name}/blobs/{digest}"), 200).content

    def get_manifest(
        self, name: str, ref: str, accept: tuple[str, ...] | str = MANIFEST_TYPES
    ) -> FetchedManifest:
        """GET a manifest by tag or digest: (bytes, Content-Type, Docker-Content-Digest)."""
        accept = accept if isinstance(accept, str) else ", ".join(accept)
        resp = _expect(
            self.request("GET", f"/v2/{name}/manifests/{ref}", headers={"Accept": accept}), 200
        )
        return FetchedManifest(
            resp.content, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]
        )

    def put_manifest(
        self, name: str, ref: str, body: bytes, media_type: str = OCI_MANIFEST
    ) -> None:
        """PUT a manifest by tag or digest (201)."""
        resp = self.request(
            "PUT", f"/v2/{name}/manifests/{ref}", content=body, headers={"Content-Type": media_type}
        )
        _expect(resp, 201)

    def tags(self, name: str) -> list[str]:
        resp = _expect(self.request("GET", f"/v2/{name}/tags/list"), 200)
        return resp.json().get("tags") or []

    def catalog(self, n: int = 1000) -> list[str]:
        resp = _expect(self.request("GET", "/v2/_catalog", params={"n": n}), 200)
        return resp.json().get("repositories") or []
