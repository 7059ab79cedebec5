"""Faults a review found in the S3 driver (storage/drivers/s3.py), on moto: a gateway's
503 to a create that was made, and a whole-bucket listing past the cap on a directory's
names."""

from __future__ import annotations

import os
from typing import Any

import pytest
from botocore.exceptions import ClientError
from support.s3 import MotoServer

from storage.drivers import s3 as s3_module
from storage.drivers.s3 import MIN_PART, S3Driver
from storage.errors import RemoteUnavailable

pytestmark = pytest.mark.storage

UPLOAD = "/docker/registry/v2/repositories/org/app/_uploads/0f1e2d3c-aaaa-bbbb-cccc-123456789abc"


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
