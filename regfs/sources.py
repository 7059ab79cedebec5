"""What SOURCE names: a storage root directory, `inmemory:`, a registry over HTTP(S), or a
registry's S3 bucket (`s3://BUCKET/PREFIX`).

Each implementation is imported by the function that opens it, so `regfs umount`, and the
parent process of a `regfs mount`, load only what their SOURCE needs (all of it took 0.25 s
of CPU per command)."""

from __future__ import annotations

import os
import re
import stat
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import platformdirs

from storage.api import RegistrySource

from .mountpoint import MountError
from .options import MountOptions

if TYPE_CHECKING:
    from storage.drivers import StorageDriver
    from storage.drivers.s3 import S3Driver
    from storage.remote.registry import RemoteRegistry

SUPPORTED = (
    "a storage root directory, 'inmemory:', https://HOST[:PORT] (http:// too), "
    "or s3://BUCKET[/PREFIX]"
)


# A registry host as people write it for docker and skopeo (`ghcr.io`, `quay.io`,
# `registry.example.com`): dotted labels, the last one letters only.
_HOST_LIKE = re.compile(r"(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}")


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def split_login(source: str) -> tuple[str, str | None, str | None]:
    """`https://user:pass@host` → (`https://host`, user, pass), percent-decoded.

    The login must not ride along in the source: the source is shown in the daemon's command
    line (`ps`), in /proc/mounts (fsname) and in the log. The caller hands the password on as
    `--password-stdin` does, through a pipe."""
    if not is_remote(source):
        return source, None, None
    parts = urlsplit(source)
    if "@" not in parts.netloc:
        return source, None, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    stripped = urlunsplit(parts._replace(netloc=hostport))
    return stripped, unquote(user) or None, unquote(password) if sep else None


def refuse_host_like(source: str) -> None:
    """`regfs mount ghcr.io MNT` means the registry, not a new empty root named ghcr.io in
    the working directory: refuse such a name (as typed, before it is made absolute) unless
    it exists, and say what to write."""
    if _HOST_LIKE.fullmatch(source) and not os.path.lexists(source):
        raise ValueError(
            f"{source!r} is not a directory; to mount the registry at that host, say "
            f"https://{source} (or ./{source} to make a new storage root there)"
        )


# What a registry's filesystem driver keeps under its root, and what a volume may add.
REGISTRY_TREE = os.path.join("docker", "registry")
_VOLUME_EXTRAS = {"lost+found"}


