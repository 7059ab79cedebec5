"""Registry authentication rules, kept apart from the HTTP client so each one is testable alone.

- `Credentials`: a username and a password, or an identity token (an OAuth2 refresh token),
  that no repr, log line or exception shows.
- `parse_challenges`: the `WWW-Authenticate` header (`Basic realm=...`, `Bearer realm=...,
  service=...,scope=...`), as a registry sends it with a 401.
- `scope_for`/`scopes_for`: the token scopes a request needs, following distribution 2.8
  (`registry/handlers/app.go`): GET/HEAD pull, POST/PUT/PATCH pull+push, DELETE delete,
  `_catalog` `registry:catalog:*`, and pull on the `from` repository of a mount.
- `docker_config_credentials`: the login `$DOCKER_CONFIG/config.json` (or `~/.docker/`)
  holds for a registry: its credential helper's, else its `auths` entry.
- `TokenCache`: bearer tokens per scope until they expire, minus a margin.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .untrusted import ByteCache

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server does not say (the distribution token spec)."""
TOKEN_CACHE_BYTES = 16 << 20


@dataclass(frozen=True)
class Credentials:
    """A registry login. Secrets stay out of `repr` (and so out of logs and tracebacks).

    `identity_token` is what `docker login` keeps instead of a password for registries whose
    login is a web or cloud sign-in (Azure's `az acr login`, Docker's SSO): an OAuth2 refresh
    token, which only a token server takes (the refresh-token grant), never Basic auth.
    """

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)

    def basic(self) -> str:
        """The `Authorization` header value for HTTP Basic."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    @property
    def who(self) -> str:
        """Whose login this is, for messages."""
        if self.identity_token is not None:
            return "the identity token" + (f" of {self.username!r}" if self.username else "")
        return f"user {self.username!r}"


IDENTITY_TOKEN_USER = "<token>"
"""The username credential helpers answer with when the secret is an identity token."""


# --------------------------------------------------------------------------- challenges

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM = re.compile(rf'[\s,]*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})')
_QUOTED_PAIR = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Challenge:
    """One auth challenge: `scheme` in lower case, parameter names in lower case."""

    scheme: str
    params: Mapping[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes asked for; several are separated by spaces (distribution's challenge)."""
        return tuple(self.params.get("scope", "").split())


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Every challenge in the `WWW-Authenticate` header values, in order.

    RFC 7235 syntax: `scheme param=value, param="quoted, value"`; several challenges may
    share one header value (`Basic realm="a", Bearer realm="b"`): a token that is not
    followed by `=` starts a new one. Anything unparsable ends that value's parsing.
    """
    out: list[Challenge] = []
    for value in values:
        pos = 0
        while (m := _SCHEME.match(value, pos)) is not None:
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while (p := _PARAM.match(value, pos)) is not None:
                raw = p.group(2)
                if raw.startswith('"'):
                    raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
                params[p.group(1).lower()] = raw
                pos = p.end()
            out.append(Challenge(scheme, params))
    return out


# --------------------------------------------------------------------------- scopes

# Greedy name, then one of the API's tails: a repository may itself contain `blobs/`.
_REPO_PATH = re.compile(
    r"/v2/(?P<name>.+)/(?:tags/list|manifests/[^/]+|blobs/uploads/[^/]*|blobs/[^/]+"
    r"|referrers/[^/]+)"
)


def scope_for(method: str, path: str) -> str | None:
    """The scope a request on `path` needs, as distribution 2.8 derives it; None for others
    (`/v2/` needs a token without scope)."""
    if path == "/v2/_catalog":
        return "registry:catalog:*"
    m = _REPO_PATH.fullmatch(path)
    if m is None:
        return None
    method = method.upper()
    if method in ("GET", "HEAD"):
        actions = "pull"
    elif method == "DELETE":
        actions = "delete"
    else:
        actions = "pull,push"
    return f"repository:{m['name']}:{actions}"


def scopes_for(method: str, url: httpx.URL) -> list[str]:
    """`scope_for`, plus pull on the source of a cross-repository mount (`?from=<repo>`),
    which distribution requires as well."""
    scope = scope_for(method, url.path)
    scopes = [scope] if scope else []
    source = url.params.get("from")
    if source and scope and scope.startswith("repository:"):
        scopes.append(f"repository:{source}:pull")
    return scopes


# --------------------------------------------------------------------------- docker config


def docker_config_dir() -> Path:
    """`$DOCKER_CONFIG`, else `~/.docker` (what the docker CLI reads)."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


