"""RemoteClient against the real registry (anonymous, Basic, token, TLS) and a fault server.

Tests that start `docker-registry` are marked `registry`; the fault-server and offline tests
need nothing but loopback.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import httpx
import pytest
import trio
from support.credentials import credential_helper
from support.fault_server import Fault, FaultServer
from support.oci import image_manifest
from support.registry import (
    OCI_MANIFEST,
    RegistryServer,
    htpasswd_auth,
    started_registries,
    write_htpasswd,
    write_self_signed_cert,
)
from support.servers import running
from support.token_server import TokenServer
from support.tools import digest_of

from storage.errors import AccessDenied, RemoteUnavailable, StorageError
from storage.remote.auth import (
    Challenge,
    Token,
    covers,
    normalize_scope,
    parse_challenges,
    scope_for,
    scopes_for,
)
from storage.remote.client import RemoteClient, RemoteError, RemoteNotFound, TLSError
from storage.remote.credentials import Credentials, docker_config_credentials

pytestmark = pytest.mark.remote

USER, PASSWORD = "alice", "s3cret-Pa55"
IDENTITY = "idt-0f9e8d7c"  # an identity token (OAuth2 refresh token)
SERVER_THREADS = ("token-server", "fault-server", "process_request_thread")


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Every server, thread and registry process a test starts is gone when it ends."""
    yield
    threads = [t.name for t in threading.enumerate() if any(n in t.name for n in SERVER_THREADS)]
    assert not threads, f"server threads left behind: {threads}"
    assert not running(RegistryServer), "registry processes left behind"


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture
def servers(tmp_path) -> Iterator[Callable[..., RegistryServer]]:
    """start(**options) → a started RegistryServer on a fresh root; all stopped at teardown."""
    yield from started_registries(tmp_path)


@pytest.fixture
def token_servers(tmp_path) -> Iterator[Callable[..., TokenServer]]:
    with ExitStack() as stack:
        count = 0

        def start(**options: object) -> TokenServer:
            nonlocal count
            count += 1
            return stack.enter_context(TokenServer(tmp_path / f"tokens{count}", **options))

        yield start


# --------------------------------------------------------------------------- helpers


async def push_blob(client: RemoteClient, name: str, data: bytes, relative: bool = False) -> str:
    """POST, PATCH the data, PUT with the digest; each step follows the last `Location`
    (made relative, `/v2/...`, when `relative`)."""

    def next_location(resp: httpx.Response) -> str:
        location = resp.headers["Location"]
        if relative:
            url = httpx.URL(location)
            location = url.raw_path.decode("ascii")
        return location

    digest = digest_of(data)
    resp = await client.request("POST", f"/v2/{name}/blobs/uploads/", expect=(202,))
    location = next_location(resp)
    resp = await client.request(
        "PATCH",
        location,
        content=data,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"0-{len(data) - 1}",
        },
        expect=(202,),
    )
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    location = next_location(resp)
    resp = await client.request("PUT", location, params={"digest": digest}, expect=(201,))
    assert resp.headers["Docker-Content-Digest"] == digest
    return digest


async def push_image(client: RemoteClient, name: str, tag: str, layer: bytes) -> tuple[bytes, str]:
    """A minimal OCI image (config + one layer) under `tag`: (manifest bytes, digest)."""
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    await push_blob(client, name, config)
    await push_blob(client, name, layer, relative=True)
    manifest = image_manifest(config, [layer])
    await client.request(
        "PUT",
        f"/v2/{name}/manifests/{tag}",
        content=manifest,
        headers={"Content-Type": OCI_MANIFEST},
        expect=(201,),
    )
    return manifest, digest_of(manifest)


def asked(tokens: TokenServer) -> list[tuple[str, ...]]:
    """The scopes of each token request, sorted: the registry's challenges list them
    in random order (a Go map)."""
    return [tuple(sorted(normalize_scope(s) for s in r.scopes)) for r in tokens.requests]


