"""What the S3 driver does that the shared driver suite (test_drivers.py) cannot see: the
bucket as docker-registry 2.8's s3 driver leaves it (an upload's data is a multipart upload
in progress, no directory markers), writes in order only, a resume after a small last part,
ranged multipart copies, retries of a throttling server, and errors that are never ENOENT.

Against a real S3 server on loopback (moto), seen through a plain boto3 client.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import threading
import time

import pytest
import trio
from support.fault_server import Fault, FaultServer
from support.s3 import (
    MotoServer,
    bucket_keys,
    s3_call,
    signed_by_profile,
    store_image,
    use_profile,
)

from storage.check import check
from storage.digests import digest_bytes
from storage.drivers import FileInfo, PathNotFound
from storage.drivers import s3 as s3_module
from storage.drivers.s3 import ANYWHERE, LOCK_SAFE, MIN_PART, S3Driver, s3_client
from storage.errors import Busy, InvalidOffset, RemoteUnavailable
from storage.registry import Registry

pytestmark = pytest.mark.storage

UPLOAD = "/docker/registry/v2/repositories/org/app/_uploads/0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
NO_SUCH_UPLOAD = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchUpload</Code>'
    b"<Message>The specified upload does not exist.</Message></Error>"
)
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
LOCK = r"\.regfs-lock$"
QUICK_SAFE = 4.0  # the safe window of quick_lock


@pytest.fixture
def s3(moto_server: MotoServer):
    """A plain boto3 client: what another S3 tool (or the registry) sees."""
    return moto_server.client()


@pytest.fixture
def drv(moto_server: MotoServer, s3_bucket: str) -> S3Driver:
    return S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)


def uploads(s3, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


async def whole(drv: S3Driver, path: str) -> bytes:
    """All of a file through a reader: upload data outgrows get_content's limit."""
    reader = await drv.reader(path)
    try:
        return await reader.read_at(0, (await drv.stat(path)).size)
    finally:
        await reader.aclose()


async def test_upload_data_is_a_multipart_upload_in_progress(drv, s3, s3_bucket):
    """2.8's layout: no `data` object, no directory marker; the data is a multipart upload
    at `regroot/…/data` whose parts add up to the size, and it reads back exactly."""
    data = os.urandom(MIN_PART + 123_456)
    await drv.put_content(f"{UPLOAD}/startedat", b"2026-01-01T00:00:00Z")
    writer = await drv.writer(f"{UPLOAD}/data")
    for start in range(0, len(data), 1 << 20):
        await writer.write_at(start, data[start : start + (1 << 20)])
    await writer.aclose()
    key = f"regroot{UPLOAD}/data"
    assert bucket_keys(s3, s3_bucket) == [f"regroot{UPLOAD}/startedat"]
    assert uploads(s3, s3_bucket) == [key]
    upload_id = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]["UploadId"]
    parts = s3.list_parts(Bucket=s3_bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [p["Size"] for p in parts] == [MIN_PART, 123_456]
    assert (await drv.stat(f"{UPLOAD}/data")).size == len(data)
    assert await drv.list(UPLOAD) == ["data", "startedat"]
    assert await whole(drv, f"{UPLOAD}/data") == data
    # Reading completed it into an object and went on in a new upload with the same bytes.
    assert uploads(s3, s3_bucket) == [key]
    writer = await drv.writer(f"{UPLOAD}/data")
    assert writer.size == len(data)
    await writer.write_at(len(data), b"more")
    await writer.aclose()
    assert await whole(drv, f"{UPLOAD}/data") == data + b"more"
    await drv.delete(UPLOAD)
    assert bucket_keys(s3, s3_bucket) == [] and uploads(s3, s3_bucket) == []


async def test_writes_go_in_order(drv):
    """Nothing is written below the end, in the sealed parts or the unsealed tail alike
    (InvalidOffset, EINVAL through a mount: SPEC §10); the tail can be cut, the sealed parts
    cannot; truncate to 0 restarts the upload."""
    path = f"{UPLOAD}/data"
    writer = await drv.writer(path)
    first = os.urandom(MIN_PART + 10)
    await writer.write_at(0, first)  # one part sealed, 10 bytes in the tail
    for below in (MIN_PART - 1, MIN_PART + 2):  # a sealed part, the tail
        with pytest.raises(InvalidOffset, match="writes go in order"):
            await writer.write_at(below, b"x")
    with pytest.raises(InvalidOffset):
        await writer.truncate(100)
    await writer.truncate(MIN_PART + 5)  # inside the tail: fine
    await writer.write_at(MIN_PART + 5, b"AB")
    assert writer.size == MIN_PART + 7
    await writer.aclose()
    assert await whole(drv, path) == first[: MIN_PART + 5] + b"AB"
    writer = await drv.writer(path)
    await writer.truncate(0)
    await writer.write_at(0, b"again")
    await writer.aclose()
    assert await whole(drv, path) == b"again"
    await drv.delete(UPLOAD)


async def test_resume_after_a_small_last_part(drv, s3, s3_bucket):
    """A last part under 5 MiB cannot be followed by more: the first change after reopening
    completes the upload and starts another holding its bytes (2.8's rule), and the data
    stays whole. Reopened and closed unchanged (as a finish does), it stays as it was."""
    path = f"{UPLOAD}/data"
    head = os.urandom(300_000)
    writer = await drv.writer(path)
    await writer.write_at(0, head)
    await writer.aclose()  # one part of 300 000 bytes
    key = f"regroot{path}"
    before = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
    writer = await drv.writer(path)
    assert writer.size == len(head)
    await writer.aclose()
    assert s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"] == before
    assert f"regroot{path}" not in bucket_keys(s3, s3_bucket)
    tail = os.urandom(2 * MIN_PART)
    writer = await drv.writer(path)
    await writer.truncate(len(head) - 1000)  # in what the restart holds unsealed
    await writer.write_at(len(head) - 1000, head[-1000:] + tail)
    await writer.aclose()
    upload_id = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]["UploadId"]
    sizes = [
        p["Size"] for p in s3.list_parts(Bucket=s3_bucket, Key=key, UploadId=upload_id)["Parts"]
    ]
    assert sizes[:-1] and min(sizes[:-1]) >= MIN_PART and sum(sizes) == len(head + tail)
    assert await whole(drv, path) == head + tail
    await drv.delete(UPLOAD)


