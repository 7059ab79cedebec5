"""Shared fixtures: storage tests run on both drivers; registry tests get a real registry;
service tests run on every source (`source`: in memory, a filesystem root, an S3 bucket on
moto, and the remote registry)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.fault_server import FaultServer
from support.mounts import Mount
from support.registry import RegistryClient, RegistryServer, running_registry
from support.s3 import MotoServer
from support.sources import Source
from support.users import OtherUser, other_user_env

from storage.api import RegistrySource
from storage.drivers import FilesystemDriver, InMemoryDriver, StorageDriver
from storage.drivers.s3 import S3Driver
from storage.registry import Registry
from storage.remote.client import RemoteClient
from storage.remote.registry import RemoteRegistry

# The layers of the suite (pyproject.toml's markers; docs/testing.md): `-m` selects by them.
LAYERS = ("storage", "mount", "registry", "remote")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to at least one layer, so that no `-m` selection misses it."""
    unmarked = [item.nodeid for item in items if not any(map(item.get_closest_marker, LAYERS))]
    if unmarked:
        raise pytest.UsageError(
            f"tests without a layer marker ({', '.join(LAYERS)}): {', '.join(unmarked)}"
        )


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Mounts keep layer indexes in $XDG_CACHE_HOME/regfs/index (rootfs/): the tests' own
    directory, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


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


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One S3 server (moto) on loopback for the session; tests take buckets of their own."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> str:
    """A new, empty bucket on the session's S3 server."""
    return moto_server.new_bucket()


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
def remote_mount(
    mount: Callable[..., Mount],
    module_registry_server: RegistryServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Mount]:
    """remote_mount(*args, via=URL) → a started mount of the module's real registry over
    HTTP (or of `via`, a proxy in front of it)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the mounts' upload records

    def start(*args: str, via: str | None = None) -> Mount:
        return mount(via or module_registry_server.url, *args)

    return start


@pytest.fixture
def tracked() -> Iterator[Callable[..., Mount]]:
    """track(mountpoint, log) → a Mount that is stopped (and its log checked) at teardown:
    for mounts made by other command lines (no source, --foreground, mount(8), fstab)."""
    with ExitStack() as stack:

        def track(mountpoint: Path, log: Path, allow_tracebacks: bool = False) -> Mount:
            m = Mount("", Path(mountpoint), Path(log), [], allow_tracebacks)
            stack.push(m)  # its __exit__: unmount whatever state it is in, check the log
            return m

        yield track


@pytest.fixture
def other_user() -> OtherUser:
    """A second, unprivileged local user (made once when missing): tests/support/users.py."""
    return other_user_env()


# --------------------------------------------------------------------------- every source

_unique = itertools.count()


@pytest.fixture(scope="module")
def module_registry_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """One docker-registry per test module (a start costs about a second); tests share it
    through repository names of their own (Source.name). Stopped when the module ends."""
    base = tmp_path_factory.mktemp("services")
    yield from running_registry(base / "root", workdir=base / "registry")


@pytest.fixture
def proxy(module_registry_server: RegistryServer) -> Iterator[FaultServer]:
    """A FaultServer in front of the module's registry: it records each request it passes
    on (`seen`) and injects the faults a test gives it."""
    with FaultServer(upstream=module_registry_server.url) as server:
        yield server


@pytest.fixture
async def proxied(proxy: FaultServer, tmp_path: Path) -> AsyncIterator[RemoteRegistry]:
    """A remote source (storage/remote) of the module's registry through `proxy`."""
    client = RemoteClient(proxy.url, timeout=5)
    async with contextlib.aclosing(RemoteRegistry(client, tmp_path / "state", 30.0)) as source:
        yield source


@pytest.fixture(
    params=[
        "inmemory",
        "filesystem",
        "s3",
        pytest.param("remote", marks=[pytest.mark.registry, pytest.mark.remote]),
    ]
)
async def source(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Source]:
    """Every registry implementation in turn; a new source is one more parameter here."""
    kind: str = request.param
    memory = InMemoryDriver()
    url = request.getfixturevalue("module_registry_server").url if kind == "remote" else ""
    if kind == "s3":  # a bucket of its own on the session's moto
        moto: MotoServer = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")

    def opener() -> RegistrySource:
        if kind == "inmemory":
            return Registry(memory)
        if kind == "filesystem":
            return Registry(FilesystemDriver(tmp_path / "root"))
        if kind == "s3":
            return Registry(S3Driver(bucket, "/regroot", client=moto.client()))
        # The upload records live in the state dir, so a reopened view resumes uploads.
        return RemoteRegistry(RemoteClient(url, timeout=10), tmp_path / "state", listing_ttl=0)

    src = Source(kind, opener(), opener, f"svc{next(_unique)}")  # its kind's `cannot`
    try:
        yield src
    finally:
        for registry in (src.registry, *src.opened):
            await registry.aclose()