def check_storage_root(path: str, *, missing_ok: bool, init: bool = False) -> None:
    """Refuse a path that is not a registry storage root, so that a typo (`regfs mount /etc
    MNT`) is not mounted as an empty, writable registry. A root is a directory holding the
    registry's tree, or nothing yet (a new root); `init` makes any directory one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if missing_ok:
            return
        raise ValueError(f"{path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is not a directory (a storage root is a directory)")
    if init or os.path.isdir(os.path.join(path, REGISTRY_TREE)):
        return
    others = sorted(set(os.listdir(path)) - _VOLUME_EXTRAS)
    if others:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise ValueError(
            f"{path} is not a registry storage root: it has no {REGISTRY_TREE}/ but holds "
            f"{shown} (--init makes it one anyway)"
        )


def existing_root(path: str, s3_endpoint: str | None = None) -> StorageDriver:
    """The storage root (or bucket) that `regfs check` and `purge-uploads` work on; it must
    exist."""
    try:
        if is_s3(path):
            driver = open_s3(path, s3_endpoint)
            driver.check_bucket()
            return driver
        check_storage_root(path, missing_ok=False)
    except ValueError as exc:
        raise MountError(str(exc)) from None
    from storage.drivers import FilesystemDriver

    return FilesystemDriver(path)


# --------------------------------------------------------------------------- s3://

# S3's rules for a bucket name (lower case, digits, dots, hyphens; 3 to 63 characters).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# The registry's rootdirectory: storage path names, as every path a driver is given.
_PREFIX = re.compile(r"(?:/[A-Za-z0-9._-]+)*")


def is_s3(source: str) -> bool:
    return source.startswith("s3://")


def open_s3(source: str, endpoint: str | None) -> S3Driver:
    """`s3://BUCKET/PREFIX` → the S3 driver (nothing is contacted yet). PREFIX is the
    registry's `rootdirectory`; credentials and region come from the standard AWS chain, the
    endpoint from s3_endpoint or, without it, from that chain (AWS_ENDPOINT_URL)."""
    # Imported here: boto3 adds a quarter of a second to every regfs command otherwise.
    from storage.drivers.s3 import S3Driver, s3_client

    parts = urlsplit(source)
    prefix = parts.path.rstrip("/")
    if parts.query or parts.fragment or "@" in parts.netloc or not _BUCKET.fullmatch(parts.netloc):
        raise ValueError(
            f"{source!r} is not s3://BUCKET[/PREFIX] with a valid bucket name (3-63 of a-z, "
            f"0-9, '.', '-'); sources are {SUPPORTED}"
        )
    if not _PREFIX.fullmatch(prefix) or any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"{source!r}: the prefix must be a path of plain names (a-z, 0-9, ._-)")
    return S3Driver(parts.netloc, prefix, client=s3_client(endpoint))


def open_root(source: str, *, init: bool = False) -> RegistrySource:
    """A storage root directory (made when missing) or `inmemory:`, as a registry."""
    if source != "inmemory:":
        check_storage_root(source, missing_ok=True, init=init)
    try:
        from storage.drivers import open_driver
        from storage.registry import Registry

        return Registry(open_driver(source))
    except ValueError:
        raise ValueError(f"unsupported source {source!r}: use {SUPPORTED}") from None


def open_registry(options: MountOptions) -> RegistrySource:
    """The registry SOURCE names; nothing is contacted yet (see check_source)."""
    if is_s3(options.source):
        from storage.registry import Registry

        return Registry(open_s3(options.source, options.s3_endpoint))
    if not is_remote(options.source):
        return open_root(options.source, init=options.init)
    return _open_remote(options)


def _open_remote(options: MountOptions) -> RemoteRegistry:
    from storage.remote.client import RemoteClient
    from storage.remote.credentials import Credentials
    from storage.remote.registry import RemoteRegistry

    settings: dict[str, Any] = {"insecure": options.insecure, "ca_file": options.ca_file}
    if options.timeout is not None:
        settings["timeout"] = options.timeout
    if options.username is not None:
        credentials = Credentials(options.username, options.password or "")
        client = RemoteClient(options.source, credentials=credentials, **settings)
    else:
        client = RemoteClient.from_docker_config(options.source, **settings)
    state = platformdirs.user_state_path("regfs")
    return RemoteRegistry(client, state, listing_ttl=options.tag_ttl)


def check_source(options: MountOptions) -> None:
    """Fail early and clearly: a root that cannot be made, a registry that does not answer
    its ping (GET /v2/, authenticating as needed), a bucket that is not there or not ours."""
    if is_s3(options.source):
        open_s3(options.source, options.s3_endpoint).check_bucket()
    elif is_remote(options.source):
        import trio

        trio.run(_ping, _open_remote(options))
    else:
        open_root(options.source, init=options.init)


def start_workers(registry: RegistrySource) -> None:
    """A storage root's or bucket's driver starts its workers now (the stat worker of a local
    root), not at the first listing that wants them. Not through storage.registry: a remote
    daemon does not import it (~40 ms)."""
    from storage.drivers.base import StorageDriver

    if isinstance(driver := getattr(registry, "driver", None), StorageDriver):
        driver.start_workers()


async def read_ahead(options: MountOptions, registry: RegistrySource) -> None:
    """What a new mount's first lookup will ask, asked as it starts (in the background):
    a remote registry's catalog, which any lookup below the root reads (is the name a
    repository, or on the way to one?), so the first `ls` or `cat` after `regfs mount` finds
    it fetched, within the listing TTL, instead of waiting for the registry. A mount left
    unused for longer asks it once more; a failure is left for that lookup to report."""
    if is_remote(options.source):
        from storage.remote.registry import RemoteRegistry

        assert isinstance(registry, RemoteRegistry)
        await registry.catalog.read_ahead()


async def _ping(registry: RemoteRegistry) -> None:
    try:
        await registry.client.ping()
    finally:
        await registry.aclose()