async def test_one_writer_and_no_move_while_writing(drv):
    writer = await drv.writer(f"{UPLOAD}/data")
    with pytest.raises(Busy):
        await drv.writer(f"{UPLOAD}/data")
    with pytest.raises(Busy):
        await drv.move(f"{UPLOAD}/data", "/elsewhere")
    await writer.aclose()
    await drv.delete(UPLOAD)


async def test_move_above_the_threshold_copies_in_ranges(moto_server, s3_bucket, monkeypatch):
    """A 40 MiB blob above a 32 MiB threshold moves by UploadPartCopy in 16 MiB ranges; a
    registry upload finishes into blobs/ with its digest, and its multipart upload is gone."""
    monkeypatch.setattr("storage.drivers.s3.COPY_THRESHOLD", 32 << 20)
    monkeypatch.setattr("storage.drivers.s3.COPY_CHUNK", 16 << 20)
    drv = S3Driver(s3_bucket, "", client=moto_server.client())
    data = os.urandom(40 << 20)
    await drv.put_content("/src", data)
    await drv.move("/src", "/dst")
    with pytest.raises(PathNotFound):
        await drv.stat("/src")
    assert hashlib.sha256(await whole(drv, "/dst")).digest() == hashlib.sha256(data).digest()
    await drv.delete("/dst")
    registry = Registry(drv)
    layers = registry.repository("org/app").layers
    upload = await layers.upload()
    await upload.write(data[: 7 << 20])
    info = await upload.finish(digest_bytes(data[: 7 << 20]))
    assert info.size == 7 << 20
    s3 = moto_server.client()
    assert uploads(s3, s3_bucket) == []
    assert not [k for k in bucket_keys(s3, s3_bucket) if "_uploads" in k]


@pytest.fixture
def few_retries(monkeypatch):
    """Three retries (0.7 s of backoff) instead of four (1.5 s): the same path, faster."""
    monkeypatch.setattr("storage.drivers.s3.RETRIES", 3)


async def test_a_complete_whose_answer_was_lost_is_done(moto_server, s3, s3_bucket, few_retries):
    """CompleteMultipartUpload reaches S3 but its answer is lost, and the retry is answered
    NoSuchUpload (moto answers a retry 200, as AWS does for a while; other servers and AWS
    later do not: the proxy answers for them): the object the first try made is found (its
    size, its multipart ETag), so the move of the upload's data goes on. A retry answered
    NoSuchUpload where no try completed it (no object at the key, or another one of the
    same size: a PUT of the same bytes, a multipart upload of other bytes) is still an
    error."""
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        data = os.urandom(MIN_PART + 1000)
        writer = await drv.writer(f"{UPLOAD}/data")
        await writer.write_at(0, data)
        await writer.aclose()
        proxy.inject(
            Fault(lose_answer=True, method="POST", path=r"/data$"),
            Fault(404, body=NO_SUCH_UPLOAD, method="POST", path=r"/data$"),
        )
        await drv.move(f"{UPLOAD}/data", "/blobs/x/data")
        completes = [s.status for s in proxy.seen if s.method == "POST" and "uploadId" in s.path]
        assert completes == [None, 404]
        assert await whole(drv, "/blobs/x/data") == data
        assert uploads(s3, s3_bucket) == []

        key = f"regroot{UPLOAD}/data"
        for there in (None, data, os.urandom(len(data))):  # none, a PUT, other parts
            if there is data:
                s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
            elif there is not None:
                other = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
                etag = s3.upload_part(
                    Bucket=s3_bucket, Key=key, UploadId=other, PartNumber=1, Body=there
                )["ETag"]
                s3.complete_multipart_upload(
                    Bucket=s3_bucket,
                    Key=key,
                    UploadId=other,
                    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
                )
            upload_id = drv._create(key)
            part = drv.upload_part(key, upload_id, 1, data)
            proxy.inject(  # the first try never reaches moto; the retry is refused
                Fault(close=True, method="POST", path=r"/data$"),
                Fault(404, body=NO_SUCH_UPLOAD, method="POST", path=r"/data$"),
            )
            with pytest.raises(RemoteUnavailable, match="NoSuchUpload"):
                await trio.to_thread.run_sync(drv._complete, key, upload_id, [part])
            drv.abort(key, upload_id)
        await drv.delete("/blobs")
        await drv.delete(UPLOAD)


async def test_throttling_is_retried(moto_server, s3_bucket, few_retries):
    """503 SlowDown and a dropped connection are retried with backoff; a server that keeps
    refusing is RemoteUnavailable (EIO), never PathNotFound (ENOENT)."""
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/r", client=moto_server.client(proxy.url))
        await drv.put_content("/a/b", b"hello")
        proxy.inject(Fault(503, body=SLOW_DOWN), Fault(close=True), Fault(500))
        assert await whole(drv, "/a/b") == b"hello"
        assert sum(s.faulted for s in proxy.seen) == 3
        for call in (drv.get_content, drv.stat):
            proxy.inject(Fault(503, body=SLOW_DOWN), times=4)
            with pytest.raises(RemoteUnavailable):
                await call("/a/b")
        assert await drv.list("/a") == ["b"]


