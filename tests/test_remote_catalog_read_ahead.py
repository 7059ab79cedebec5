"""A remote mount reads the registry's catalog as it starts, and one `_catalog` at a time
(stop 25, h4; issue 18: `ls` of a namespace on a fresh mount against the registry's
`_catalog`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from support.fault_server import Fault, FaultServer
from support.mounts import Mount, wait_until
from support.registry import RegistryServer
from support.tools import sh

from storage.remote.registry import RemoteRegistry

pytestmark = pytest.mark.registry


def catalogs(proxy: FaultServer) -> list[tuple[str, int | None]]:
    return [(s.path, s.status) for s in proxy.seen if s.path.startswith("/v2/_catalog")]


async def test_a_lookup_during_the_read_ahead_waits_for_its_answer(
    proxied: RemoteRegistry, proxy: FaultServer
) -> None:
    """The mount's read-ahead of the catalog and a lookup that comes meanwhile ask the
    registry once: the lookup takes the read-ahead's answer (before: each fetched it)."""
    body = b'{"repositories": ["slow/one"]}'
    proxy.inject(Fault(200, body=body, delay=0.5, method="GET", path=r"/_catalog$"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxied.catalog.read_ahead)
        await trio.sleep(0.1)
        assert await proxied.catalog.is_repository("slow/one")
    assert catalogs(proxy) == [("/v2/_catalog?n=1000", 200)]


async def test_a_failed_read_ahead_is_left_for_the_lookup(
    proxied: RemoteRegistry, proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """A read-ahead the registry answers with garbage raises nothing (it runs beside the
    mount, for no one): the lookup asks again, and would report what it meets."""
    module_registry_server.client().push_blob("ahead/failed", b"x")
    proxy.inject(Fault(200, body=b"no json", method="GET", path=r"/_catalog$"))
    await proxied.catalog.read_ahead()
    assert await proxied.catalog.is_repository("ahead/failed")
    assert [status for _, status in catalogs(proxy)] == [200, 200]


def test_a_fresh_mount_reads_the_catalog_before_any_lookup(
    remote_mount: Callable[..., Mount], proxy: FaultServer, module_registry_server: RegistryServer
) -> None:
    """Any lookup below the root reads the catalog (is the name a repository?), so a remote
    mount fetches it as it starts: `ls` of a namespace right after the mount then asks the
    registry nothing, nor per repository it shows, and a listing within the TTL nothing."""
    client = module_registry_server.client()
    names = [f"r{i:02d}" for i in range(12)]
    for name in names:
        client.push_blob(f"spread/{name}", name.encode())
    proxy.seen.clear()
    m = remote_mount(via=proxy.url)
    wait_until(lambda: catalogs(proxy), 10, "the catalog read as the mount starts")
    asked = len(proxy.seen)
    assert sh("ls", m.path("spread")).stdout.split() == names
    assert sh("ls", m.path("spread")).stdout.split() == names
    assert catalogs(proxy) == [("/v2/_catalog?n=1000", 200)]
    assert len(proxy.seen) == asked
