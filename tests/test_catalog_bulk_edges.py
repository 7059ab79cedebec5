"""`Catalog.children` with its bulk checks (`StorageDriver.present`, `empty`) against the
walk they stand for (`Catalog.holds_repository` of each child, on a fresh driver), over
names that sort between a name and its keys (`a`, `a-b`, `a.b`, `a0`), names ending in s
(their keys hold `s/` right after the name: S3 lists them key by key), children in every
state the registry or a root's owner leaves (a repository, `_manifests` or `_uploads`
alone, an emptied `_uploads/`, hash states alone, nested, empty and nested empty, a
`_layers` that is a file or an empty directory, keys that sort between `_layers` and its
keys), and on S3 pages of 1 to 3 entries (a page ends mid-name) and runs of 1 to 300."""

from __future__ import annotations

import functools

import pytest
from botocore.exceptions import ClientError
from support.s3 import MotoServer
from support.statworkers import worker_ready

from storage.catalog import Catalog
from storage.drivers import FilesystemDriver, InMemoryDriver, StorageDriver
from storage.drivers import s3 as s3_module
from storage.drivers.s3 import S3Driver

pytestmark = pytest.mark.storage

NAMESPACE = "libs/tools"  # holds `s/` itself: S3's delimiter applies below the prefix only
TREE = f"docker/registry/v2/repositories/{NAMESPACE}"
UUID = "0123abcd-0000-0000-0000-0123456789ab"
HEX = "ab" * 32
STATES: dict[str, tuple[list[str], list[str]]] = {  # files, empty directories
    "repository": ([f"_layers/sha256/{HEX}/link", "_manifests/tags/v/current/link"], []),
    "big": ([f"_layers/sha256/{i:064x}/link" for i in range(12)], []),
    "manifests": ([f"_manifests/revisions/sha256/{HEX}/link"], []),
    "upload": ([f"_uploads/{UUID}/startedat", f"_uploads/{UUID}/data"], []),
    "purged": ([], ["_uploads"]),
    "hashstates": ([f"_uploads/{UUID}/hashstates/sha256/0"], []),
    "empty": ([], [""]),
    "nested": ([f"inner/_layers/sha256/{HEX}/link"], []),
    "nested-s": ([f"bus/_layers/sha256/{HEX}/link", "0s/x/y"], []),
    "nested-empty": ([], ["p/q/r/s"]),
    "layers-file": (["_layers"], []),
    "layers-empty": ([], ["_layers"]),
    "between": (["_layers-x/a", "_layersa", "_layer", "_layers.s/x"], []),
}
NAMES = ["a", "a-b", "a.b", "a0", "as", "a-s", "a.s", "b", "bus", "s", "ss", "x_y", "a__b", "z9"]


def layout(count: int) -> dict[str, str]:
    """count children (the adversarial NAMES first), the states in turn."""
    names = [*NAMES, *(f"n{i:05d}" + "s" * (i % 2) for i in range(count - len(NAMES)))]
    states = list(STATES)
    return {name: states[i % len(states)] for i, name in enumerate(sorted(names[:count]))}


def paths(children: dict[str, str]) -> tuple[list[str], list[str]]:
    files, directories = [], []
    for name, state in children.items():
        below, empty = STATES[state]
        files += [f"{TREE}/{name}/{path}" for path in below]
        directories += [f"{TREE}/{name}/{path}".rstrip("/") for path in empty]
    return files, directories


async def walked(driver: StorageDriver) -> list[str]:
    """What d966217 listed: each child walked alone (`holds_repository`)."""
    catalog = Catalog(driver)
    entries = await catalog._entries(NAMESPACE)
    return [
        e
        for e in entries
        if not e.startswith("_") and await catalog.holds_repository(f"{NAMESPACE}/{e}")
    ]


async def stated(driver: StorageDriver, names: list[str]) -> list[bool]:
    """What a stat of each child's `_layers` says, one by one: what `present` must answer
    (a False where a stat finds it costs a walk; a True where it does not is a wrong
    listing)."""
    return [await _stat_finds(driver, f"/{TREE}/{name}/_layers") for name in names]


async def _stat_finds(driver: StorageDriver, path: str) -> bool:
    try:
        await driver.stat(path)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("count", [0, 1, 14, 65, 300, 301])