async def test_listings_read_as_boto3_reads_them(moto_server, s3, s3_bucket):
    """The driver's own ListObjectsV2 (s3_list.py) says what boto3's says: keys that need
    URL-encoding, sizes, times, common prefixes, and pages followed by their tokens."""
    names = ["a b", "a+b", "100%", "x&y<z>", "ü/deeper", "~tilde", "q?=1"]
    for i, name in enumerate(names):
        s3.put_object(Bucket=s3_bucket, Key=f"r/odd/{name}", Body=b"x" * i)
    drv = S3Driver(s3_bucket, "/r", client=moto_server.client())
    assert await drv.list("/odd") == sorted(n.partition("/")[0] for n in names)
    plain = s3.list_objects_v2(Bucket=s3_bucket, Prefix="r/odd/")["Contents"]
    assert [(k, o.size, o.mtime_ns) for k, o in drv._objects("r/odd/") if o] == [
        (o["Key"], o["Size"], s3_module.mtime_ns(o["LastModified"])) for o in plain
    ]
    for delimiter in ("", "/"):
        pages, token = [], None
        while True:
            page = drv._lister.page("r/odd/", delimiter, max_keys=2, token=token)
            pages.append((sorted(o.key for o in page.objects), sorted(page.prefixes)))
            if page.token is None:
                break
            token = page.token
        plain_pages = [
            (
                sorted(o["Key"] for o in p.get("Contents", [])),
                sorted(c["Prefix"] for c in p.get("CommonPrefixes", [])),
            )
            for p in s3.get_paginator("list_objects_v2").paginate(
                Bucket=s3_bucket, Prefix="r/odd/", Delimiter=delimiter, MaxKeys=2
            )
        ]
        assert pages == plain_pages and len(pages) > 2


async def test_a_listing_a_driver_does_not_read_is_eio_at_once(
    moto_server, s3_bucket, monkeypatch, caplog
):
    """A hostile or broken listing answer is refused, not retried, and is EIO (never ENOENT):
    a DTD (no entity is ever expanded), more than LIST_LIMIT bytes (never read whole), not
    XML, an entry without a size or with a negative one, a truncated page without a token.
    An answer that the bucket is in another region hands the listings to boto3, which
    follows it: the listing still answers."""
    monkeypatch.setattr("storage.drivers.s3_list.LIST_LIMIT", 4096)
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/r", client=moto_server.client(proxy.url))
        await drv.put_content("/a/b", b"hello")
        entry = (
            b"<Contents><Key>r/a/b</Key><Size>%s</Size><LastModified>%s</LastModified></Contents>"
        )
        listing = b"<ListBucketResult>%s<IsTruncated>%s</IsTruncated></ListBucketResult>"
        for body in (
            b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]><ListBucketResult>&a;'
            b"</ListBucketResult>",
            listing % (entry % (b"1", b"2026-01-01T00:00:00.000Z") * 100, b"false"),
            b"{}",
            listing % (entry % (b"-1", b"2026-01-01T00:00:00.000Z"), b"false"),
            listing % (entry % (b"1", b"yesterday"), b"false"),
            listing % (b"", b"true"),
        ):
            proxy.seen.clear()
            proxy.inject(Fault(200, body=body, method="GET", path=f"^/{s3_bucket}$"))
            drv.forget()
            with pytest.raises(RemoteUnavailable):
                await drv.list("/a")
            assert len(proxy.seen) == 1, body
        assert "S3 sent a listing regfs does not read" in caplog.text
        assert await drv.list("/a") == ["b"]
        elsewhere = b"<Error><Code>PermanentRedirect</Code><Message>elsewhere</Message></Error>"
        proxy.inject(Fault(301, body=elsewhere, method="GET", path=f"^/{s3_bucket}$"))
        drv.forget()
        assert await drv.list("/a") == ["b"]
        assert "max-keys=1000" in proxy.seen[-1].path  # boto3's own call
        await drv.delete("/a")


def test_the_fault_proxy_hangs_up_on_its_clients_at_stop(moto_server, s3_bucket):
    """The fault proxy's stop returns at once with clients still connected: one idle in a
    client's pool of kept connections, one that stopped in the middle of a request's body.
    Each held a handler thread, which stop joins, for the handler's timeout (5 s), or for
    good while its client went on sending."""
    proxy = FaultServer(upstream=moto_server.url).start()
    stalled = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        client = moto_server.client(proxy.url)
        client.head_bucket(Bucket=s3_bucket)  # its connection stays open in the pool
        stalled.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n12")
        deadline = time.monotonic() + 5
        while proxy.connections < 2:
            assert time.monotonic() < deadline, "the proxy never saw both clients"
            time.sleep(0.01)
        start = time.monotonic()
        proxy.stop()
        assert time.monotonic() - start < 2
        stalled.settimeout(5)
        assert stalled.recv(1) == b""  # hung up on, not answered
        assert proxy.connections == 0
    finally:
        stalled.close()
        proxy.stop()


