"""A CDN a blob is redirected to may redirect back to any path of the registry: once a chain
of redirects has left the registry's origin, no later hop gets the user's Authorization or
a token fetch, even back at the registry (the first request is the user's, what a third
party names is not). Each path that follows redirects is played: plain requests, streams,
the range threads (one range, an open body), a single small GET and pipelined ones."""

from __future__ import annotations

import pytest
from support.fault_server import Fault, FaultServer

from storage.errors import AccessDenied
from storage.remote.client import RemoteClient
from storage.remote.credentials import Credentials

pytestmark = [pytest.mark.remote]

BLOB = "/v2/x/blobs/sha256:" + "0" * 64
MANIFEST = "/v2/x/manifests/"
SECRET = "/v2/secret/manifests/latest"  # what the CDN names: never asked with credentials
BASIC = (("WWW-Authenticate", 'Basic realm="r"'),)


def client_of(url: str) -> RemoteClient:
    return RemoteClient(url, timeout=3, retries=0, credentials=Credentials("alice", "pw"))


def cdn_sends_back(registry: FaultServer, cdn: FaultServer) -> None:
    """Every blob and manifest GET of the registry goes to the CDN, which names SECRET."""
    to_cdn = (("Location", f"{cdn.url}/blob?sig=1"),)
    registry.inject(Fault(307, headers=to_cdn, path="/blobs/|/v2/x/manifests/"), times=200)
    cdn.inject(Fault(302, headers=(("Location", f"{registry.url}{SECRET}"),)), times=200)


async def every_path(client: RemoteClient) -> None:
    """Each way the client follows redirects."""
    await client.request("GET", BLOB)
    async with client.stream("GET", BLOB) as resp:
        await resp.aread()
    assert await client.get_range(BLOB, 0, 2) == b"{}"  # the whole `{}`, as to a 200
    body = await client.open_range(BLOB, 0, 2)
    if body is not None:
        body.close()
    await client.small("GET", MANIFEST + "a")
    await client.small_many("GET", [MANIFEST + str(n) for n in range(40)])


async def test_a_cdn_naming_a_registry_path_gets_it_asked_without_credentials() -> None:
    with FaultServer() as registry, FaultServer() as cdn:
        registry.inject(Fault(401, headers=BASIC, path="^/v2/$"))
        cdn_sends_back(registry, cdn)
        async with client_of(registry.url) as client:
            await client.ping()
            await every_path(client)
            assert client._auth.scheme == "basic"
    secret = [s for s in registry.seen if s.path == SECRET]
    assert len(secret) >= 6  # each path reached it at least once
    assert [s.authorization for s in secret] == [None] * len(secret)
    assert all(s.authorization is None for s in cdn.seen)
    asked = [s for s in registry.seen if s.path in (BLOB, MANIFEST + "a")]
    assert asked and all(str(s.authorization).startswith("Basic ") for s in asked)


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
async def test_a_401_at_the_end_of_a_chain_that_left_the_registry_is_not_acted_on(
    scheme: str,
) -> None:
    """The path the CDN named answers 401: neither Basic credentials are sent there again
    nor a token fetched for its scope; the read is AccessDenied."""
    with FaultServer() as registry, FaultServer() as cdn:
        bearer = (("WWW-Authenticate", f'Bearer realm="{registry.url}/token",service="r"'),)
        challenge = BASIC if scheme == "basic" else bearer
        registry.inject(Fault(401, headers=challenge, path="^/v2/$"))
        if scheme == "bearer":
            registry.inject(Fault(200, body=b'{"token":"tok-pull-x"}', path="^/token"), times=4)
        cdn_sends_back(registry, cdn)
        registry.inject(Fault(401, headers=challenge, path=f"^{SECRET}$"), times=20)
        async with client_of(registry.url) as client:
            await client.ping()
            with pytest.raises(AccessDenied, match="sends credentials to the registry only"):
                await client.request("GET", BLOB)
            with pytest.raises(AccessDenied):
                await client.get_range(BLOB, 0, 2)
    secret = [s for s in registry.seen if s.path == SECRET]
    assert secret and all(s.authorization is None for s in secret)
    tokens = [s.path for s in registry.seen if s.path.startswith("/token")]
    assert all("secret" not in path for path in tokens)
    blob_gets = [s for s in registry.seen if s.path == BLOB]
    assert blob_gets and all(s.authorization is not None for s in blob_gets)
