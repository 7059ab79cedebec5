"""Which children of a namespace are repositories, asked of the driver in one call
(`StorageDriver.present`, stop 27, a): since d966217 `Catalog.children` checks each child
(`_layers`, as the registry's `_catalog` counts them), one stat each on the daemon's loop
(a local root) or one request each (S3). Now a local root states them in the stat worker
process and a worker thread at once, never opening or following anything; S3 answers from
listings of the namespace's keys; memory from its tree. Only the children none vouches for
are walked (`holds_repository`), so what d966217's tests pin stays (test_namespace_catalog.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from support.fault_server import FaultServer
from support.s3 import MotoServer, s3_call

from storage.catalog import Catalog
from storage.drivers import FilesystemDriver, InMemoryDriver
from storage.drivers import s3 as s3_module
from storage.drivers.bulkstat import empty, present
from storage.drivers.s3 import S3Driver

pytestmark = pytest.mark.storage

NAMESPACE = "/docker/registry/v2/repositories/many"
COUNT = 300  # past INLINE_ENTRIES: the worker and a thread, each a part


def plant(root: Path, outside: Path) -> dict[str, bool]:
    """A namespace of COUNT repositories and the children a hostile root's owner plants,
    each with what `stat` of its `_layers` answers (True: counted, as it was by d966217)."""
    ns = root / NAMESPACE.lstrip("/")
    for i in range(COUNT):
        (ns / f"r{i:04d}" / "_layers").mkdir(parents=True)
    (outside / "_layers").mkdir(parents=True)
    expected = {f"r{i:04d}": True for i in range(COUNT)}
    (ns / "linked").symlink_to(outside)  # a child that is a symlink out: never followed
    expected["linked"] = False
    (ns / "layers-linked").mkdir()
    (ns / "layers-linked" / "_layers").symlink_to(outside / "_layers")
    expected["layers-linked"] = False
    (ns / "fifo").mkdir()
    os.mkfifo(ns / "fifo" / "_layers")  # stated, never opened: no open of it could block
    expected["fifo"] = True
    (ns / "file").mkdir()
    (ns / "file" / "_layers").write_bytes(b"")
    expected["file"] = True
    (ns / "empty").mkdir()
    expected["empty"] = False
    (ns / "uploads-only" / "_uploads").mkdir(parents=True)
    expected["uploads-only"] = False
    (ns / "plain").write_bytes(b"")  # a file, no directory
    expected["plain"] = False
    return dict(sorted(expected.items()))


async def stated_each(driver: FilesystemDriver, names: list[str]) -> list[bool]:
    """What a stat of each `_layers` says, one by one (d966217's way)."""
    found = []
    for name in names:
        try:
            await driver.stat(f"{NAMESPACE}/{name}/_layers")
            found.append(True)
        except Exception:
            found.append(False)
    return found


@pytest.mark.parametrize("openat2", [True, False])
async def test_a_local_root_answers_in_the_worker_and_a_thread_as_stats_do(
    tmp_path, openat2, monkeypatch
):
    root = tmp_path / "root"
    expected = plant(root, tmp_path / "outside")
    names = list(expected)
    marked = [f"{name}/_layers" for name in names]
    driver = FilesystemDriver(root, openat2=openat2)
    assert await stated_each(driver, names) == list(expected.values())
    fd = os.open(root / NAMESPACE.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
    try:
        assert present(driver._resolve, fd, marked) == list(expected.values())
    finally:
        os.close(fd)

    driver._stat_worker.start()
    with trio.fail_after(10):
        while not driver._stat_worker.ready:
            await trio.sleep(0.01)
    asked: list[int] = []
    real = driver._stat_worker.check

    async def counted(
        which: str, directory: int, use_openat2: bool, part: list[str]
    ) -> list[bool] | None:
        asked.append(len(part))
        return await real(which, directory, use_openat2, part)

    monkeypatch.setattr(driver._stat_worker, "check", counted)
    assert await driver.present(NAMESPACE, marked) == list(expected.values())
    assert asked == [len(names) - len(names) // 2]  # the later half in the worker
    assert await driver.present(NAMESPACE, marked[:3]) == list(expected.values())[:3]
    assert len(asked) == 1  # a few: inline
    driver._stat_worker.close()


@pytest.mark.parametrize("openat2", [True, False])
async def test_empty_directories_are_told_in_bulk_opening_nothing_but_directories(
    tmp_path, openat2
):
    root = tmp_path / "root"
    ns = root / NAMESPACE.lstrip("/")
    outside = tmp_path / "outside"
    outside.mkdir()
    expected = {f"e{i:04d}": True for i in range(COUNT)}  # what the registry's deletes leave
    for name in expected:
        (ns / name).mkdir(parents=True)
    (ns / "app" / "_layers").mkdir(parents=True)
    (ns / "uploads" / "_uploads").mkdir(parents=True)
    (ns / "linked").symlink_to(outside)  # empty, but a symlink out: never followed
    os.mkfifo(ns / "fifo")  # O_DIRECTORY fails before any open: no reader waits
    (ns / "file").write_bytes(b"")
    expected |= {"app": False, "uploads": False, "linked": False, "fifo": False, "file": False}
    expected |= {"gone": False}
    names = sorted(expected)
    driver = FilesystemDriver(root, openat2=openat2)
    fd = os.open(ns, os.O_PATH | os.O_DIRECTORY)
    try:
        assert empty(driver._resolve, fd, names) == [expected[n] for n in names]
    finally:
        os.close(fd)
    assert await driver.empty(NAMESPACE, names) == [expected[n] for n in names]  # a thread
    driver._stat_worker.start()
    with trio.fail_after(10):
        while not driver._stat_worker.ready:
            await trio.sleep(0.01)
    assert await driver.empty(NAMESPACE, names) == [expected[n] for n in names]  # both
    assert await Catalog(driver).children("many") == ["app"]
    driver._stat_worker.close()


async def test_a_worker_that_fails_leaves_the_thread_to_state_them_all(tmp_path, monkeypatch):
    root = tmp_path / "root"
    expected = plant(root, tmp_path / "outside")
    driver = FilesystemDriver(root)
    driver._stat_worker.start()
    with trio.fail_after(10):
        while not driver._stat_worker.ready:
            await trio.sleep(0.01)

    async def given_up(which: str, directory: int, use_openat2: bool, part: list[str]) -> None:
        return None  # as `_ask` answers for a worker given up at ANSWER_DEADLINE

    monkeypatch.setattr(driver._stat_worker, "check", given_up)
    marked = [f"{name}/_layers" for name in expected]
    assert await driver.present(NAMESPACE, marked) == list(expected.values())
    driver._stat_worker.close()


async def test_the_catalog_walks_only_the_children_the_driver_does_not_vouch_for(tmp_path):
    root = tmp_path / "root"
    expected = plant(root, tmp_path / "outside")
    (root / NAMESPACE.lstrip("/") / "uploads-only" / "_uploads" / "x").mkdir()
    (root / NAMESPACE.lstrip("/") / "nested" / "deep" / "app" / "_manifests").mkdir(parents=True)
    driver = FilesystemDriver(root)
    stats: list[str] = []
    real = driver._stat

    async def counted(path: str):  # type: ignore[no-untyped-def]
        stats.append(path)
        return await real(path)

    driver._stat = counted  # type: ignore[method-assign]
    listed = await Catalog(driver).children("many")
    shown = {name for name, yes in expected.items() if yes} | {"nested"}
    assert listed == sorted(shown - {"plain"})
    walked = {path.split("/")[6] for path in stats}
    assert walked == {"layers-linked", "uploads-only", "nested", "plain"}, walked  # not "empty"


async def test_memory_answers_from_its_tree():
    driver = InMemoryDriver()
    await driver.put_content(f"{NAMESPACE}/app/_layers/sha256/ab/link", b"x")
    await driver.put_content(f"{NAMESPACE}/other/_uploads/u/hashstates/sha256/0", b"x")
    found = await driver.present(NAMESPACE, ["app/_layers", "other/_layers", "none/_layers"])
    assert found == [True, False, False]
    await driver.put_content(f"{NAMESPACE}/gone/_layers/x", b"x")
    await driver.delete(f"{NAMESPACE}/gone/_layers")  # an empty directory left
    assert await driver.empty(NAMESPACE, ["app", "gone", "none"]) == [False, True, False]
    assert await Catalog(driver).children("many") == ["app"]


async def test_s3_decides_a_namespace_in_a_listing_not_a_request_per_child(
    moto_server: MotoServer, s3_bucket, monkeypatch
):
    # Runs of 40 (PRESENT_RUN) go at once. A name without `s/` in it is decided from a
    # listing delimited by `s/` (a repository's sections roll up: a page each run); one
    # ending in s (every fourth) from its keys, more than one page of its run reaches (25
    # each): the listing restarts at the next undecided name, so none is paged through.
    monkeypatch.setattr(s3_module, "PRESENT_RUN", 40)
    s3 = moto_server.client()
    names = [f"r{i:03d}" + ("s" if i % 4 == 1 else "") for i in range(120)]
    for i, name in enumerate(names):
        if i % 7 == 3:  # a first push the registry's DELETE left: hash states alone
            key = f"regroot{NAMESPACE}/{name}/_uploads/u{i}/hashstates/sha256/0"
            s3.put_object(Bucket=s3_bucket, Key=key, Body=b"s")
            continue
        for layer in range(25):
            key = f"regroot{NAMESPACE}/{name}/_layers/sha256/{layer:064x}/link"
            s3.put_object(Bucket=s3_bucket, Key=key, Body=b"l")
        if i % 5 == 0:
            key = f"regroot{NAMESPACE}/{name}/_manifests/tags/v1/current/link"
            s3.put_object(Bucket=s3_bucket, Key=key, Body=b"m")
    # Keys that sort between a name and its `_layers/` (`_layers-x`, `_layersa`) decide
    # nothing; one that is exactly the name is a file, which a stat finds.
    for key in ("r003/_layers-x", "r003/_layersa", "r010/_layers"):
        s3.put_object(Bucket=s3_bucket, Key=f"regroot{NAMESPACE}/{key}", Body=b"x")
    expected = [i % 7 != 3 or i == 10 for i in range(len(names))]
    asked = ["zzz", *names, "r0", "r1000"]  # beyond every key, and around them
    with FaultServer(upstream=moto_server.url) as proxy:
        driver = S3Driver(s3_bucket, "/regroot", client=moto_server.client(proxy.url))
        found = await driver.present(NAMESPACE, [f"{name}/_layers" for name in asked])
        calls = [s3_call(seen) for seen in proxy.seen]
        assert found == [False, *expected, False, False]
        assert set(calls) == {"ListObjects"}, calls
        plain = sum(not name.endswith("s") for name in asked)
        runs = len(range(0, plain, 40)) + len(range(0, len(asked) - plain, 40))
        assert len(calls) <= 2 * runs, len(calls)
        for name, yes in zip(names, expected, strict=True):  # as a stat says
            try:
                await driver.stat(f"{NAMESPACE}/{name}/_layers")
                assert yes, name
            except Exception:
                assert not yes, name
        proxy.seen.clear()
        shown = await Catalog(driver).children("many")
    assert shown == [name for name, yes in zip(names, expected, strict=True) if yes]