async def test_a_stopped_server_is_eio_not_enoent(few_retries):
    """A server gone in the middle of a read: that read fails (RemoteUnavailable), the next
    open too, and nothing says the file is missing."""
    server = MotoServer().start()
    try:
        bucket = server.new_bucket()
        drv = S3Driver(bucket, "", client=server.client(), multipart=ANYWHERE)
        data = os.urandom(32 << 20)
        await drv.put_content("/blob", data)
        reader = await drv.reader("/blob")
        assert await reader.read_at(0, 1 << 20) == data[: 1 << 20]
        server.stop()
        offset = 1 << 20
        with pytest.raises(RemoteUnavailable):  # what the socket held, then the failure
            while offset < len(data):
                assert await reader.read_at(offset, 1 << 20) == data[offset : offset + (1 << 20)]
                offset += 1 << 20
        assert offset < len(data)
        with pytest.raises(RemoteUnavailable):
            await reader.read_at(0, 10)  # a new GET: nobody answers
        await reader.aclose()
        for call in (drv.stat, drv.get_content, drv.reader):
            with pytest.raises(RemoteUnavailable):
                await call("/blob")
    finally:
        server.stop()


async def test_a_stat_is_one_request(moto_server, s3_bucket):
    """A stat is one request: a HEAD for the registry's file names (data, link), a one-key
    listing for the rest (a repository, a tag, a missing path), which tells a file, a
    directory and nothing apart. A sibling that sorts first (`app-x` before `app/`) costs
    a second listing, and answers right. `symlinks` (none on S3) is one stat, not a listing
    paged through a whole directory. Each on a new driver: one keeps the directories a
    stat found for the next stats (test_a_directory_stat_answers_the_next_ones_briefly)."""
    repos = "/docker/registry/v2/repositories"
    with FaultServer(upstream=moto_server.url) as proxy:

        def new_driver() -> S3Driver:
            return S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))

        drv = new_driver()
        for path in (f"{repos}/app/_layers/link", f"{repos}/app-x/_layers/link", "/blob"):
            await drv.put_content(path, b"12345")
        for path, is_dir, requests in (
            (f"{repos}/app/_layers/link", False, ["HEAD"]),
            ("/blob", False, ["GET"]),
            (f"{repos}/app/_layers", True, ["GET"]),
            (repos, True, ["GET"]),
            (f"{repos}/app", True, ["GET", "GET"]),
            (f"{repos}/ap", None, ["GET", "GET"]),
            (f"{repos}/nothing", None, ["GET"]),
            (f"{repos}/app/_layers/nothing/link", None, ["HEAD", "GET"]),
        ):
            proxy.seen.clear()
            drv = new_driver()
            if is_dir is None:
                with pytest.raises(PathNotFound):
                    await drv.stat(path)
            else:
                info = await drv.stat(path)
                assert (info.is_dir, info.size) == (is_dir, 0 if is_dir else 5), path
            assert [s.method for s in proxy.seen] == requests, path
        proxy.seen.clear()  # symlinks: none on S3, one request to say the directory is there
        drv = new_driver()
        assert await drv.symlinks(f"{repos}/app/_layers") == []
        for path in (f"{repos}/app/_layers/link", f"{repos}/nothing"):
            with pytest.raises(PathNotFound):
                await drv.symlinks(path)
        assert [s.method for s in proxy.seen] == ["GET", "HEAD", "GET"]
        await drv.delete("/docker")
        await drv.delete("/blob")


async def test_check_lists_each_directory_once(moto_server, s3_bucket):
    """`regfs check` on a bucket: one listing of the whole tree (under 1000 keys), whose
    sizes and times answer the stats (no HEAD), and one of its multipart uploads (the one in
    progress is there; its size, which the check never asks, would be a ListParts); the
    only GETs are of the links and start times it reads."""
    registry = Registry(S3Driver(s3_bucket, "/", client=moto_server.client()))
    repo = registry.repository("org/app")
    await store_image(repo, ["v1"])
    await (await repo.layers.upload()).close()  # in progress: a multipart upload
    files = [i async for i in registry.driver.walk("/") if not i.is_dir]
    with FaultServer(upstream=moto_server.url) as proxy:
        assert await check(S3Driver(s3_bucket, "/", client=moto_server.client(proxy.url))) == []
    assert len([s for s in proxy.seen if "list-type=2" in s.path]) == 1
    assert len([s for s in proxy.seen if "uploads&" in s.path]) == 1
    assert len([s for s in proxy.seen if "uploadId=" in s.path]) == 0  # was 1: its parts
    assert [s.method for s in proxy.seen if s.method != "GET"] == []
    reads = [s.path for s in proxy.seen if "?" not in s.path]
    assert len(reads) == sum(i.path.endswith(("/link", "/startedat")) for i in files) - 1
    # the index link is the one not read: a tag's current link says what it points at


