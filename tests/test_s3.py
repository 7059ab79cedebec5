"""An S3 bucket as the source, against the real parts: moto in server mode, docker-registry
2.8 with its s3 driver on the same bucket, skopeo, and regfs mounted with the real command
line (`regfs mount s3://BUCKET/PREFIX`).

- What skopeo pushed through the registry, the mount reads exactly, blob for blob.
- What `cp`/`mv` push through the mount, skopeo pulls from the registry, identical.
- xattrs, rmdir and `rm -r` of a repository as on a storage root (SPEC §3, §6, §7).
- `regfs check` and `purge-uploads` work on the bucket; purge aborts multipart uploads.
- Bad input: a missing bucket or wrong credentials refuse the mount in one line; a server
  throttling (503 SlowDown) is retried, then, like one gone mid-read, EIO for that call,
  and the daemon lives on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import pytest
import trio
from support.fault_server import Fault, FaultServer
from support.mounts import Mount, is_mounted, parse_getfattr, regfs, wait_until
from support.oci import blob_path, build_image, push_with_tools, run, skopeo_pull, skopeo_push
from support.registry import OCI_MANIFEST, TEST_SECRET, RegistryServer, upload_state_token
from support.s3 import (
    MotoServer,
    bucket_keys,
    registry_s3_config,
    s3_call,
    signed_by_profile,
    store_image,
    use_profile,
)
from support.tools import digest_of, errno_of, ls, open_errno, sha256sum
from support.uploads import new_repo, uuid_of

from storage.digests import digest_bytes
from storage.drivers.s3 import S3Driver, s3_client
from storage.registry import Registry

pytestmark = [pytest.mark.mount, pytest.mark.registry]

ROOTDIRECTORY = "/regroot"
SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
FILES = {
    "etc/regfs/hello.txt": b"hello from an S3 bucket\n",
    "usr/share/regfs/data.bin": os.urandom(300_000),
    "opt/app/run.sh": b"#!/bin/sh\necho regfs\n",
}


@pytest.fixture
def aws_env(moto_server: MotoServer, tmp_path: Path, monkeypatch) -> None:
    """The standard AWS chain of the daemons started here points at moto, and at no AWS
    file of this machine."""
    for name, value in moto_server.environment(tmp_path).items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_registry(
    moto_server: MotoServer, s3_bucket: str, tmp_path: Path
) -> Iterator[RegistryServer]:
    """docker-registry 2.8 with its s3 driver on the test's bucket, under /regroot."""
    config = registry_s3_config(moto_server, s3_bucket, ROOTDIRECTORY)
    with RegistryServer(tmp_path / "unused-root", workdir=tmp_path / "registry", s3=config) as r:
        yield r


def source(bucket: str) -> str:
    return f"s3://{bucket}{ROOTDIRECTORY}"


def test_registry_push_read_through_the_mount(tmp_path, aws_env, s3_bucket, s3_registry, mount):
    """skopeo pushes through the registry into the bucket; the mount lists the repository
    and reads its manifest, config and layers byte for byte (cat, sha256sum)."""
    image = build_image(tmp_path / "layout", "v1", FILES, layers=2)
    skopeo_push(tmp_path / "layout", "v1", s3_registry.host, "org/app")
    m = mount(source(s3_bucket))
    repo = m.path("org", "app")
    assert ls(m.path("org")) == ["app"]
    assert ls(repo / "tags") == ["v1"]
    assert ls(repo / "manifests") == [image.digest]
    assert ls(repo / "layers") == sorted(image.blob_digests)
    assert (repo / "tags" / "v1").read_bytes() == image.manifest
    for digest in image.blob_digests:
        assert sha256sum(repo / "layers" / digest) == digest
        run(["cmp", str(blob_path(tmp_path / "layout", digest)), str(repo / "layers" / digest)])
        assert (repo / "layers" / digest).read_bytes() == image.blob(digest)
    checked = regfs("check", "--verify", source(s3_bucket))
    assert (checked.returncode, checked.stdout) == (0, ""), checked.stderr


