"""Every registry source as the service tests see it (`Source`); the `source` fixture in
tests/conftest.py makes one per implementation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from storage.api import RegistrySource

# What a source legitimately cannot do, and why: service tests assert the documented
# fallback for these instead of the full behaviour (see Source.can), never skip silently.
REMOTE_CANNOT = {
    "write_below_the_end": "the upload protocol appends in order: it cannot rewrite",
    "cut": "the upload protocol appends in order: it cannot cut below the end",
    "read_upload": "the API cannot read an upload's bytes back (a read of them is an error)",
    "list_untagged": "the API lists tags only: manifests/ and layers/ show what tagged "
    "manifests reference, plus the blobs pushed through this client",
    "delete_tag": "docker-registry 2.8 refuses DELETE of a manifest by tag (400 UNSUPPORTED); "
    "only registries of the OCI distribution spec 1.1 untag",
    "remove_repository": "the API cannot remove a repository: rmdir takes only one this mount "
    "made and never filled (NotEmpty for any other)",
}
S3_CANNOT = {
    "write_below_the_end": "SPEC §10: S3 uploads are written in order, whatever their size "
    "(only an unsealed tail could be rewritten: one rule is what a user can predict)",
}
CANNOT = {"remote": REMOTE_CANNOT, "s3": S3_CANNOT}  # by Source.kind


@dataclass
class Source:
    """One registry implementation, as the service tests see it.

    `registry` is fresh for the test; `name(repo)` puts a repository in a namespace of its
    own (the remote source shares one docker-registry across a module); `reopen()` gives
    another view of the same storage, as a restarted daemon would have."""

    kind: str
    registry: RegistrySource
    opener: Callable[[], RegistrySource]
    prefix: str
    opened: list[RegistrySource] = field(default_factory=list)

    @property
    def cannot(self) -> dict[str, str]:
        """What this kind of source legitimately cannot do (CANNOT)."""
        return CANNOT.get(self.kind, {})

    def name(self, repo: str) -> str:
        return f"{self.prefix}/{repo}"

    def can(self, capability: str) -> bool:
        return capability not in self.cannot

    def reopen(self) -> RegistrySource:
        registry = self.opener()
        self.opened.append(registry)
        return registry