async def test_files_size_an_upload_from_their_one_listing(moto_server, s3, s3_bucket):
    """`files` sizes an upload in progress as stat does (its parts), from the upload its one
    ListMultipartUploads found: a ListParts, no second lookup. One finished or cancelled
    between that listing and its ListParts is stat'ed after all: the object it became, or
    nothing. Without sizes (a purge), no ListParts: the upload is there, size and time 0."""
    key, path = f"regroot{UPLOAD}/data", f"{UPLOAD}/data"
    drv = S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)
    data = os.urandom(MIN_PART + 1000)
    await drv.put_content(f"{UPLOAD}/startedat", b"2026-01-01T00:00:00Z")
    writer = await drv.writer(path)
    await writer.write_at(0, data)
    await writer.aclose()
    with FaultServer(upstream=moto_server.url) as proxy:
        counted = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        files = await counted.files("/")
        lookups = [s.path for s in proxy.seen if "uploads&" in s.path or "uploadId=" in s.path]
        assert ["uploadId=" in p for p in lookups] == [False, True]
        proxy.seen.clear()
        unsized = await counted.files("/", sizes=False)
        assert [s.path for s in proxy.seen if "uploadId=" in s.path] == []
    assert [i.path for i in files] == [path, f"{UPLOAD}/startedat"]
    assert unsized == [FileInfo(path, 0, 0, False), files[1]]
    assert files[0] == await drv.stat(path) and files[0].size == len(data)
    upload_id = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]["UploadId"]
    s3.abort_multipart_upload(Bucket=s3_bucket, Key=key, UploadId=upload_id)
    with pytest.raises(PathNotFound):
        await drv._sized(path, files[0], upload_id)  # cancelled since listed
    await drv.put_content(path, b"done")
    assert (await drv._sized(path, files[0], upload_id)).size == 4  # finished since listed
    await drv.delete(UPLOAD)


async def test_entries_size_an_upload_from_their_one_listing(moto_server, s3_bucket):
    """`entries` of an upload's directory (what a walk of `_uploads/` asks) answers as stat
    does from its one listing: data in progress is sized by a ListParts of the upload that
    listing's ListMultipartUploads found (no second lookup), data that is an object takes
    the listing's size (no lookup, no HEAD)."""
    path = f"{UPLOAD}/data"
    drv = S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)
    await drv.put_content(f"{UPLOAD}/startedat", b"2026-01-01T00:00:00Z")
    writer = await drv.writer(path)
    await writer.write_at(0, os.urandom(MIN_PART + 1000))
    await writer.aclose()
    with FaultServer(upstream=moto_server.url) as proxy:
        counted = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        for data, sent in (
            (None, ["ListObjects", "ListMultipartUploads", "ListParts"]),
            (b"done", ["ListObjects", "ListMultipartUploads"]),
        ):
            if data is not None:
                await drv.delete(path)
                await drv.put_content(path, data)
            proxy.seen.clear()
            entries = await counted.entries(UPLOAD)
            assert [s3_call(s) for s in proxy.seen] == sent
            assert entries == [await drv.stat(path), await drv.stat(f"{UPLOAD}/startedat")]
            assert entries[0].size == (MIN_PART + 1000 if data is None else len(data))
    await drv.delete(UPLOAD)


async def test_a_finish_looks_up_its_multipart_upload_once(moto_server, s3_bucket):
    """Resume and finish of an upload whose last part is short (a `mv` into layers/): the
    multipart upload is looked up once, when the writer opens it under the lock; the move
    that completes it after the lock went asks for the parts of that upload by its id (a
    ListParts: another node may have resumed it meanwhile). Nowhere else (not in
    `hashstates/`, not by a stat before the open); completed once, by the move."""
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/", client=moto_server.client(proxy.url), chunksize=MIN_PART)
        layers = Registry(drv).repository("org/app").layers
        data = os.urandom(MIN_PART + 1000)
        upload = await layers.upload()
        await upload.write(data)
        await upload.close()  # parts of 5 MiB and 1000 bytes
        proxy.seen.clear()
        await (await layers.resume(upload.uuid)).finish(digest_bytes(data))
        async with await layers.fetch(digest_bytes(data)) as reader:
            assert await reader.read() == data
    lookups = [
        "ListParts" if "uploadId=" in s.path else f"ListMultipartUploads {s.path.count('%2F')}"
        for s in proxy.seen
        if s.method == "GET" and ("uploads&" in s.path or "uploadId=" in s.path)
    ]
    # at the prefix …/_uploads/<id>/data (was twice, with a ListParts each), then the
    # delete's of <id>
    assert lookups == ["ListMultipartUploads 8", "ListParts", "ListParts", "ListMultipartUploads 7"]
    assert [s.path for s in proxy.seen if "%2Fhashstates" in s.path and "uploads&" in s.path] == []
    completes = [s for s in proxy.seen if "uploadId=" in s.path and s.method == "POST"]
    assert len(completes) == 1


async def test_an_upload_found_here_then_changed_elsewhere(drv, moto_server, s3, s3_bucket):
    """The upload a lookup found is asked for by its id afterwards, and whatever another node
    did to it since is seen: parts it appended, an upload it cancelled and started anew
    (truncate to 0), an upload it completed into the object (its read); each stat, write and
    move then answers as a fresh lookup would."""
    path, key = f"{UPLOAD}/data", f"regroot{UPLOAD}/data"
    other = S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)
    first = os.urandom(MIN_PART)
    writer = await drv.writer(path)
    await writer.write_at(0, first)
    await writer.aclose()
    assert (await drv.stat(path)).size == MIN_PART  # looked up, and its id kept
    writer = await other.writer(path)  # another node appends
    await writer.write_at(MIN_PART, b"more")
    await writer.aclose()
    assert (await drv.stat(path)).size == MIN_PART + 4
    assert await whole(drv, path) == first + b"more"  # read: completed, and a new one begun

    upload_id = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]["UploadId"]
    assert (await drv.stat(path)).size == MIN_PART + 4  # the new one, looked up
    s3.abort_multipart_upload(Bucket=s3_bucket, Key=key, UploadId=upload_id)
    anew = s3.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=s3_bucket, Key=key, UploadId=anew, PartNumber=1, Body=b"anew")
    assert (await drv.stat(path)).size == 4  # not the cancelled one's parts
    writer = await drv.writer(path)  # resumes the new one (and, its part short, restarts it)
    assert writer.size == 4
    await writer.write_at(4, b"!")
    await writer.aclose()
    assert (await drv.stat(path)).size == 5

    upload_id = s3.list_multipart_uploads(Bucket=s3_bucket)["Uploads"][0]["UploadId"]
    parts = s3.list_parts(Bucket=s3_bucket, Key=key, UploadId=upload_id)["Parts"]
    s3.complete_multipart_upload(  # another node completes it (reads it)
        Bucket=s3_bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in parts]
        },
    )
    assert (await drv.stat(path)).size == 5  # the object it became
    await drv.move(path, "/moved")
    assert await drv.get_content("/moved") == b"anew!"
    assert uploads(s3, s3_bucket) == [] and bucket_keys(s3, s3_bucket) == ["regroot/moved"]
    await drv.delete("/moved")


