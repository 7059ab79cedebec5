"""The entry point: a registry over one driver, and its repositories."""

from __future__ import annotations

from .blobs import BlobStore
from .catalog import Catalog
from .drivers import StorageDriver
from .layers import LayerService
from .manifests import ManifestService
from .names import validate_name
from .tags import TagService


class Repository:
    def __init__(self, driver: StorageDriver, blobs: BlobStore, name: str) -> None:
        self.name = validate_name(name)
        self.layers = LayerService(driver, blobs, name)
        self.tags = TagService(driver, name)
        self.manifests = ManifestService(blobs, self.layers.linked, self.tags, name)


class Registry:
    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self.blobs = BlobStore(driver)
        self.catalog = Catalog(driver)

    def repository(self, name: str) -> Repository:
        """A repository view; InvalidName for a name the registry would refuse."""
        return Repository(self.driver, self.blobs, name)