def test_push_through_the_mount_pulled_by_skopeo(
    tmp_path, aws_env, s3_bucket, s3_registry, mount, moto_server
):
    """`mkdir -p`, layers by `cp` + `mv` and by `cp` to digest names, the manifest by `cp` to
    tags/v1: the registry on the same bucket serves it, and skopeo pulls it identical. The
    endpoint comes from `-o s3_endpoint=` here (the others find it in AWS_ENDPOINT_URL)."""
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", FILES, layers=3)
    m = mount(source(s3_bucket), "-o", f"s3_endpoint={moto_server.url}")
    repo = new_repo(m, "myorg/app")
    push_with_tools(repo, layout, image)
    assert ls(repo / "layers") == sorted(image.blob_digests)
    assert ls(repo / "uploads") == []
    m.stop()
    s3 = moto_server.client()
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(k.startswith("regroot/docker/registry/v2/") for k in keys)
    assert not [k for k in keys if "/_uploads/" in k]

    client = s3_registry.client()
    assert client.tags("myorg/app") == ["v1"]
    body, media_type, digest = client.get_manifest("myorg/app", "v1")
    assert (body, digest, media_type) == (image.manifest, image.digest, OCI_MANIFEST)
    pulled = skopeo_pull(s3_registry.host, "myorg/app", "v1", tmp_path / "pulled")
    assert (pulled.digest, pulled.manifest) == (image.digest, image.manifest)
    for blob in image.blob_digests:
        assert pulled.blob(blob) == image.blob(blob)
        assert digest_of(pulled.blob(blob)) == blob


def test_a_missing_bucket_refuses_the_mount(tmp_path, aws_env, moto_server):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = regfs("mount", "s3://no-such-bucket-here/regroot", str(mountpoint))
    assert result.returncode != 0
    assert "no such bucket" in result.stderr and result.stderr.count("\n") == 1
    assert not is_mounted(mountpoint)
    result = regfs("mount", "s3://Bad_Bucket/x", str(mountpoint))
    assert result.returncode != 0 and "bucket name" in result.stderr
    assert not is_mounted(mountpoint)


def test_a_bucket_at_its_top_through_a_profile(
    tmp_path, s3_bucket, moto_server, monkeypatch, mount
):
    """`regfs mount --s3-endpoint URL s3://BUCKET` (no prefix: the registry's rootdirectory
    is `/`) with no key in the environment: the daemon signs every request with the key and
    region of AWS_PROFILE's profile in the AWS files. Through it, reads, xattrs and `rm` of
    a tag are a root directory's. Wrong credentials (S3's 403) refuse the mount in one
    line, and nothing is mounted."""
    registry = Registry(S3Driver(s3_bucket, "", client=moto_server.client()))
    manifest = trio.run(store_image, registry.repository("org/app"), ["v1", "v2"])
    use_profile(tmp_path, monkeypatch)
    with FaultServer(upstream=moto_server.url) as proxy:
        refused = tmp_path / "refused"
        refused.mkdir()
        proxy.inject(Fault(403, body=b"<Error><Code>AccessDenied</Code></Error>", method="HEAD"))
        result = regfs("mount", "--s3-endpoint", proxy.url, f"s3://{s3_bucket}", str(refused))
        assert result.returncode != 0 and "access denied" in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and not is_mounted(refused)
        m = mount(f"s3://{s3_bucket}", "--s3-endpoint", proxy.url)
        tags = m.path("org", "app", "tags")
        assert ls(tags) == ["v1", "v2"]
        assert sha256sum(tags / "v1") == str(manifest)
        digest = run(["getfattr", "--only-values", "-n", "user.regfs.digest", str(tags / "v1")])
        assert digest.stdout == str(manifest)
        run(["rm", str(tags / "v2")])
        assert ls(tags) == ["v1"]
        assert proxy.seen and all(signed_by_profile(s) for s in proxy.seen), proxy.seen
    keys = bucket_keys(s3_client(moto_server.url), s3_bucket)  # a new session: the profile's
    assert all(k.startswith("docker/registry/v2/") for k in keys)
    assert not [k for k in keys if "/_manifests/tags/v2/" in k]
    assert [k for k in keys if "/_manifests/tags/v1/" in k]


