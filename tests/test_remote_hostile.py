"""A hostile or broken registry (issue 13): each test plays one attack from a loopback stub
and proves regfs refuses it for that call only, with a log line, never a dead daemon.

- upload ids that would name a record file outside the records directory;
- bodies, listings and caches that would grow the daemon's memory without bound;
- 401 challenges from a redirect target, which must never get credentials;
- blob bytes that do not match their digest, and https → http redirects;
- server text with newlines in the log, signed URLs in the debug log, `insecure` beyond
  the registry's own host.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_server import Fault, FaultServer

from storage.remote.client import RemoteClient
from storage.remote.uploads import RemoteUpload, UnsafeUploadId, UploadRecords

UPLOADS = "/v2/x/blobs/uploads/"


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


# --------------------------------------------------------------------------- upload ids


@pytest.mark.parametrize("given", ["../../../victim", "a/b", "..", ".hidden", "x" * 129, ""])
async def test_an_upload_id_never_names_a_file_outside_the_records(
    tmp_path: Path, fault_server: FaultServer, caplog: pytest.LogCaptureFixture, given: str
) -> None:
    """`Docker-Upload-UUID: ../../../victim` once overwrote, and later deleted, a file
    outside the state directory. It is refused with a log line, the upload is cancelled
    at the registry, and nothing is written anywhere."""
    records = UploadRecords(tmp_path / "state" / "uploads" / "host")
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    fault_server.inject(
        Fault(
            202,
            method="POST",
            headers=(("Docker-Upload-UUID", given), ("Location", UPLOADS + "u1")),
        )
    )
    async with RemoteClient(fault_server.url, timeout=2, retries=0) as client:
        with pytest.raises(UnsafeUploadId, match="not a safe file name"):
            await RemoteUpload.start(client, records, "x", "label")
    assert victim.read_text() == "precious"
    assert not records.directory.exists() or not any(records.directory.iterdir())
    assert [s.method for s in fault_server.seen] == ["POST", "DELETE"]
    assert "refusing the upload id" in caplog.text


async def test_uuid_ids_are_kept_and_a_missing_one_is_named_here(
    tmp_path: Path, fault_server: FaultServer
) -> None:
    records = UploadRecords(tmp_path / "records")
    uuid = "0f6d3a8e-6a37-4c43-9a52-2f1c8f7e5b10"
    fault_server.inject(
        Fault(
            202, method="POST", headers=(("Docker-Upload-UUID", uuid), ("Location", UPLOADS + uuid))
        ),
        Fault(202, method="POST", headers=(("Location", UPLOADS + "other"),)),
    )
    async with RemoteClient(fault_server.url, timeout=2, retries=0) as client:
        first = await RemoteUpload.start(client, records, "x", None)
        second = await RemoteUpload.start(client, records, "x", None)
    assert first.uuid == uuid
    assert sorted(p.name for p in records.directory.iterdir()) == sorted(
        [f"{uuid}.json", f"{second.uuid}.json"]
    )