def no_secrets(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret and secret not in text


# --------------------------------------------------------------------------- offline


def test_challenge_parsing() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"'
    )
    (c,) = parse_challenges([header])
    assert c.scheme == "bearer" and c.realm == "https://auth.example/token"
    assert c.service == "reg.example"
    assert c.scopes == ("repository:a/b:pull,push", "repository:c:pull")
    both = parse_challenges(['Basic realm="x, y", Bearer realm=r,service="s"'])
    assert both == [
        Challenge("basic", {"realm": "x, y"}),
        Challenge("bearer", {"realm": "r", "service": "s"}),
    ]
    assert parse_challenges(['Basic realm="a \\"quoted\\" realm"'])[0].realm == 'a "quoted" realm'


def test_scopes_follow_distribution() -> None:
    assert scope_for("GET", "/v2/a/b/manifests/latest") == "repository:a/b:pull"
    assert scope_for("HEAD", "/v2/a/blobs/sha256:00") == "repository:a:pull"
    assert scope_for("GET", "/v2/a/tags/list") == "repository:a:pull"
    assert scope_for("POST", "/v2/a/b/blobs/uploads/") == "repository:a/b:pull,push"
    assert scope_for("PATCH", "/v2/a/blobs/uploads/u-1") == "repository:a:pull,push"
    assert scope_for("PUT", "/v2/x/blobs/y/manifests/v1") == "repository:x/blobs/y:pull,push"
    assert scope_for("DELETE", "/v2/a/manifests/sha256:00") == "repository:a:delete"
    assert scope_for("GET", "/v2/_catalog") == "registry:catalog:*"
    assert scope_for("GET", "/v2/") is None
    assert normalize_scope("repository:a/b:push,pull") == "repository:a/b:pull,push"
    assert covers(["repository:a:pull,push", "repository:b:pull"], ["repository:a:push,pull"])
    assert not covers(["repository:a:pull"], ["repository:a:pull", "repository:b:pull"])
    mount = httpx.URL("/v2/b/blobs/uploads/?mount=sha256:00&from=a/x")
    assert scopes_for("POST", mount) == ["repository:b:pull,push", "repository:a/x:pull"]


def test_secrets_stay_out_of_reprs() -> None:
    creds = Credentials(USER, PASSWORD)
    client = RemoteClient("https://registry.example:5000", credentials=creds)
    no_secrets(repr(creds) + str(creds) + repr(client), PASSWORD)
    assert USER in repr(creds)
    no_secrets(repr(Token("tok-value-secret", 0.0)), "tok-value-secret")
    no_secrets(repr(Credentials("", "", IDENTITY)), IDENTITY)
    from_url = RemoteClient(f"https://{USER}:{PASSWORD}@registry.example")
    assert from_url.credentials == creds
    no_secrets(repr(from_url) + str(from_url.base_url), PASSWORD)


def test_plain_http_only_to_loopback_unless_insecure() -> None:
    with pytest.raises(ValueError, match="without --insecure"):  # as the user types it
        RemoteClient("http://registry.example:5000")
    RemoteClient("http://registry.example:5000", insecure=True)
    RemoteClient("http://127.0.0.1:5000")
    RemoteClient("http://localhost:5000")
    RemoteClient("http://[::1]:5000")


def test_docker_hub_names_reach_its_registry_api() -> None:
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert RemoteClient(f"https://{name}").base_url.host == "registry-1.docker.io"
    assert RemoteClient("https://ghcr.io").base_url.host == "ghcr.io"


def test_token_lifetime() -> None:
    now = time.monotonic()
    token = Token.from_response({"access_token": "t", "expires_in": 300}, now)
    assert token.value == "t" and now + 269 < token.expires <= now + 270
    assert Token.from_response({"token": "t"}, now).expires == now + 54  # 60 s default
    # A token server's 0.001 s would mean a token fetch per request: 60 s at least, as Docker.
    assert Token.from_response({"token": "t", "expires_in": 0.001}, now).expires == now + 54
    with pytest.raises(ValueError):
        Token.from_response({"expires_in": 60}, now)