async def old_upload(driver: S3Driver) -> str:
    """An upload with data (a multipart upload in progress) started in 2020."""
    layers = Registry(driver).repository("org/app").layers
    upload = await layers.upload()
    await upload.write(b"partial data")
    await upload.close()
    path = f"/docker/registry/v2/repositories/org/app/_uploads/{upload.uuid}/startedat"
    await driver.put_content(path, b"2020-01-01T00:00:00Z")
    return upload.uuid


def test_check_and_purge_uploads_on_the_bucket(aws_env, s3_bucket, moto_server, monkeypatch):
    """`regfs check` reports the stale upload, `purge-uploads` deletes it and aborts its
    multipart upload (which the registry's own purge leaves behind)."""
    s3 = moto_server.client()
    driver = S3Driver(s3_bucket, ROOTDIRECTORY, client=moto_server.client())
    uuid = trio.run(old_upload, driver)
    assert len(s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]) == 1
    checked = regfs("check", source(s3_bucket))
    assert uuid in checked.stdout, checked.stderr
    purged = regfs("purge-uploads", "--older-than", "24h", source(s3_bucket))
    assert purged.returncode == 0, purged.stderr
    assert uuid in purged.stdout and "deleted 1 uploads" in purged.stderr
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert not [k for k in keys if "/_uploads/" in k]
    missing = regfs("check", "s3://no-such-bucket-here")
    assert missing.returncode != 0 and "no such bucket" in missing.stderr
    # The endpoint by flag, as on the mount, with none in the environment.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    flagged = regfs("check", "--s3-endpoint", moto_server.url, source(s3_bucket))
    assert flagged.returncode == 0 and "no findings" in flagged.stderr, flagged.stderr
    purged = regfs(
        "purge-uploads",
        "--s3-endpoint",
        moto_server.url,
        "-n",
        "--older-than",
        "1h",
        source(s3_bucket),
    )
    assert purged.returncode == 0, purged.stderr


def test_server_gone_mid_read_is_eio_and_the_daemon_lives(tmp_path, monkeypatch, mount):
    """The S3 server stops while a layer is read: that read fails with EIO (after the
    retries), never ENOENT, and the daemon keeps serving its mount."""
    with MotoServer() as server:
        for name, value in server.environment(tmp_path).items():
            monkeypatch.setenv(name, value)
        bucket = server.new_bucket()
        driver = S3Driver(bucket, ROOTDIRECTORY, client=server.client())
        data = os.urandom(24 << 20)
        trio.run(push_layer, driver, data)
        m = mount(source(bucket))
        layer = m.path("org", "app", "layers", str(digest_bytes(data)))
        with open(layer, "rb", buffering=0) as f:
            assert f.read(1 << 20) == data[: 1 << 20]
            server.stop()
            with pytest.raises(OSError) as failed:
                while f.read(1 << 20):
                    pass
            assert failed.value.errno == errno.EIO
    assert is_mounted(m.mountpoint) and m.pids()
    # The daemon still answers (a dead one would be ENOTCONN), and never says ENOENT.
    assert errno_of(lambda: os.stat(m.path("org", "app"))) in (None, errno.EIO)
    assert "S3 GET" in m.log_text()


def test_a_throttled_read_is_retried_then_eio_for_that_read_only(
    tmp_path, aws_env, s3_bucket, moto_server, mount
):
    """S3 answers 503 SlowDown to a layer's GET through a mount: twice, and `cat` still
    reads it whole (retried with backoff); every time, and that `cat` fails with EIO after
    the retries, never ENOENT, with a log line; the daemon lives, its other files read on,
    and the same layer reads whole once S3 answers again."""
    driver = S3Driver(s3_bucket, ROOTDIRECTORY, client=moto_server.client())
    data, other = os.urandom(3 << 20), os.urandom(1 << 20)
    for blob in (data, other):
        trio.run(push_layer, driver, blob)
    slow = Fault(503, body=SLOW_DOWN, method="GET", path=r"/data$")
    with FaultServer(upstream=moto_server.url) as proxy:
        m = mount(source(s3_bucket), "-o", f"s3_endpoint={proxy.url}")
        layers = m.path("org", "app", "layers")
        layer = layers / digest_of(data)
        os.stat(layer)
        proxy.inject(slow, times=2)
        assert sha256sum(layer) == digest_of(data)
        assert sum(s.faulted for s in proxy.seen) == 2
        fresh = mount(source(s3_bucket), "-o", f"s3_endpoint={proxy.url}")
        layer = fresh.path("org", "app", "layers", digest_of(data))
        os.stat(layer)
        proxy.inject(slow, times=1000)
        assert errno_of(lambda: layer.read_bytes()) == errno.EIO
        assert "SlowDown" in fresh.log_text()
        proxy.clear()
        assert is_mounted(fresh.mountpoint) and fresh.pids()
        assert sha256sum(fresh.path("org", "app", "layers", digest_of(other))) == digest_of(other)
        assert layer.read_bytes() == data