async def test_reads_in_order_out_of_order_and_at_once(drv):
    """The reader's read-ahead streams serve reads in order, two places read in turn, a
    jump back, and reads at random offsets at once: every byte is the object's."""
    data = os.urandom(12 << 20)
    await drv.put_content("/blob", data)
    reader = await drv.reader("/blob")
    step = 128 << 10
    for offset in range(0, 4 << 20, step):
        assert await reader.read_at(offset, step) == data[offset : offset + step]
    for offset in range(0, 2 << 20, step):  # two places in turn: a stream each
        far = (8 << 20) + offset
        assert await reader.read_at(far, step) == data[far : far + step]
        assert (
            await reader.read_at((4 << 20) + offset, step)
            == data[(4 << 20) + offset : (4 << 20) + offset + step]
        )
    assert await reader.read_at(100, 1000) == data[100:1100]  # back to the start
    assert await reader.read_at(len(data) - 10, 100) == data[-10:]
    rng = random.Random(7)
    offsets = [rng.randrange(len(data)) for _ in range(24)]
    found: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        found[offset] = await reader.read_at(offset, 70_000)

    async with trio.open_nursery() as nursery:
        for offset in offsets:
            nursery.start_soon(read, offset)
    assert all(found[o] == data[o : o + 70_000] for o in offsets)
    await reader.aclose()
    await drv.delete("/blob")


async def test_one_writer_across_daemons_and_a_dead_ones_lock_expires(
    moto_server, s3_bucket, monkeypatch, caplog
):
    """Two drivers on one bucket, as two daemons: the second writer is Busy while the first
    holds the lock, and gets it once the first closes. A holder that stops renewing (a
    killed daemon) loses it after LOCK_TTL to the next writer, and from then on writes
    nothing (Busy), so the data holds what the new holder wrote on top.

    No renewals here (LOCK_RENEW is out of reach), and the live holders write under the
    default LOCK_SAFE, so no step depends on how fast a loaded machine runs. The expiry is
    brought down to seconds only once the dead holder has stopped: S3's clocks count whole
    seconds, so its takeover still comes over a second after its last write, past the
    LOCK_SAFE it then has."""
    monkeypatch.setattr("storage.drivers.s3.LOCK_WAIT", 0.2)
    monkeypatch.setattr("storage.drivers.s3.LOCK_RENEW", 1000.0)
    a = S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)
    b = S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)
    path = f"{UPLOAD}/data"
    first = await a.writer(path)
    with pytest.raises(Busy):
        await b.writer(path)
    await first.write_at(0, b"from a;")
    await first.aclose()
    second = await b.writer(path)
    await second.write_at(7, b"from b;")
    await second.aclose()

    stale = await a.writer(path)
    await stale.write_at(14, b"")  # a change: the short last part is completed, restarted
    with pytest.raises(Busy):
        await b.writer(path)  # held, and fresh
    # a's daemon dies here: its lock is renewed no more, and expires after a second.
    monkeypatch.setattr("storage.drivers.s3.LOCK_TTL", 1.0)
    monkeypatch.setattr("storage.drivers.s3.LOCK_SAFE", 0.5)
    with trio.fail_after(30):
        while True:
            try:
                taker = await b.writer(path)
                break
            except Busy:  # not expired yet: each try waited LOCK_WAIT
                pass
    assert "taking over a writer lock not renewed" in caplog.text
    await stale.write_at(14, b"late")  # buffered only
    with pytest.raises(Busy):
        await stale.sync()
    with pytest.raises(Busy):
        await stale.aclose()  # its close sends nothing, and leaves the new holder's lock
    monkeypatch.setattr("storage.drivers.s3.LOCK_SAFE", LOCK_SAFE)  # b lives on, as by default
    await taker.write_at(14, b"from b again")
    await taker.aclose()
    assert await a.get_content(path) == b"from a;from b;from b again"
    await a.delete(UPLOAD)


def test_check_bucket_says_what_is_wrong(moto_server, s3_bucket, monkeypatch, tmp_path):
    """One line each: no such bucket, access denied (a server answering 403, as S3 does to
    wrong credentials: moto takes any), no credentials at all, no server."""
    assert S3Driver(s3_bucket, client=moto_server.client()).check_bucket() is None
    with pytest.raises(ValueError, match="no such bucket"):
        S3Driver("not-there", client=moto_server.client()).check_bucket()
    with FaultServer(upstream=moto_server.url) as proxy:
        proxy.inject(Fault(403, body=b"<Error><Code>AccessDenied</Code></Error>"))
        with pytest.raises(ValueError, match=r"access denied .*wrong credentials"):
            S3Driver(s3_bucket, client=moto_server.client(proxy.url)).check_bucket()
    with pytest.raises(ValueError, match="cannot reach"):
        S3Driver(s3_bucket, client=moto_server.client("http://127.0.0.1:9")).check_bucket()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError, match="no AWS credentials"):
        S3Driver(s3_bucket, client=s3_client(moto_server.url)).check_bucket()


