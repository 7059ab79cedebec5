"""Registry authentication rules, kept apart from the HTTP client so each one is testable alone.

- `parse_challenges`: the `WWW-Authenticate` header (`Basic realm=...`, `Bearer realm=...,
  service=...,scope=...`), as a registry sends it with a 401.
- `scope_for`/`scopes_for`: the token scopes a request needs, following distribution 2.8
  (`registry/handlers/app.go`): GET/HEAD pull, POST/PUT/PATCH pull+push, DELETE delete,
  `_catalog` `registry:catalog:*`, and pull on the `from` repository of a mount.
- `TokenCache`: bearer tokens per scope until they expire, minus a margin.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx

from .untrusted import ByteCache

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server does not say (the distribution token spec)."""
TOKEN_CACHE_BYTES = 16 << 20


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