async def push_layer(driver: S3Driver, data: bytes) -> None:
    layers = Registry(driver).repository("org/app").layers
    upload = await layers.upload()
    await upload.write(data)
    await upload.finish(digest_bytes(data))


def bucket_uploads(moto_server: MotoServer, bucket: str) -> list[dict]:
    return moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def no_upload_left(moto_server: MotoServer, bucket: str) -> None:
    keys = bucket_keys(moto_server.client(), bucket)
    assert [k for k in keys if "/_uploads/" in k] == []
    assert bucket_uploads(moto_server, bucket) == []


def test_upload_started_by_the_registry_finished_through_the_mount(
    tmp_path, aws_env, s3_bucket, s3_registry, mount, moto_server
):
    """POST + PATCH through the registry (a multipart upload with a part under 5 MiB),
    then `cat rest >>` through the mount resumes it (2.8's rule: complete, restart) and
    `mv` finishes it; the registry serves the blob."""
    client = s3_registry.client()
    name = "org/resume"
    data = os.urandom((7 << 20) + 4321)
    half = 1_234_567
    location, uuid = client.start_upload(name)
    client.patch_chunk(location, data[:half], 0)
    m = mount(source(s3_bucket))
    uploads = m.path("org", "resume", "uploads")
    assert ls(uploads) == [uuid]
    assert os.stat(uploads / uuid).st_size == half
    rest = tmp_path / "rest"
    rest.write_bytes(data[half:])
    run(["sh", "-c", f"cat '{rest}' >> '{uploads / uuid}'"])
    assert os.stat(uploads / uuid).st_size == len(data)
    digest = digest_of(data)
    run(["mv", str(uploads / uuid), str(m.path("org", "resume", "layers", digest))])
    assert ls(uploads) == []
    assert client.get_blob(name, digest) == data
    no_upload_left(moto_server, s3_bucket)