async def test_a_profile_of_the_aws_files_and_an_empty_prefix(
    moto_server, s3_bucket, monkeypatch, tmp_path
):
    """With no key in the environment, the standard AWS chain's files answer: AWS_PROFILE
    picks a profile's keys in the credentials file and its region in the config file, and
    every request is signed with them, the driver's own listings too. An empty prefix
    (`s3://BUCKET`, a registry whose rootdirectory is `/`) keeps the registry's tree at the
    bucket's top."""
    use_profile(tmp_path, monkeypatch)
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "", client=s3_client(proxy.url))
        drv.check_bucket()
        registry = Registry(drv)
        await store_image(registry.repository("org/app"), ["v1"])
        assert await registry.repository("org/app").tags.list() == ["v1"]
        assert {s3_call(s) for s in proxy.seen} >= {"HeadObject", "ListObjects", "PUT"}
        assert all(signed_by_profile(s) for s in proxy.seen), proxy.seen
        keys = bucket_keys(drv.client, s3_bucket)
    assert keys and all(k.startswith("docker/registry/v2/") for k in keys), keys


async def test_a_lock_left_by_a_dead_process_here_is_taken_at_once(drv, s3, s3_bucket, monkeypatch):
    """A daemon killed on this host leaves its lock: the next writer here sees its process
    is gone and takes it without waiting for the expiry; another host's fresh lock is kept
    (Busy)."""
    monkeypatch.setattr("storage.drivers.s3.LOCK_WAIT", 0.2)
    gone = subprocess.Popen(["true"])
    gone.wait()
    key = f"regroot{UPLOAD}/data.regfs-lock"
    owner = {"owner": f"{socket.gethostname()}:{gone.pid}", "ttl": 60}
    s3.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(owner).encode())
    with trio.fail_after(5):
        writer = await drv.writer(f"{UPLOAD}/data")
    await writer.aclose()
    elsewhere = {"owner": "another-host:1", "ttl": 60}
    s3.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(elsewhere).encode())
    with pytest.raises(Busy):
        await drv.writer(f"{UPLOAD}/data")
    await drv.delete(UPLOAD)


async def test_a_restart_copies_no_small_part_before_others(drv, monkeypatch):
    """A restart copies the object into parts that more parts follow: a remainder under
    5 MiB joins the range before it (else S3 refuses the upload's completion later)."""
    monkeypatch.setattr("storage.drivers.s3.COPY_CHUNK", 6 << 20)
    path = f"{UPLOAD}/data"
    data = os.urandom(7 << 20)
    writer = await drv.writer(path)
    await writer.write_at(0, data)
    await writer.aclose()  # parts of 5 MiB and 2 MiB: the next open restarts from a copy
    writer = await drv.writer(path)
    await writer.write_at(len(data), b"more")
    await writer.aclose()
    assert await whole(drv, path) == data + b"more"
    await drv.delete(UPLOAD)


async def test_a_lock_whose_answer_was_lost_is_still_ours(moto_server, s3_bucket, few_retries):
    """The lock's create reaches S3 but its answer is lost: the retry's 412 finds the
    lock's own token, so the writer has it (not Busy), and its close removes it."""
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        proxy.inject(Fault(lose_answer=True, method="PUT", path=LOCK))
        with trio.fail_after(5):
            writer = await drv.writer(f"{UPLOAD}/data")
        assert [s.status for s in proxy.seen if s.path.endswith(".regfs-lock")][:2] == [None, 412]
        await writer.write_at(0, b"mine")
        await writer.aclose()
        assert await drv.list(UPLOAD) == ["data"]  # no lock left behind
        await drv.delete(UPLOAD)


@pytest.fixture
def quick_lock(monkeypatch):
    """The lock's default timings (a renewal at half the safe window) in seconds, and one
    retry per request: a failed renewal is two refused PUTs."""
    monkeypatch.setattr("storage.drivers.s3.LOCK_RENEW", QUICK_SAFE / 2)
    monkeypatch.setattr("storage.drivers.s3.LOCK_SAFE", QUICK_SAFE)
    monkeypatch.setattr("storage.drivers.s3.RETRIES", 1)


def lock_puts(proxy: FaultServer) -> list[int | None]:
    """What became of each write of a lock object through the proxy."""
    return [s.status for s in proxy.seen if s.method == "PUT" and s.path.endswith(".regfs-lock")]


def renewing(path: str) -> bool:
    """Whether the renewal thread of the lock of path (in the /regroot drivers) runs."""
    name = f"regfs-s3-lock:regroot{path}.regfs-lock"
    return any(t.name == name for t in threading.enumerate())


async def test_a_failed_renewal_is_tried_again_at_once(moto_server, s3_bucket, quick_lock):
    """A renewal refused with 503 SlowDown (its retry too) is tried again after the backoff,
    not a whole period later, which would be past the safe window: the lock is renewed
    within that window and the writer writes on, never Busy. Its close stops the renewals
    (no thread left) and deletes the lock."""
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        path = f"{UPLOAD}/data"
        written = bytearray()
        try:
            with trio.fail_after(QUICK_SAFE):  # counted from before the lock was taken
                writer = await drv.writer(path)
                proxy.inject(Fault(503, body=SLOW_DOWN, method="PUT", path=LOCK), times=3)
                while len(lock_puts(proxy)) < 5:  # taken, refused twice, refused, renewed
                    await writer.write_at(len(written), b"x")
                    written += b"x"
                    await writer.sync()
                    await trio.sleep(0.05)
        except BaseException:
            drv.client.close()  # its kept connections would hold the proxy's stop
            raise
        assert lock_puts(proxy) == [200, 503, 503, 503, 200]
        await writer.write_at(len(written), b"after")
        await writer.aclose()
        assert not renewing(path)
        assert await drv.get_content(path) == written + b"after"
        assert await drv.list(UPLOAD) == ["data"]  # no lock left behind
        await drv.delete(UPLOAD)