HostKey = tuple[str, int | None]  # (host, port) of a registry, as Docker config keys name it


def _host_key(text: str) -> HostKey | None:
    """(host, port) of an `auths` key such as `host:5000`, `https://host/v1/`, `host`."""
    if "://" not in text:
        text = "https://" + text
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        return None
    return (url.host.lower(), url.port) if url.host else None


# The docker CLI files Docker Hub logins under its v1 index address.
_DOCKER_HUB = {"registry-1.docker.io", "docker.io", "index.docker.io"}
_HUB_SERVER = "https://index.docker.io/v1/"
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HELPER_TIMEOUT = 10.0  # seconds a credential helper may take (a keychain may ask the user)


def docker_config_credentials(base_url: str, config_dir: Path | None = None) -> Credentials | None:
    """The login for `base_url` from the Docker config, or None if there is none.

    As the docker CLI does, a credential helper comes first: the one `credHelpers` names for
    this registry, else `credsStore` (`docker-credential-<name> get`, the server on stdin,
    JSON out). Then `auths`: a key matches when its host and port equal the URL's (scheme and
    path ignored; a key without a port matches the URL's default port); `auth` is base64 of
    `user:password`, `username`/`password` fields are used otherwise. A config file that is
    not valid JSON raises ValueError (naming the file, not its content).
    """
    path = (config_dir or docker_config_dir()) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read Docker config {path}: {type(exc).__name__}") from None
    if not isinstance(config, dict):
        return None
    url = httpx.URL(base_url)
    want = (url.host.lower(), url.port)
    hub = want[0] in _DOCKER_HUB
    helper = _helper_for(config, want, hub)
    if helper is not None:
        server = _HUB_SERVER if hub else url.host + (f":{url.port}" if url.port else "")
        creds = _helper_credentials(helper, server)
        if creds is not None:
            return creds
    auths = config.get("auths")
    for key, entry in auths.items() if isinstance(auths, dict) else []:
        have = _host_key(key)
        if have is None or not isinstance(entry, dict):
            continue
        if have != want and not (hub and have[0] in _DOCKER_HUB):
            continue
        creds = _entry_credentials(entry)
        if creds is not None:
            log.debug("credentials for %s from %s (%s)", url.host, path, creds.who)
            return creds
    return None


def _helper_for(
    config: Mapping[str, object], want: tuple[str, int | None], hub: bool
) -> str | None:
    """The credential helper for a registry: its `credHelpers` entry, else `credsStore`."""
    helpers = config.get("credHelpers")
    for key, name in helpers.items() if isinstance(helpers, dict) else []:
        have = _host_key(key)
        if have is not None and (have == want or (hub and have[0] in _DOCKER_HUB)):
            return _helper_name(name)
    return _helper_name(config.get("credsStore"))


def _helper_name(name: object) -> str | None:
    if isinstance(name, str) and _HELPER_NAME.fullmatch(name):
        return name
    if name:
        log.warning("Docker config: credential helper name %r is not one; ignored", name)
    return None


