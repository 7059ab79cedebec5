"""Shared fixtures: storage tests run on both drivers; registry tests get a real registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from mounts import Mount
from registry import RegistryClient, RegistryServer, running_registry
from users import OtherUser, other_user_env

from storage.drivers import FilesystemDriver, InMemoryDriver, StorageDriver
from storage.registry import Registry


@pytest.fixture(params=["inmemory", "filesystem"])
def driver(request, tmp_path) -> StorageDriver:
    if request.param == "inmemory":
        return InMemoryDriver()
    return FilesystemDriver(tmp_path / "root")


@pytest.fixture
def registry(driver) -> Registry:
    return Registry(driver)


@pytest.fixture
def registry_server(tmp_path) -> Iterator[RegistryServer]:
    """A real docker-registry on tmp_path/root; always stopped at teardown."""
    yield from running_registry(tmp_path / "root", workdir=tmp_path / "registry")


@pytest.fixture
def client(registry_server: RegistryServer) -> RegistryClient:
    return registry_server.client()


@pytest.fixture
def mount(tmp_path) -> Iterator[Callable[..., Mount]]:
    """mount(source, *args) → a started Mount; every one is unmounted at teardown."""
    with ExitStack() as stack:
        count = 0

        def start(source: str | Path, *args: str, allow_tracebacks: bool = False) -> Mount:
            nonlocal count
            count += 1
            m = Mount(
                str(source),
                tmp_path / f"mnt{count}",
                tmp_path / f"regfs{count}.log",
                list(args),
                allow_tracebacks,
            )
            return stack.enter_context(m)

        yield start


@pytest.fixture
def other_user() -> OtherUser:
    """A second, unprivileged local user (made once when missing): tests/users.py."""
    return other_user_env()
