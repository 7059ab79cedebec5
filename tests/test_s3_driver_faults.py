"""Three faults a review found in the S3 driver (storage/drivers/s3.py), on moto: a
gateway's 503 to a create that was made, a whole-bucket listing past the cap on a
directory's names, and a renewal that finds the lock object gone."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
import trio
from botocore.exceptions import ClientError
from support.fault_server import Fault, FaultServer
from support.s3 import MotoServer

from storage.drivers import s3 as s3_module
from storage.drivers.s3 import LOCK_SUFFIX, MIN_PART, S3Driver
from storage.errors import Busy, RemoteUnavailable

pytestmark = pytest.mark.storage

UPLOAD = "/docker/registry/v2/repositories/org/app/_uploads/0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


async def test_a_create_answered_503_after_it_was_made_is_not_sent_again(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateMultipartUpload is never sent twice: a second upload at the key would be an
    orphan the first resume (2.8's, `_pending`'s) takes. Only S3's own SlowDown is a
    request refused unprocessed; a gateway's 503 may come after S3 made the upload, so the
    start fails (EIO) and leaves that one upload alone."""
    monkeypatch.setattr(s3_module, "RETRIES", 3)
    client = moto_server.client()
    create = client.create_multipart_upload
    made: list[str] = []

    def made_then_503(**kwargs: Any) -> Any:
        answer = create(**kwargs)
        made.append(answer["UploadId"])
        raise ClientError(
            {
                "Error": {"Code": "ServiceUnavailable", "Message": "gateway"},
                "ResponseMetadata": {"HTTPStatusCode": 503},
            },
            "CreateMultipartUpload",
        )

    monkeypatch.setattr(client, "create_multipart_upload", made_then_503)
    driver = S3Driver(s3_bucket, "/regroot", client=client, chunksize=MIN_PART)
    with pytest.raises(RemoteUnavailable, match="CREATE UPLOAD"):
        writer = await driver.writer(f"{UPLOAD}/data")
        await writer.write_at(0, os.urandom(MIN_PART + 1000))
        await writer.aclose()
    assert len(made) == 1
    uploads = moto_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == made


async def test_whole_bucket_listing_past_the_cap_is_read_whole(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """files('/') (regfs check, purge-uploads) lists the whole bucket without a delimiter:
    a bucket of more objects than a directory may list (LISTING_NAMES_MAX, made 2000 here
    against 2500 objects, three pages) is read whole, where it was EIO. A directory's
    listing past that cap still stops."""
    monkeypatch.setattr(s3_module, "LISTING_NAMES_MAX", 2000)
    s3 = moto_server.client()
    for i in range(2500):
        s3.put_object(Bucket=s3_bucket, Key=f"regroot/docker/registry/v2/blobs/k{i:05}", Body=b"")
    driver = S3Driver(s3_bucket, "/regroot", client=moto_server.client(), chunksize=MIN_PART)
    files = await driver.files("/", sizes=False)
    assert len(files) == 2500
    with pytest.raises(RemoteUnavailable, match="goes on past 2000 entries"):
        await driver.list("/docker/registry/v2/blobs")


async def test_a_lock_taken_over_and_let_go_meanwhile_is_busy_not_eio(
    moto_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the safe window a write first renews the lock with If-Match its ETag. Where
    another writer took the lock over and let it go meanwhile (or an rm removed it), that
    PUT finds no object (NoSuchKey): the lock is lost, the write Busy, as after a 412. It
    was EIO, for every part sent, with a renewal tried every LOCK_RENEW for ever."""
    monkeypatch.setattr(s3_module, "LOCK_RENEW", 2.0)
    monkeypatch.setattr(s3_module, "LOCK_SAFE", 4.0)
    monkeypatch.setattr(s3_module, "RETRIES", 1)
    s3 = moto_server.client()
    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        writer = await driver.writer(f"{UPLOAD}/data")
        await writer.write_at(0, b"x")
        refused = Fault(503, body=SLOW_DOWN, method="PUT", path=r"\.regfs-lock$")
        proxy.inject(refused, times=1000)
        await trio.sleep(4.5)  # past the safe window, its renewals refused
        keys = [k["Key"] for k in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
        (lock,) = [k for k in keys if k.endswith(LOCK_SUFFIX)]
        s3.delete_object(Bucket=s3_bucket, Key=lock)  # taken over elsewhere, then let go
        proxy.clear()
        try:
            await writer.write_at(1, b"y")
            with pytest.raises(Busy, match="taken over"):
                await writer.sync()  # a part is sent: the lock is checked first
        finally:
            with contextlib.suppress(Busy):
                await writer.aclose()
            await driver.delete(UPLOAD)