async def test_a_renewal_that_keeps_failing_is_eio_in_time_and_recovers(
    moto_server, s3_bucket, quick_lock, caplog
):
    """Every renewal is refused: each is tried again after the backoff. No write is sent
    after LOCK_SAFE from the lock's last write (well before it could expire elsewhere,
    LOCK_TTL after), none is refused before, and from then on every write is EIO
    (RemoteUnavailable: S3 is down, nobody took the lock over; SPEC §10), not Busy. Once S3
    takes a renewal again (If-Match: still ours), writes go on; the close deletes the lock."""
    with FaultServer(upstream=moto_server.url) as proxy:
        drv = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        path = f"{UPLOAD}/data"
        before = time.monotonic()
        writer = await drv.writer(path)
        taken = time.monotonic()  # the lock's write was sent between before and taken
        proxy.inject(Fault(503, body=SLOW_DOWN, method="PUT", path=LOCK), times=1000)
        size = 0
        with trio.fail_after(QUICK_SAFE + 10):
            while True:
                sent = time.monotonic()
                try:
                    await writer.write_at(size, b"x")
                    await writer.sync()
                except RemoteUnavailable:
                    break
                size, last = size + 1, sent
                await trio.sleep(0.05)
        assert last <= taken + QUICK_SAFE
        assert time.monotonic() >= before + QUICK_SAFE
        assert lock_puts(proxy).count(503) >= 6  # three renewals or more, each retried once
        assert "writer lock not renewed in time" in caplog.text
        with pytest.raises(RemoteUnavailable):
            await writer.sync()
        assert renewing(path)  # tried again for as long as the writer is open
        proxy.clear()
        await writer.sync()  # a renewal goes through (inline, or the thread's): on it goes
        await writer.aclose()
        assert not renewing(path)
        assert await drv.list(UPLOAD) == ["data"]
        assert await drv.get_content(path) == b"x" * (size + 1)
        await drv.delete(UPLOAD)


async def test_a_directory_stat_answers_the_next_ones_briefly(drv, moto_server, s3, s3_bucket):
    """A stat of a directory, and of those on the way to the first key it found, is kept for
    DIR_SEEN: a mount's lookup, its reply's attributes and a section's stat of one directory
    are one request. A listing is kept as long: it answers itself again, and a stat of a name
    not in it. What this driver changes drops them at once; a directory gone beside it is
    gone for its stats within DIR_SEEN."""
    await drv.put_content("/a/b/c/file", b"x")
    await drv.put_content("/a/z", b"y")
    with FaultServer(upstream=moto_server.url) as proxy:
        seeing = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        first = await seeing.stat("/a")
        assert first.is_dir
        assert await seeing.stat("/a") == first
        assert await seeing.stat("/a/b/c") == FileInfo("/a/b/c", 0, first.mtime_ns, True)
        assert len(proxy.seen) == 1  # the first key below /a is below /a/b/c too
        assert await seeing.list("/a") == ["b", "z"]
        assert await seeing.list("/a") == ["b", "z"]
        with pytest.raises(PathNotFound):
            await seeing.stat("/a/_layers")
        assert len(proxy.seen) == 2
        assert (await seeing.stat("/a/z")).size == 1  # in it: a stat of its own
        await seeing.delete("/a/b")
        with pytest.raises(PathNotFound):
            await seeing.stat("/a/b/c")
        assert (await seeing.stat("/a")).is_dir  # /a/z
        s3.delete_object(Bucket=s3_bucket, Key="regroot/a/z")  # beside it
        with trio.fail_after(10):
            while True:
                try:
                    await seeing.stat("/a")
                except PathNotFound:
                    break
                await trio.sleep(0.05)


async def test_forget_drops_what_the_driver_kept(drv, moto_server, s3_bucket):
    """SIGHUP drops every cache (RegistrySource.forget): the directories and listings kept for
    DIR_SEEN go too, so the next stat and listing ask the bucket again."""
    await drv.put_content("/f/g/file", b"x")
    with FaultServer(upstream=moto_server.url) as proxy:
        seeing = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        registry = Registry(seeing)
        for _ in range(2):
            assert (await seeing.stat("/f")).is_dir and await seeing.list("/f") == ["g"]
        assert len(proxy.seen) == 2
        registry.forget()
        assert (await seeing.stat("/f")).is_dir and await seeing.list("/f") == ["g"]
        assert len(proxy.seen) == 4


async def test_what_is_kept_is_only_the_last_second(drv, monkeypatch):
    """A listing kept for DIR_SEEN can be large: once a newer one is kept, older ones past
    DIR_SEEN are gone from memory, not only unused (nothing unbounded is held)."""
    monkeypatch.setattr(s3_module, "DIR_SEEN", 0.2)
    for name in ("/k/a/x", "/k/b/x"):
        await drv.put_content(name, b"x")
    assert await drv.list("/k/a") == ["x"]
    await trio.sleep(0.3)
    assert await drv.list("/k/b") == ["x"]
    assert list(drv._listed) == ["/k/b"]
