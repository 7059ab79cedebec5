"""Shared fixtures: every storage test runs on both drivers."""

from __future__ import annotations

import pytest

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