def _helper_credentials(name: str, server: str) -> Credentials | None:
    """`docker-credential-<name> get` for server; None (and a log line) if it has none."""
    program = f"docker-credential-{name}"
    try:
        result = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT
        )
    except FileNotFoundError:
        log.warning("Docker config: credential helper %s is not installed (no %s)", name, program)
        return None
    except subprocess.TimeoutExpired:
        log.warning("credential helper %s gave no answer within %g s", name, HELPER_TIMEOUT)
        return None
    if result.returncode != 0:  # helpers say "credentials not found in native keychain"
        said = (result.stderr or result.stdout).decode(errors="replace").strip()[:200]
        log.info("credential helper %s has no login for %s (%s)", name, server, said)
        return None
    try:
        answer = json.loads(result.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        log.warning("credential helper %s answered something other than a login; ignored", name)
        return None
    if not (isinstance(user, str) and user and isinstance(secret, str) and secret):
        return None
    if user == IDENTITY_TOKEN_USER:
        log.debug("identity token for %s from credential helper %s", server, name)
        return Credentials("", "", identity_token=secret)
    log.debug("credentials for %s from credential helper %s (user %s)", server, name, user)
    return Credentials(user, secret)


def _entry_credentials(entry: Mapping[str, object]) -> Credentials | None:
    """The login of an `auths` entry: `identitytoken` first (its `auth`, if any, only names
    the user), then `auth`, then `username`/`password`."""
    identity = entry.get("identitytoken")
    if isinstance(identity, str) and identity:
        named = _entry_credentials({k: v for k, v in entry.items() if k != "identitytoken"})
        return Credentials(named.username if named else "", "", identity_token=identity)
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, password = "", "", ""
        if sep and user:
            return Credentials(user, password)
        log.warning("Docker config: an `auth` entry is not base64 of user:password; ignored")
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(secret, str):
        return Credentials(username, secret)
    return None


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    """A bearer token and when to stop using it (`time.monotonic()` seconds)."""

    value: str = field(repr=False)
    expires: float

    @property
    def valid(self) -> bool:
        return time.monotonic() < self.expires

    @classmethod
    def from_response(cls, body: object, requested_at: float) -> Token:
        """Parse a token server's JSON (`token` or `access_token`, `expires_in`).

        The token is dropped a tenth of its lifetime (at most 30 s) early, so a request
        never leaves with one that expires on the way. ValueError if there is no token.
        """
        if not isinstance(body, dict):
            raise ValueError("token server answer is not a JSON object")
        value = body.get("token") or body.get("access_token")
        if not isinstance(value, str) or not value:
            raise ValueError("token server answer has no token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return cls(value, requested_at + lifetime - min(30.0, lifetime / 10))


def normalize_scope(scope: str) -> str:
    """`type:name:actions` with the actions sorted: distribution's challenges list them in
    Go map order, `pull,push` or `push,pull` from one request to the next."""
    head, sep, actions = scope.rpartition(":")
    if not sep or not head:
        return scope
    return f"{head}:{','.join(sorted(set(actions.split(','))))}"


def covers(have: Iterable[str], need: Iterable[str]) -> bool:
    """Whether scopes `have` grant every action of `need` (same type and name)."""
    granted: dict[str, set[str]] = {}
    for scope in have:
        head, _, actions = scope.rpartition(":")
        granted.setdefault(head, set()).update(actions.split(","))
    for scope in need:
        head, _, actions = scope.rpartition(":")
        if not set(actions.split(",")) <= granted.get(head, set()):
            return False
    return True


def scope_key(scopes: Iterable[str]) -> str:
    """One cache key for a set of scopes, whatever the order of scopes and actions."""
    return " ".join(sorted({normalize_scope(s) for s in scopes}))


def _token_size(key: str, token: Token) -> int:
    return len(key) + len(token.value) + 200


@dataclass
class TokenCache:
    """Bearer tokens by scope key. Expired ones are never returned. Bounded in bytes: a
    token server decides how large its tokens are, and there is one per repository used."""

    max_bytes: int = TOKEN_CACHE_BYTES
    _tokens: ByteCache[str, Token] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._tokens = ByteCache(self.max_bytes, _token_size)

    def get(self, key: str) -> Token | None:
        token = self._tokens.get(key)
        if token is not None and not token.valid:
            self._tokens.pop(key)
            return None
        return token

    def put(self, key: str, token: Token) -> None:
        self._tokens.put(key, token)

    def discard(self, key: str, token: Token | None) -> None:
        """Forget `key`'s token if it is still `token` (another task may have refreshed it)."""
        if token is not None and self._tokens.get(key) is token:
            self._tokens.pop(key)

    def __len__(self) -> int:
        return len(self._tokens)