def test_docker_config_keys(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = {
        "auths": {
            "https://reg.example:5000": {"auth": b64},
            "other.example": {"username": "bob", "password": "pw"},
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
            # What `az acr login` leaves: a user with no password, and an identity token.
            "acr.example": {"auth": base64.b64encode(b"0000:").decode(), "identitytoken": "i"},
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert docker_config_credentials("https://reg.example:5000") == Credentials(USER, PASSWORD)
    assert docker_config_credentials("https://acr.example") == Credentials("0000", "", "i")
    assert docker_config_credentials("https://other.example") == Credentials("bob", "pw")
    assert docker_config_credentials("https://registry-1.docker.io").username == "hub"
    assert docker_config_credentials("https://reg.example:5001") is None
    (tmp_path / "config.json").write_text("{not json " + PASSWORD)
    with pytest.raises(ValueError) as err:
        docker_config_credentials("https://reg.example:5000")
    no_secrets(str(err.value), PASSWORD)


def test_docker_credential_helpers(tmp_path, monkeypatch, caplog) -> None:
    """credHelpers for its registry, else credsStore, else auths; a helper that is missing,
    has no login leaves the next source to answer; `<token>` means an identity token."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    credential_helper(
        monkeypatch,
        tmp_path / "bin",
        "store",
        {"reg.example:5000": ("alice", PASSWORD), "https://index.docker.io/v1/": ("hub", "h")},
    )
    bin_dir = tmp_path / "bin"
    credential_helper(monkeypatch, bin_dir, "special", {"special.example": ("carol", "c")})
    credential_helper(monkeypatch, bin_dir, "tokens", {"tok.example": ("<token>", IDENTITY)})
    b64 = base64.b64encode(b"bob:pw").decode()
    config = {
        "credsStore": "store",
        "credHelpers": {
            "special.example": "special",
            "tok.example": "tokens",
            "gone.example": "absent",
        },
        "auths": {"fallback.example": {"auth": b64}, "gone.example": {"auth": b64}},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    caplog.set_level(logging.DEBUG, logger="storage.remote.credentials")
    assert docker_config_credentials("https://reg.example:5000") == Credentials("alice", PASSWORD)
    assert docker_config_credentials("https://registry-1.docker.io") == Credentials("hub", "h")
    assert docker_config_credentials("https://special.example") == Credentials("carol", "c")
    assert docker_config_credentials("https://fallback.example") == Credentials("bob", "pw")
    assert "has no login for fallback.example" in caplog.text
    assert docker_config_credentials("https://gone.example") == Credentials("bob", "pw")
    assert "credential helper absent is not installed" in caplog.text
    assert docker_config_credentials("https://tok.example") == Credentials("", "", IDENTITY)
    assert "identity token for tok.example" in caplog.text
    config["credsStore"] = "../../bin/sh"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert docker_config_credentials("https://fallback.example") == Credentials("bob", "pw")
    assert "is not one; ignored" in caplog.text
    no_secrets(caplog.text, PASSWORD, IDENTITY)


# --------------------------------------------------------------------------- anonymous


@pytest.mark.registry
async def test_anonymous_reads_and_uploads(registry_server: RegistryServer) -> None:
    layer = bytes(range(256)) * 40
    async with RemoteClient(registry_server.url, timeout=5) as client:
        assert (await client.request("GET", "/v2/")).json() == {}
        manifest, digest = await push_image(client, "team/app", "v1", layer)

        resp = await client.request(
            "GET", "/v2/team/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
        )
        assert resp.content == manifest
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Type"] == OCI_MANIFEST

        blob = f"/v2/team/app/blobs/{digest_of(layer)}"
        assert (await client.request("GET", blob)).content == layer
        head = await client.request("HEAD", blob)
        assert int(head.headers["Content-Length"]) == len(layer)
        part = await client.request("GET", blob, headers={"Range": "bytes=100-1123"}, expect=(206,))
        assert part.content == layer[100:1124]
        assert part.headers["Content-Range"] == f"bytes 100-1123/{len(layer)}"
        async with client.stream("GET", blob, headers={"Range": "bytes=5000-"}) as resp:
            assert resp.status_code == 206
            assert b"".join([chunk async for chunk in resp.aiter_raw()]) == layer[5000:]
        async with client.stream("GET", blob) as resp:
            assert resp.status_code == 200
            assert b"".join([chunk async for chunk in resp.aiter_bytes()]) == layer


@pytest.mark.registry
async def test_absent_things_raise_remote_not_found(registry_server: RegistryServer) -> None:
    missing = digest_of(b"missing")
    async with RemoteClient(registry_server.url, timeout=5) as client:
        await push_blob(client, "team/app", b"present")
        with pytest.raises(RemoteNotFound) as err:
            await client.request("GET", f"/v2/team/app/blobs/{missing}")
        assert isinstance(err.value, LookupError) and isinstance(err.value, StorageError)
        assert err.value.status == 404 and err.value.codes == ("BLOB_UNKNOWN",)
        assert registry_server.host in str(err.value) and "404" in str(err.value)

        with pytest.raises(RemoteNotFound) as err:
            await client.request("GET", "/v2/nobody/tags/list")
        assert err.value.codes == ("NAME_UNKNOWN",)
        with pytest.raises(RemoteNotFound):
            async with client.stream("GET", f"/v2/team/app/blobs/{missing}"):
                pass
        resp = await client.request("HEAD", "/v2/team/app/manifests/nope", expect=(200, 404))
        assert resp.status_code == 404

        # Any other status the caller did not expect: RemoteError with the registry's codes.
        location = (
            await client.request("POST", "/v2/team/app/blobs/uploads/", expect=(202,))
        ).headers["Location"]
        with pytest.raises(RemoteError) as err:
            await client.request(
                "PUT", location, params={"digest": missing}, content=b"x", expect=(201,)
            )
        assert err.value.status == 400 and err.value.codes == ("DIGEST_INVALID",)
        assert not isinstance(err.value, LookupError | RemoteUnavailable)


# --------------------------------------------------------------------------- Basic auth


@pytest.fixture
def basic_registry(tmp_path, servers) -> RegistryServer:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {USER: PASSWORD, "bob": "bobs-pw"})
    return servers(auth=htpasswd_auth(htpasswd))


@pytest.mark.registry
async def test_basic_auth(basic_registry: RegistryServer, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    url = basic_registry.url
    async with RemoteClient(url, credentials=Credentials(USER, PASSWORD), timeout=5) as client:
        await client.ping()
        digest = await push_blob(client, "team/app", b"layer")
        assert (await client.request("GET", f"/v2/team/app/blobs/{digest}")).content == b"layer"

    wrong = Credentials(USER, "not-" + PASSWORD)
    async with RemoteClient(url, credentials=wrong, timeout=5) as client:
        with pytest.raises(AccessDenied) as err:
            await client.request("GET", "/v2/team/app/tags/list")
    message = str(err.value)
    assert basic_registry.host in message and "401" in message and USER in message
    assert "refused" in message

    async with RemoteClient(url, timeout=5) as client:
        with pytest.raises(AccessDenied, match="needs credentials"):
            await client.ping()
    no_secrets(message + caplog.text, PASSWORD, wrong.password)


@pytest.mark.registry
async def test_basic_auth_from_docker_config(
    basic_registry: RegistryServer, tmp_path, monkeypatch
) -> None:
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (config_dir / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"auth": auth}}})
    )
    async with RemoteClient.from_docker_config(basic_registry.url, timeout=5) as client:
        assert client.credentials == Credentials(USER, PASSWORD)
        await push_blob(client, "from/config", b"data")

    key = f"http://{basic_registry.host}"  # a scheme in the key, username/password fields
    (config_dir / "config.json").write_text(
        json.dumps({"auths": {key: {"username": "bob", "password": "bobs-pw"}}})
    )
    async with RemoteClient.from_docker_config(basic_registry.url, timeout=5) as client:
        assert client.credentials == Credentials("bob", "bobs-pw")
        await client.request("GET", "/v2/from/config/tags/list", expect=(200, 404))


# --------------------------------------------------------------------------- token auth


@pytest.mark.registry
async def test_token_auth_caches_per_scope(token_servers, servers, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = token_servers()
    server = servers(auth=tokens.registry_auth())
    async with RemoteClient(server.url, timeout=5) as client:
        digest = await push_blob(client, "team/app", b"layer")  # POST, PATCH, PUT
        assert asked(tokens) == [("repository:team/app:pull,push",)]

        async def read() -> None:
            await client.request("GET", f"/v2/team/app/blobs/{digest}")

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(read)
        await client.request("HEAD", f"/v2/team/app/blobs/{digest}")
        await client.request("GET", "/v2/team/app/tags/list", expect=(200, 404))
        await client.request("GET", "/v2/_catalog")
        await client.request("GET", "/v2/_catalog")
        await client.ping()
        mount = await client.request(
            "POST",
            "/v2/other/app/blobs/uploads/",
            params={"mount": digest, "from": "team/app"},
            expect=(201,),
        )
        assert mount.headers["Docker-Content-Digest"] == digest
    assert asked(tokens) == [
        ("repository:team/app:pull,push",),
        ("repository:team/app:pull",),  # one for six concurrent and sequential pulls
        ("registry:catalog:*",),
        (),
        ("repository:other/app:pull,push", "repository:team/app:pull"),
    ]
    assert all(r.account is None for r in tokens.requests)
    no_secrets(caplog.text, *(r.token for r in tokens.requests))


@pytest.mark.registry
async def test_token_refreshed_when_expired_or_refused(token_servers, servers, monkeypatch) -> None:
    monkeypatch.setattr("storage.remote.auth.MIN_TOKEN_LIFETIME", 1.0)  # not a minute's wait
    tokens = token_servers(expires_in=1)
    server = servers(auth=tokens.registry_auth())
    tags = "/v2/team/app/tags/list"
    async with RemoteClient(server.url, timeout=5) as client:
        await client.request("GET", tags, expect=(200, 404))
        await client.request("GET", tags, expect=(200, 404))
        assert len(tokens.requests) == 1
        await trio.sleep(1.0)  # the token lives 1 s minus 10 %
        await client.request("GET", tags, expect=(200, 404))
        assert len(tokens.requests) == 2

        tokens.expires_in = 300
        tokens.invalid_next = 1  # the next token is refused by the registry: 401
        await trio.sleep(1.0)
        await client.request("GET", tags, expect=(200, 404))
        assert len(tokens.requests) == 4  # expired, then refused once, then a good one

        # Every token refused: a request refreshes once, then gives up with AccessDenied.
        tokens.invalid_next = 100
        with pytest.raises(AccessDenied, match="401"):
            await client.request("GET", "/v2/_catalog")  # a new scope: fetched, refreshed
        assert len(tokens.requests) == 6
    async with RemoteClient(server.url, timeout=5) as fresh:
        with pytest.raises(AccessDenied, match="401"):  # 401, token, 401: no second token
            await fresh.request("GET", tags, expect=(200, 404))
    assert len(tokens.requests) == 7


@pytest.mark.registry
async def test_token_server_with_credentials(token_servers, servers, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = token_servers(users={USER: PASSWORD})
    server = servers(auth=tokens.registry_auth())
    creds = Credentials(USER, PASSWORD)
    async with RemoteClient(server.url, credentials=creds, timeout=5) as client:
        await push_blob(client, "team/app", b"layer")
    assert [r.account for r in tokens.requests] == [USER]

    wrong = Credentials(USER, "not-" + PASSWORD)
    async with RemoteClient(server.url, credentials=wrong, timeout=5) as client:
        with pytest.raises(AccessDenied) as err:
            await client.request("GET", "/v2/team/app/tags/list")
    message = str(err.value)
    assert "token server" in message and "401" in message and server.host in message
    async with RemoteClient(server.url, timeout=5) as client:
        with pytest.raises(AccessDenied, match="anonymous"):
            await client.ping()
    no_secrets(message + caplog.text, PASSWORD, wrong.password)


@pytest.mark.registry
async def test_identity_token_by_the_refresh_grant(
    token_servers, servers, basic_registry: RegistryServer, caplog
) -> None:
    """An identity token is traded for access tokens by `POST realm` (grant_type
    refresh_token); one the token server does not know, or a registry that wants Basic,
    is EACCES with a message that says why and never shows the token."""
    caplog.set_level(logging.DEBUG)
    tokens = token_servers(users={USER: PASSWORD}, refresh_tokens={IDENTITY: USER})
    server = servers(auth=tokens.registry_auth())
    creds = Credentials("", "", identity_token=IDENTITY)
    async with RemoteClient(server.url, credentials=creds, timeout=5) as client:
        digest = await push_blob(client, "team/app", b"layer")
        resp = await client.request("GET", f"/v2/team/app/blobs/{digest}")
        assert resp.content == b"layer"
    assert tokens.requests and all(r.grant_type == "refresh_token" for r in tokens.requests)
    assert {r.account for r in tokens.requests} == {USER}
    assert ("repository:team/app:pull,push",) in asked(tokens)

    unknown = Credentials("", "", identity_token="idt-revoked")
    async with RemoteClient(server.url, credentials=unknown, timeout=5) as client:
        with pytest.raises(AccessDenied) as refused:
            await client.request("GET", "/v2/team/app/tags/list")
    message = str(refused.value)
    assert "refused the identity token (400 Bad Request: invalid_grant" in message
    assert "docker login" in message

    tokens.oauth = False  # a token server with the GET endpoint only
    async with RemoteClient(server.url, credentials=creds, timeout=5) as client:
        with pytest.raises(AccessDenied, match="does not take identity tokens"):
            await client.request("GET", "/v2/team/app/tags/list")

    async with RemoteClient(basic_registry.url, credentials=creds, timeout=5) as client:
        with pytest.raises(AccessDenied) as basic:
            await client.ping()
    assert "identity token, which only a token server takes" in str(basic.value)
    no_secrets(message + str(basic.value) + caplog.text, IDENTITY, "idt-revoked")


# --------------------------------------------------------------------------- TLS


@pytest.mark.registry
async def test_tls_verification(tmp_path, servers) -> None:
    tls = write_self_signed_cert(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = servers(tls=tls)
    assert server.url.startswith("https://")

    async with RemoteClient(server.url, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(TLSError) as err:
            await client.ping()
        assert time.monotonic() - started < 1.0  # not retried
    assert isinstance(err.value, RemoteUnavailable)
    assert "TLS certificate verification failed" in str(err.value)
    assert "self-signed" in str(err.value) and server.host in str(err.value)

    async with RemoteClient(server.url, ca_file=str(tls.cert), timeout=5) as client:
        await client.ping()
        await push_blob(client, "secure/app", b"over tls")
    async with RemoteClient(server.url, insecure=True, timeout=5) as client:
        assert await client.request("GET", "/v2/secure/app/tags/list", expect=(200, 404))

    plain = RemoteClient(server.url.replace("https:", "http:"), timeout=2, retries=1)
    async with plain:  # http to an https port: Go's server says so, in a 400
        with pytest.raises(RemoteError, match=r"400 Bad Request.*HTTPS server"):
            await plain.ping()


# --------------------------------------------------------------------------- faults


async def test_transient_errors_are_retried(fault_server: FaultServer, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="storage.remote")
    path = "/v2/team/app/blobs/uploads/u-1?_state=SECRET-STATE"
    fault_server.inject(Fault(500), Fault(502), Fault(close=True))
    async with RemoteClient(fault_server.url, timeout=2) as client:
        started = time.monotonic()
        resp = await client.request("GET", path)
        assert resp.status_code == 200
        assert 0.7 <= time.monotonic() - started < 2.0  # 0.1 + 0.2 + 0.4 s of backoff
    assert [s.status for s in fault_server.seen] == [500, 502, None, 200]
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 3
    assert "GET /v2/team/app/blobs/uploads/u-1: 500 Internal Server Error" in retries[0]
    assert "retry 1 of 4" in retries[0] and "retry 3 of 4" in retries[2]
    assert "502" in retries[1] and "RemoteProtocolError" in retries[2]
    no_secrets(caplog.text, "SECRET-STATE")


async def test_retry_after_is_honoured(fault_server: FaultServer) -> None:
    fault_server.inject(Fault(429, headers=(("Retry-After", "1"),)))
    async with RemoteClient(fault_server.url, timeout=2) as client:
        started = time.monotonic()
        await client.request("GET", "/v2/")
        assert 1.0 <= time.monotonic() - started < 1.8
    assert [s.status for s in fault_server.seen] == [429, 200]


async def test_persistent_failure_is_bounded(fault_server: FaultServer) -> None:
    fault_server.inject(Fault(503), times=20)
    async with RemoteClient(fault_server.url, timeout=2, retries=4) as client:
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable) as err:
            await client.request("GET", "/v2/team/app/manifests/v1")
        assert time.monotonic() - started < 2.5  # 1.5 s of backoff, +10 % jitter
    assert not isinstance(err.value, LookupError)
    assert "503" in str(err.value) and "after 5 tries" in str(err.value)
    assert len(fault_server.seen) == 5


async def test_unsafe_methods_retried_only_when_allowed(fault_server: FaultServer) -> None:
    upload = "/v2/team/app/blobs/uploads/u-1"
    async with RemoteClient(fault_server.url, timeout=2) as client:
        fault_server.inject(Fault(500, method="POST"), Fault(500, method="PATCH"))
        with pytest.raises(RemoteUnavailable):
            await client.request("POST", "/v2/team/app/blobs/uploads/", expect=(202,))
        with pytest.raises(RemoteUnavailable):
            await client.request("PATCH", upload, content=b"x", expect=(200,))
        assert len(fault_server.seen) == 2

        fault_server.inject(Fault(500, method="PATCH"))
        await client.request("PATCH", upload, content=b"x", retry_unsafe=True)
        assert [s.status for s in fault_server.seen[2:]] == [500, 200]

        # A refused connection never reached the server: retried whatever the method.
    async with RemoteClient("http://127.0.0.1:9", timeout=1, retries=2) as client:
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable, match=r"ConnectError.*after 3 tries"):
            await client.request("POST", "/v2/team/app/blobs/uploads/", expect=(202,))
        assert 0.3 <= time.monotonic() - started < 1.0


async def test_timeouts_are_bounded(fault_server: FaultServer) -> None:
    fault_server.inject(Fault(200, delay=30), times=5)
    async with RemoteClient(fault_server.url, timeout=0.3, retries=2) as client:
        assert client.deadline == pytest.approx(0.9)
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable) as err:
            await client.request("GET", "/v2/")
        assert time.monotonic() - started < 0.9 + 0.3
        assert "ReadTimeout" in str(err.value) or "deadline" in str(err.value)

        fault_server.clear()
        fault_server.inject(Fault(200, stall=30, body=b"x" * 1000))
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable, match="reading the body failed: ReadTimeout"):
            async with client.stream("GET", "/v2/team/app/blobs/sha256:00") as resp:
                async for _ in resp.aiter_raw():
                    pass
        assert time.monotonic() - started < 0.3 + 0.3


@pytest.mark.registry
async def test_faults_in_front_of_the_real_registry(registry_server: RegistryServer) -> None:
    """The fault server as a proxy: the registry's `Location`s point back at it, and an
    upload survives a 503 on its PATCH (retried: the caller says it is safe) and on its PUT."""
    with FaultServer(upstream=registry_server.url) as proxy:
        proxy.inject(Fault(503, method="PATCH"), Fault(503, method="PUT"))
        async with RemoteClient(proxy.url, timeout=5) as client:
            resp = await client.request("POST", "/v2/team/app/blobs/uploads/", expect=(202,))
            assert resp.headers["Location"].startswith(proxy.url)
            data = b"through the proxy"
            resp = await client.request(
                "PATCH", resp.headers["Location"], content=data, expect=(202,), retry_unsafe=True
            )
            digest = digest_of(data)
            await client.request(
                "PUT", resp.headers["Location"], params={"digest": digest}, expect=(201,)
            )
            assert (await client.request("GET", f"/v2/team/app/blobs/{digest}")).content == data
        assert [(s.method, s.status) for s in proxy.seen] == [
            ("POST", 202),
            ("PATCH", 503),
            ("PATCH", 202),
            ("PUT", 503),
            ("PUT", 201),
            ("GET", 200),
        ]


@pytest.mark.registry
async def test_stopped_registry_then_restarted(registry_server: RegistryServer) -> None:
    async with RemoteClient(registry_server.url, timeout=1, retries=2) as client:
        await client.ping()
        registry_server.stop()
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable) as err:
            await client.ping()
        assert time.monotonic() - started < 1.0  # 0.1 + 0.2 s of backoff
        assert "ConnectError" in str(err.value) and registry_server.host in str(err.value)
        assert not isinstance(err.value, LookupError)
        registry_server.start()
        await client.ping()
