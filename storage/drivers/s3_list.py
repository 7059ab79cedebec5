"""ListObjectsV2, the S3 driver's hottest call (every lookup and every readdir of a mount),
with less than half of botocore's per-call CPU: docs/s3.md ("Listings") has the figures.

The request is signed by the client's own signer and sent through the client's own
connection pool, so credentials (and their refresh), region, TLS, proxies and timeouts are
the client's; the bucket's URL is the one botocore resolves (a presigned URL's, without its
query). What is left out is botocore's request building (parameter validation, the
endpoint rules, a dozen event hooks) and its model-driven parser: the answer is read here,
at most LIST_LIMIT bytes of it, by ElementTree with no DTD allowed (so no entity of any
kind is expanded), and keys are URL-decoded as botocore does. An answer that redirects to
another region is listed by boto3 itself, which follows it, from then on.
"""

from __future__ import annotations

import functools
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2OutputTypeDef

log = logging.getLogger(__name__)

# The most a listing's answer may hold: a page of 1000 keys of 1 KiB, URL-encoded, fits.
LIST_LIMIT = 8 << 20
ERROR_LIMIT = 64 << 10  # of an error's answer, read for its code
# Answers that mean the bucket is in another region than the client signs for: boto3's
# own redirect handling lists from then on.
_ELSEWHERE = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "307"}


class BadAnswer(BotoCoreError):
    """A listing answer regfs does not read (too large, not S3's XML, a DTD in it)."""

    fmt = "S3 sent a listing regfs does not read: {why}"


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Page:
    """One ListObjectsV2 answer; token is the next page's (None: this is the last)."""

    objects: list[ListedObject]
    prefixes: list[str]
    token: str | None


def mtime_ns(when: datetime) -> int:
    """Nanoseconds since the epoch of an S3 time (whole microseconds, as S3 keeps them)."""
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


class Lister:
    """ListObjectsV2 pages of one bucket (blocks: for worker threads)."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        inner = cast(Any, client)  # botocore has no public name for its signer and pool
        self._signer = inner._request_signer
        self._http = inner._endpoint.http_session
        self._client = client
        self._bucket = bucket
        self._url = ""
        self._by_boto3 = False  # after an answer from another region: see _ELSEWHERE

    def _bucket_url(self) -> str:
        if not self._url:
            presigned = self._client.generate_presigned_url(
                "list_objects_v2", Params={"Bucket": self._bucket}
            )
            parts = urlsplit(presigned)
            self._url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        return self._url

    def page(
        self, prefix: str, delimiter: str = "", max_keys: int = 1000, token: str | None = None,
        start_after: str = "",
    ) -> Page:  # fmt: skip
        """One page of the keys starting with prefix (and with delimiter, the prefixes up to
        its next occurrence), with start_after only those after it (the first page: a token
        goes on from where it was made); ClientError for an error answer, as boto3 raises it."""
        if self._by_boto3:
            return self._boto3_page(prefix, delimiter, max_keys, token, start_after)
        params = {"list-type": "2", "prefix": prefix}  # in boto3's order
        if delimiter:
            params["delimiter"] = delimiter
        if max_keys != 1000:
            params["max-keys"] = str(max_keys)
        if token:
            params["continuation-token"] = token
        if start_after:
            params["start-after"] = start_after
        params["encoding-type"] = "url"
        request = AWSRequest(
            "GET",
            self._bucket_url(),
            params=params,
            headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"},
            stream_output=True,
        )
        self._signer.sign("ListObjectsV2", request)
        answer = self._http.send(request.prepare())
        status = int(answer.status_code)
        body = _read(answer.raw, LIST_LIMIT if status == 200 else ERROR_LIMIT)
        if status == 200:
            return _parsed(body)
        error = _error(status, body)
        if str(error.response["Error"]["Code"]) in _ELSEWHERE:
            log.info("s3://%s is in another region: boto3 lists it from now on", self._bucket)
            self._by_boto3 = True
            return self._boto3_page(prefix, delimiter, max_keys, token, start_after)
        raise error

    def _boto3_page(
        self, prefix: str, delimiter: str, max_keys: int, token: str | None, start_after: str
    ) -> Page:
        listing = functools.partial(
            self._client.list_objects_v2,
            Bucket=self._bucket,
            Prefix=prefix,
            Delimiter=delimiter,
            MaxKeys=max_keys,
            StartAfter=start_after,
        )
        answer: ListObjectsV2OutputTypeDef = (
            listing(ContinuationToken=token) if token else listing()
        )
        return Page(
            [
                ListedObject(o["Key"], o["Size"], mtime_ns(o["LastModified"]))
                for o in answer.get("Contents", [])
            ],
            [p["Prefix"] for p in answer.get("CommonPrefixes", [])],
            answer.get("NextContinuationToken") if answer.get("IsTruncated") else None,
        )


def _read(raw: Any, limit: int) -> bytes:
    """At most limit bytes of an answer; its connection goes back to the pool, closed when
    the answer went on past limit."""
    body: bytes = raw.read(limit + 1)
    if len(body) > limit:
        raw.close()
        raw.release_conn()
        raise BadAnswer(why=f"an answer over {limit} bytes")
    raw.release_conn()
    return body


def _root(body: bytes) -> ET.Element:
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise BadAnswer(why="a DTD")
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise BadAnswer(why=f"not XML ({exc})") from None


def _name(element: ET.Element) -> str:
    """A tag without its namespace (S3's, or none on some S3-compatible servers)."""
    return element.tag.rpartition("}")[2]


def _fields(element: ET.Element) -> dict[str, str]:
    return {_name(child): child.text or "" for child in element}


def _parsed(body: bytes) -> Page:
    root = _root(body)
    if _name(root) != "ListBucketResult":
        raise BadAnswer(why=f"<{_name(root)}> where a listing was due")
    contents, prefixes, top = [], [], {}
    for child in root:
        name = _name(child)
        if name == "Contents":
            contents.append(_fields(child))
        elif name == "CommonPrefixes":
            prefixes.append(_fields(child).get("Prefix"))
        else:
            top[name] = child.text or ""
    decode = unquote_plus if top.get("EncodingType") == "url" else str
    try:
        objects = [
            ListedObject(
                decode(c["Key"]),
                _size(c["Size"]),
                mtime_ns(datetime.fromisoformat(c["LastModified"])),
            )
            for c in contents
        ]
        names = [decode(p) for p in prefixes if p is not None]
    except (KeyError, ValueError) as exc:
        raise BadAnswer(why=f"an entry without a key, size or time ({exc})") from None
    token = top.get("NextContinuationToken") if top.get("IsTruncated") == "true" else None
    if top.get("IsTruncated") == "true" and not token:
        raise BadAnswer(why="a truncated page without a next token")
    return Page(objects, names, token)


def _size(text: str) -> int:
    size = int(text)
    if size < 0:
        raise ValueError(f"size {size}")
    return size


def _error(status: int, body: bytes) -> ClientError:
    """The ClientError boto3 raises for an error answer: its code, else the status."""
    try:
        fields = _fields(_root(body)) if body else {}
    except BadAnswer:
        fields = {}
    code = fields.get("Code") or str(status)
    return ClientError(
        {
            "Error": {"Code": code, "Message": fields.get("Message", "")},
            "ResponseMetadata": {
                "HTTPStatusCode": status,
                "HTTPHeaders": {},
                "RequestId": "",
                "HostId": "",
                "RetryAttempts": 0,
            },
        },
        "ListObjectsV2",
    )