@pytest.mark.parametrize("openat2", [True, False])
async def test_a_local_root_lists_what_a_walk_of_each_child_lists(tmp_path, count, openat2):
    files, directories = paths(layout(count))
    root = tmp_path / "root"
    (root / TREE).mkdir(parents=True)
    for path in files:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    for path in directories:
        (root / path).mkdir(parents=True, exist_ok=True)
    driver = FilesystemDriver(root, openat2=openat2)
    await worker_ready(driver)
    names = sorted(layout(count))
    try:
        listed = await Catalog(driver).children(NAMESPACE)
        found = await driver.present(f"/{TREE}", [f"{name}/_layers" for name in names])
    finally:
        driver._stat_worker.close()
    fresh = FilesystemDriver(root, openat2=openat2)
    assert listed == await walked(fresh)
    assert found == await stated(fresh, names)


@pytest.mark.parametrize("count", [0, 1, 14, 300])
async def test_memory_lists_what_a_walk_of_each_child_lists(count):
    driver = InMemoryDriver()
    files, directories = paths(layout(count))
    for path in files:
        await driver.put_content(f"/{path}", b"x")
    for path in directories:  # an empty directory: what a delete leaves
        await driver.put_content(f"/{path}/x", b"x")
        await driver.delete(f"/{path}/x")
    assert await Catalog(driver).children(NAMESPACE) == await walked(driver)


@pytest.mark.parametrize(
    ("count", "max_keys", "run"), [(14, 1, 1), (40, 2, 3), (40, 3, 300), (301, 1000, 300)]
)
async def test_s3_lists_what_a_walk_of_each_child_lists_whatever_its_pages(
    moto_server: MotoServer, s3_bucket, monkeypatch, count, max_keys, run
):
    monkeypatch.setattr(s3_module, "PRESENT_RUN", run)
    files, _ = paths(layout(count))  # S3 keeps no empty directory
    s3 = moto_server.client()
    for path in files:
        s3.put_object(Bucket=s3_bucket, Key=f"regroot/{path}", Body=b"x")
    driver = S3Driver(s3_bucket, "/regroot", client=moto_server.client())
    monkeypatch.setattr(
        driver._lister, "page", functools.partial(_paged, driver._lister.page, max_keys)
    )
    listed = await Catalog(driver).children(NAMESPACE)
    names = sorted(layout(count))
    found = await driver.present(f"/{TREE}", [f"{name}/_layers" for name in names])
    fresh = S3Driver(s3_bucket, "/regroot", client=moto_server.client())
    assert listed == await walked(fresh)
    assert found == await stated(fresh, names)
    assert len(listed) > count // 3 or count < 14


def _paged(page, limit, prefix, delimiter="", max_keys=1000, token=None, start_after=""):  # type: ignore[no-untyped-def]
    """A page of at most limit entries (moto's MaxKeys): pages that end mid-name."""
    return page(prefix, delimiter, min(limit, max_keys), token=token, start_after=start_after)


async def test_s3_where_the_store_takes_no_delimiter_but_a_slash(
    moto_server: MotoServer, s3_bucket, monkeypatch
):
    files, _ = paths(layout(40))
    s3 = moto_server.client()
    for path in files:
        s3.put_object(Bucket=s3_bucket, Key=f"regroot/{path}", Body=b"x")
    driver = S3Driver(s3_bucket, "/regroot", client=moto_server.client())
    monkeypatch.setattr(driver._lister, "page", functools.partial(_slash_only, driver._lister.page))
    names = sorted(layout(40))
    fresh = S3Driver(s3_bucket, "/regroot", client=moto_server.client())
    assert await Catalog(driver).children(NAMESPACE) == await walked(fresh)
    assert not driver._delimited  # refused once: key by key from then on
    found = await driver.present(f"/{TREE}", [f"{name}/_layers" for name in names])
    assert found == await stated(fresh, names)
    driver.forget()  # SIGHUP: tried again
    assert driver._delimited


def _slash_only(page, prefix, delimiter="", max_keys=1000, token=None, start_after=""):  # type: ignore[no-untyped-def]
    """What a store that takes no delimiter but '/' answers (SiaFoundation s3d: 501). The
    driver's listings key by key answer it: regfs lists its namespaces (a fallback,
    logged once a driver)."""
    if delimiter not in ("", "/"):
        raise ClientError(
            {"Error": {"Code": "NotImplemented", "Message": "delimiter must be /"},
             "ResponseMetadata": {"HTTPStatusCode": 501}},
            "ListObjectsV2",
        )  # fmt: skip
    return page(prefix, delimiter, max_keys, token=token, start_after=start_after)