def write_then_kill(m: Mount, path: Path, data: bytes, in_s3: Callable[[], bool]) -> str:
    """Write data to a new upload through m, keep it open, SIGKILL the daemon once in_s3()
    says parts are in the bucket; the upload's uuid."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        uuid = uuid_of(path)
        os.write(fd, data)
        wait_until(in_s3, 30, "parts of the upload in S3")
        for pid in m.pids():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not m.pids(), 10, "the daemon to die")
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
            os.close(fd)
    return uuid


def test_upload_through_the_mount_killed_then_finished_by_the_registry(
    tmp_path, aws_env, s3_bucket, s3_registry, mount, moto_server
):
    """A `cp`-like writer through the mount, the daemon killed with SIGKILL once two parts
    are in S3: the registry on the same bucket takes the upload at the size S3 holds (a
    `_state` token made from the shared secret), PATCHes the rest and PUTs it; the blob it
    serves is the whole data."""
    name = "org/killed"
    data = os.urandom(40 << 20)
    m = mount(source(s3_bucket))
    uploads = new_repo(m, name) / "uploads"

    def sealed() -> list[dict]:
        found = bucket_uploads(moto_server, s3_bucket)
        if not found:
            return []
        upload = {"Key": found[0]["Key"], "UploadId": found[0]["UploadId"]}
        return moto_server.client().list_parts(Bucket=s3_bucket, **upload).get("Parts", [])

    uuid = write_then_kill(m, uploads / "big", data, lambda: len(sealed()) >= 2)
    size = sum(p["Size"] for p in sealed())
    assert 0 < size < len(data)
    started = (
        moto_server.client()
        .get_object(
            Bucket=s3_bucket,
            Key=f"regroot/docker/registry/v2/repositories/{name}/_uploads/{uuid}/startedat",
        )["Body"]
        .read()
        .decode()
    )
    token = upload_state_token(TEST_SECRET, name, uuid, size, started)
    client = s3_registry.client()
    location = client.patch_chunk(
        f"/v2/{name}/blobs/uploads/{uuid}?_state={quote(token)}", data[size:], size
    )
    client.finish_upload(location, digest_of(data))
    assert client.get_blob(name, digest_of(data)) == data
    no_upload_left(moto_server, s3_bucket)  # the registry completed the daemon's upload


def test_two_daemons_on_one_bucket(tmp_path, aws_env, s3_bucket, mount):
    """Two regfs daemons (two processes, two mountpoints) on one bucket: an upload held open
    on A is EBUSY on B (the S3 lock), B takes it once A closes, appends and finishes it;
    nothing A wrote is lost. A tag written on A shows on B within the tag TTL (1 s here)."""
    a = mount(source(s3_bucket), "-o", "tag_ttl=1")
    b = mount(source(s3_bucket), "-o", "tag_ttl=1")
    first, second = os.urandom(3 << 20), os.urandom(2 << 20)
    uploads_a = new_repo(a, "org/app") / "uploads"
    uploads_b = b.path("org", "app", "uploads")
    fd = os.open(uploads_a / "shared", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, first)
        wait_until(lambda: "shared" in ls(uploads_b), 10, "B to list A's upload")
        assert open_errno(uploads_b / "shared", os.O_WRONLY | os.O_APPEND) == errno.EBUSY
    finally:
        os.close(fd)
    with open(uploads_b / "shared", "ab") as f:
        f.write(second)
    digest = digest_of(first + second)
    run(["mv", str(uploads_b / "shared"), str(b.path("org", "app", "layers", digest))])
    assert sha256sum(a.path("org", "app", "layers", digest)) == digest

    image = build_image(tmp_path / "layout", "v1", FILES, layers=1)
    repo_a = a.path("org", "app")
    for blob in image.blob_digests:
        run(["cp", str(blob_path(tmp_path / "layout", blob)), str(repo_a / "uploads" / blob)])
    assert ls(b.path("org", "app", "tags")) == []  # B (and its kernel) now keep an empty listing
    run(["cp", str(blob_path(tmp_path / "layout", image.digest)), str(repo_a / "tags" / "v1")])
    written = time.monotonic()
    wait_until(lambda: ls(b.path("org", "app", "tags")) == ["v1"], 5, "B to see tag v1")
    # Within the TTL (1 s), plus the kernel's 0.1 s and a loaded machine's slack.
    assert time.monotonic() - written < 1 + 1.5
    assert b.path("org", "app", "tags", "v1").read_bytes() == image.manifest


def test_writes_in_order_through_the_mount(tmp_path, aws_env, s3_bucket, mount):
    """What S3 allows, as a mount shows it: a write below the parts already sent is EINVAL
    (and logged), the daemon lives on; `truncate -s 0` restarts the upload; the upload then
    finishes with `mv` to its digest."""
    m = mount(source(s3_bucket))
    upload = new_repo(m, "org/app") / "uploads" / "x"
    first = tmp_path / "first"
    first.write_bytes(os.urandom(20 << 20))  # one 16 MiB part sent, the rest held
    run(["cp", str(first), str(upload)])
    below = subprocess.run(
        ["dd", "if=/dev/zero", f"of={upload}", "bs=4096", "count=1", "seek=16", "conv=notrunc"],
        capture_output=True,
        text=True,
    )
    assert below.returncode != 0 and "Invalid argument" in below.stderr
    assert "writes go in order" in m.log_text()
    assert os.stat(upload).st_size == 20 << 20
    run(["truncate", "-s", "0", str(upload)])
    assert os.stat(upload).st_size == 0
    data = os.urandom(300_000)
    with open(upload, "ab") as f:
        f.write(data)
    run(["mv", str(upload), str(m.path("org", "app", "layers", digest_of(data)))])
    assert m.path("org", "app", "layers", digest_of(data)).read_bytes() == data


def test_upload_of_a_killed_daemon_finished_on_another(tmp_path, aws_env, s3_bucket, mount):
    """Daemons A and B on one bucket: A writes an upload and is killed with SIGKILL once a
    part is in S3; B lists the upload at the size S3 holds, takes its lock at once (A's
    process is gone), appends the rest from there and finishes it with `mv`."""
    data = os.urandom(24 << 20)
    a = mount(source(s3_bucket))
    b = mount(source(s3_bucket))
    uploads_a = new_repo(a, "org/app") / "uploads"
    seen_on_b = b.path("org", "app", "uploads", "big")
    write_then_kill(a, uploads_a / "big", data, lambda: os.stat(seen_on_b).st_size > 0)
    upload = b.path("org", "app", "uploads", "big")
    size = os.stat(upload).st_size
    assert 0 < size < len(data)
    with open(upload, "ab") as f:
        f.write(data[size:])
    digest = digest_of(data)
    run(["mv", str(upload), str(b.path("org", "app", "layers", digest))])
    assert sha256sum(b.path("org", "app", "layers", digest)) == digest


def test_mv_of_an_upload_looks_it_up_once(tmp_path, aws_env, s3_bucket, moto_server, mount):
    """`mv` of an upload into layers/ looks its multipart upload up once (one
    ListMultipartUploads at its data): the stat of the upload, the resume under the lock
    and the move into blobs/ are three FUSE and driver steps, and the two after the first
    ask for the parts of the upload it found, by its id (a ListParts each)."""
    data = os.urandom(6 << 20)  # one part: the move completes it, then copies the object
    s3 = moto_server.client()
    with FaultServer(upstream=moto_server.url) as proxy:
        m = mount(source(s3_bucket), "-o", f"s3_endpoint={proxy.url}")
        upload = new_repo(m, "org/app") / "uploads" / "x"
        (tmp_path / "x").write_bytes(data)
        run(["cp", str(tmp_path / "x"), str(upload)])
        wait_until(  # the daemon's release of the file comes after cp's close
            lambda: not [k for k in bucket_keys(s3, s3_bucket) if k.endswith(".regfs-lock")],
            10,
            "the writer lock to go",
        )
        proxy.seen.clear()
        layer = m.path("org", "app", "layers", digest_of(data))
        run(["mv", str(upload), str(layer)])
        calls = [s3_call(s) for s in proxy.seen]
        at_data = [s for s in proxy.seen if "uploads&" in s.path and "%2Fdata&" in s.path]
        assert sha256sum(layer) == digest_of(data)
    # Was 3: the stat's, the resume's and the move's. Once found, the upload is never
    # looked up again, however often the kernel asks for the file's attributes.
    assert len(at_data) == 1
    assert calls.count("ListParts") >= 3  # the stat's, the resume's, the move's
    assert calls.count("CompleteMultipartUpload") == 1
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


def test_ls_of_tags_asks_each_directory_once(tmp_path, aws_env, s3_bucket, moto_server, mount):
    """`ls` of a repository's tags on a fresh mount asks S3 for each directory on the way at
    most once (was 7 ListObjects: the lookup of a name and the attributes it replies with
    were two stats of one directory, tags/ asked its repository's again, and listed it to
    see it is one): the tags' one delimited listing, and a stat of each name on the way
    where the first key a stat found does not already show it (the mount's stat of its root
    shows the path to the first repository). `ls` of the namespace is one listing (was
    two). A repository that is not there, a namespace's tags/ and a name the registry
    refuses are still ENOENT."""
    registry = Registry(S3Driver(s3_bucket, ROOTDIRECTORY, client=moto_server.client()))
    trio.run(store_image, registry.repository("many/app"), [f"t{i}" for i in range(20)])
    with FaultServer(upstream=moto_server.url) as proxy:
        m = mount(source(s3_bucket), "-o", f"s3_endpoint={proxy.url}")
        proxy.seen.clear()
        assert sorted(ls(m.path("many", "app", "tags"))) == sorted(f"t{i}" for i in range(20))
        asked = [(s.method, s.path) for s in proxy.seen]
        calls = [s3_call(s) for s in proxy.seen]
        for where in (("many", "nope", "tags"), ("many", "tags"), ("many", "App", "tags")):
            assert errno_of(lambda where=where: os.listdir(m.path(*where))) == errno.ENOENT
        proxy.seen.clear()
        assert ls(m.path("many")) == ["app"]
        namespace = [s3_call(s) for s in proxy.seen]
    assert len(set(asked)) == len(asked), asked  # nothing asked twice
    assert set(calls) == {"ListObjects"}
    assert len([p for _, p in asked if "%2F_manifests%2Ftags%2F&delimiter" in p]) == 1
    assert not [p for _, p in asked if "%2Fapp%2F&delimiter" in p]  # the repository's
    assert len(asked) <= 3, asked
    assert namespace in ([], ["ListObjects"])  # none where the ENOENT checks listed it


SECTIONS = ("layers", "manifests", "rootfs", "tags", "uploads")


def test_upload_xattrs_rmdir_and_rm_r_on_the_bucket(
    tmp_path, aws_env, s3_bucket, moto_server, mount
):
    """SPEC §3, §6, §7 on a bucket, through the mount. `getfattr`: an upload in progress
    shows its uuid and start time, a finished layer its digest. rmdir: an empty repository
    goes; one holding an image is ENOTEMPTY, and stays whole. `rm -r` of it removes every
    tag, manifest, layer link and upload (the one in progress aborted in S3), each emptied
    section (a no-op), then the repository, and exits 0. Then neither `ls` of its namespace nor
    a fresh mount of the bucket shows it, and the bucket holds no key of it; the blobs stay
    (garbage collection's)."""
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", FILES, layers=1)
    m = mount(source(s3_bucket))
    run(["mkdir", "-p", str(m.path("org", "empty"))])
    assert ls(m.path("org", "empty")) == list(SECTIONS)
    run(["rmdir", str(m.path("org", "empty"))])
    assert ls(m.mountpoint) == []  # S3 keeps no empty directory: org/ went with its last
    repo = new_repo(m, "org/app")
    push_with_tools(repo, layout, image)
    assert ls(m.path("org")) == ["app"]

    upload = repo / "uploads" / "part"
    layer = repo / "layers" / image.layer_digests[0]
    s3 = moto_server.client()
    before = datetime.now(UTC).replace(microsecond=0)
    with open(upload, "wb") as f:
        f.write(b"half a layer")
        f.flush()
        attrs = getfattr(upload)
        (in_s3,) = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    uuid = in_s3["Key"].split("/_uploads/")[1].removesuffix("/data")
    assert set(attrs) == {"user.regfs.uuid", "user.regfs.startedat"}
    assert attrs["user.regfs.uuid"] == uuid
    started = datetime.strptime(attrs["user.regfs.startedat"], "%Y-%m-%dT%H:%M:%S%z")
    assert before <= started <= datetime.now(UTC)
    assert getfattr(layer) == {"user.regfs.digest": image.layer_digests[0]}

    assert errno_of(lambda: os.rmdir(repo)) == errno.ENOTEMPTY
    assert (ls(repo / "tags"), ls(repo / "layers")) == (["v1"], sorted(image.blob_digests))
    removed = subprocess.run(["rm", "-r", str(repo)], capture_output=True, text=True)
    assert (removed.returncode, removed.stderr) == (0, "")
    assert ls(m.path("org")) == []
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    keys = bucket_keys(s3, s3_bucket)
    assert not [k for k in keys if "/repositories/org/app/" in k]
    blobs = {"sha256:" + k.split("/")[-2] for k in keys if "/blobs/sha256/" in k}
    assert blobs == {*image.blob_digests, image.digest}  # the manifest is a blob too
    assert ls(mount(source(s3_bucket)).mountpoint) == []  # org/ was app's alone


def getfattr(path: Path) -> dict[str, str]:
    """The `user.` extended attributes of one file, as `getfattr -d` dumps them."""
    return parse_getfattr(run(["getfattr", "-d", "--absolute-names", str(path)]).stdout)[str(path)]
