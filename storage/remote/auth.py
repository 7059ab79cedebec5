"""Registry authentication: what a registry asks for, and the tokens that answer it.

Apart from the request core (client.py), which calls `Authenticator` for the header of each
request to the registry's origin and hands it each 401 the registry sends; apart from where
a login comes from (credentials.py). The rules, each testable alone:

- `parse_challenges`: the `WWW-Authenticate` header (`Basic realm=...`, `Bearer realm=...,
  service=...,scope=...`), as a registry sends it with a 401.
- `scope_for`/`scopes_for`: the token scopes a request needs, following distribution 2.8
  (`registry/handlers/app.go`): GET/HEAD pull, POST/PUT/PATCH pull+push, DELETE delete,
  `_catalog` `registry:catalog:*`, and pull on the `from` repository of a mount.
- `TokenCache`: bearer tokens per scope until they expire, minus a margin.
- `Authenticator`: Basic once asked for, or bearer tokens from the challenge's realm (a GET
  with the login, or the OAuth2 refresh-token grant for an identity token), fetched once per
  scope however many tasks ask; credentials only to the registry's origin and its realm.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx
import trio

from .. import jsontext
from ..errors import AccessDenied, RemoteError
from .credentials import Credentials
from .untrusted import ByteCache, error_detail, shown
from .urls import is_loopback, loggable, origin

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token server does not say (the distribution token spec)."""
MIN_TOKEN_LIFETIME = 60.0
"""Seconds a token is used at least, whatever the token server says (Docker's floor): one
that said 0.001 would be asked for again at every request. A token the registry refuses
sooner is fetched again on that 401."""
TOKEN_CACHE_BYTES = 16 << 20
CLIENT_ID = "regfs"  # what token servers are told in the OAuth2 grant (`client_id`)


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

        The token is kept at least MIN_TOKEN_LIFETIME, and dropped a tenth of its lifetime
        (at most 30 s) early, so a request never leaves with one that expires on the way.
        ValueError if there is no token.
        """
        if not isinstance(body, dict):
            raise ValueError("token server answer is not a JSON object")
        value = body.get("token") or body.get("access_token")
        if not isinstance(value, str) or not value:
            raise ValueError("token server answer has no token")
        if not (value.isascii() and value.isprintable()) or " " in value:
            # It goes into a header: RFC 6750's token68 is visible ASCII, no space.
            raise ValueError("token server answer's token is not a header value")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or not 0 < lifetime < math.inf:
            lifetime = DEFAULT_TOKEN_LIFETIME  # NaN too: no comparison holds for it
        lifetime = max(lifetime, MIN_TOKEN_LIFETIME)
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


# --------------------------------------------------------------------------- the flow


TokenSend = Callable[
    [str, httpx.URL, dict[str, str], bytes | None, tuple[int, ...]], Awaitable[httpx.Response]
]
"""(method, url, headers, content, expect): the client's request core for a token request,
with the caps, retries, redirects and deadline of any request but none of the registry's
credentials (its own `Authorization` goes to the origin it is addressed to only); a status
in `expect` is returned, read."""


class Authenticator:
    """What one client learnt about its registry's authentication, and how it answers it.

    `registry` is the registry's base URL (its origin is the only one that gets the user's
    credentials); `insecure` allows a plain-http token realm on the registry's own host;
    `send` is the client's request core, for token requests.
    """

    def __init__(
        self,
        registry: httpx.URL,
        credentials: Credentials | None,
        insecure: bool,
        send: TokenSend,
    ) -> None:
        self.registry = registry
        self.credentials = credentials
        self.insecure = insecure
        self._send = send
        self.scheme: str | None = None  # "basic", "bearer", or None while none was asked for
        self.realm: httpx.URL | None = None
        self.service: str | None = None
        self.tokens = TokenCache()
        self._locks: dict[str, trio.Lock] = {}

    @property
    def name(self) -> str:
        """`host:port` of the registry, as messages name it."""
        return self.registry.netloc.decode("ascii")

    async def authorization(
        self, method: str, target: httpx.URL
    ) -> tuple[str | None, Token | None, str | None]:
        """(scheme, token, header value) to send to the registry, from what it asked before.

        Basic is sent up front once the registry asked for it; with bearer auth a token for
        the request's scope is taken from the cache or fetched first, which saves the 401
        round trip for every new scope.
        """
        if self.scheme == "basic" and self.credentials is not None:
            return "basic", None, self.credentials.basic()
        if self.scheme == "bearer":
            scopes = scopes_for(method, target)
            key = scope_key(scopes)
            token = self.tokens.get(key)
            if token is None:
                token = await self._refresh(key, scopes, stale=None)
            return "bearer", token, "Bearer " + token.value
        return None, None, None

    def check_challenger(
        self, resp: httpx.Response, method: str, where: str, strayed: bool
    ) -> None:
        """AccessDenied for a 401 from anywhere but the registry's origin (a redirect target),
        or from it at the end of a chain of redirects that left it (`strayed`: the path was
        named by a third party): acting on its challenge would send the user's credentials
        to its realm, or to a path the user never asked for, and take its token for the
        registry's."""
        answered = resp.request.url
        if origin(answered) == origin(self.registry) and not strayed:
            return
        target = loggable(self.registry, answered)
        log.warning(
            "registry %s: %s %s: %s answered 401; redirect targets get no credentials",
            self.name,
            method,
            where,
            target,
        )
        raise AccessDenied(
            f"registry {self.name}: {method} {where}: redirected to {target}, "
            "which asks for credentials (401); regfs sends credentials to the registry only"
        )

    def denied(
        self, resp: httpx.Response, method: str, where: str, sent_scheme: str | None
    ) -> AccessDenied:
        """The error for a 401 or 403 that authenticating cannot help: whose login was
        refused, or that none is configured."""
        status = f"{resp.status_code} {resp.reason_phrase}"
        who = self.credentials.who if self.credentials else "anonymous access"
        if resp.status_code == 401 and sent_scheme == "basic":
            why = f"the credentials of {who} were refused"
        elif resp.status_code == 401 and self.credentials is None:
            why = "it needs credentials and none are configured"
        else:
            why = f"access denied to {who}"
        detail = error_detail(resp)
        return AccessDenied(
            f"registry {self.name}: {method} {where}: {status}: {why}"
            + (f" ({detail})" if detail else "")
        )

    async def on_challenge(
        self,
        resp: httpx.Response,
        method: str,
        target: httpx.URL,
        sent_scheme: str | None,
        sent_token: Token | None,
    ) -> None:
        """Learn from a 401 how to authenticate, so the caller can send the request again.

        Raises AccessDenied when that cannot help: no usable challenge, Basic without
        credentials, or Basic credentials that were just refused.
        """
        challenges = parse_challenges(resp.headers.get_list("WWW-Authenticate"))
        by_scheme: dict[str, Challenge] = {}
        for c in challenges:
            by_scheme.setdefault(c.scheme, c)
        where = loggable(self.registry, target)
        if (bearer := by_scheme.get("bearer")) is not None and bearer.realm:
            self._use_bearer(bearer)
            derived = scopes_for(method, target)
            # The challenge names what this request needs; the derived scopes are the key
            # the next request of its kind looks up.
            scopes = list(bearer.scopes) or derived
            await self._refresh(
                scope_key(derived),
                scopes,
                stale=sent_token if sent_scheme else None,
                force=not covers(derived, scopes),
            )
            return
        if "basic" in by_scheme:
            if self.credentials is None or sent_scheme == "basic":
                raise self.denied(resp, method, where, sent_scheme)
            if self.credentials.identity_token is not None:
                raise AccessDenied(
                    f"registry {self.name}: {method} {where}: it asks for a password (Basic "
                    "auth), and the login for it is an identity token, which only a token "
                    "server takes; log in with a password (--username, --password-stdin)"
                )
            self.scheme = "basic"
            return
        offered = ", ".join(sorted(by_scheme)) or "none"
        raise AccessDenied(
            f"registry {self.name}: {method} {where}: 401 Unauthorized, and no supported "
            f"auth challenge (offered: {offered})"
        )

    def _use_bearer(self, challenge: Challenge) -> None:
        assert challenge.realm is not None
        try:
            realm = self.registry.join(challenge.realm)
        except httpx.InvalidURL:
            realm = httpx.URL("invalid:")
        if realm.scheme not in ("http", "https"):
            raise AccessDenied(
                f"registry {self.name}: token realm {shown(challenge.realm)} is not http(s)"
            )
        own_host = realm.host == self.registry.host
        if (
            realm.scheme == "http"
            and self.credentials is not None
            and not (self.insecure and own_host)
            and not is_loopback(realm.host)
        ):
            raise AccessDenied(
                f"registry {self.name}: token server {realm.host} is plain http; "
                "credentials go there only with --insecure, and only on the registry's host"
            )
        self.scheme = "bearer"
        self.realm = realm
        self.service = challenge.service

    async def _refresh(
        self, key: str, scopes: list[str], stale: Token | None, force: bool = False
    ) -> Token:
        """A fresh token for `key`, fetched once even when several tasks ask together.

        `stale` is the token a request was refused with: it is dropped; if another task has
        already replaced it, that replacement is used instead of fetching again, unless
        `force` (the registry asked for more than `key` says).
        """
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                self.tokens.discard(key, stale)
                current = self.tokens.get(key)
                if current is not None and not force:
                    return current
                token = await self._fetch_token(scopes)
                self.tokens.put(key, token)
                return token
        finally:
            # Kept only while a fetch holds it or waits (a release hands it to the next
            # waiter): one per scope for good grew with every repository a walk touched.
            if not lock.locked() and self._locks.get(key) is lock:
                del self._locks[key]

    async def _fetch_token(self, scopes: list[str]) -> Token:
        """A token for `scopes`: `GET realm?service=&scope=` with Basic credentials if there
        are any, or, with an identity token, the OAuth2 refresh-token grant (`POST realm`,
        distribution's `spec/auth/oauth.md`), which is the only way to use one. (No
        `access_type=offline`: the identity token is kept, never replaced.)"""
        assert self.realm is not None
        creds = self.credentials
        headers: dict[str, str] = {}
        content = None
        realm = self.realm
        if creds is not None and creds.identity_token is not None:
            method = "POST"
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": CLIENT_ID,
                "service": self.service or "",
                "scope": " ".join(scopes),
            }
            content = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            method = "GET"
            params: list[tuple[str, str]] = []
            if self.service:
                params.append(("service", self.service))
            params.extend(("scope", s) for s in scopes)
            if creds is not None:
                params.append(("account", creds.username))
                headers["Authorization"] = creds.basic()
            realm = realm.copy_merge_params(tuple(params))  # a tuple: covariant for httpx
        requested_at = time.monotonic()
        # A token server's 404 is its misconfiguration, never a missing image (ENOENT).
        resp = await self._send(method, realm, headers, content, (200, 400, 401, 403, 404))
        what = " ".join(scopes) or "(no scope)"
        self._check_token_answer(resp, method, realm, what)
        try:
            token = Token.from_response(jsontext.loads(resp.content), requested_at)
        except ValueError as exc:
            raise RemoteError(
                f"registry {self.name}: token server {realm.host}: {exc}", status=200
            ) from None
        log.debug("token for %s from %s", what, realm.host)
        return token

    def _check_token_answer(
        self, resp: httpx.Response, method: str, realm: httpx.URL, what: str
    ) -> None:
        """AccessDenied or RemoteError, naming whose login was refused, for anything but 200."""
        who = self.credentials.who if self.credentials else "anonymous"
        status = f"{resp.status_code} {resp.reason_phrase}"
        detail = error_detail(resp)
        if detail:
            status += f": {detail}"
        if method == "POST" and resp.status_code == 404:
            raise AccessDenied(
                f"registry {self.name}: token server {realm.host} does not take identity "
                f"tokens (POST {realm.path}: {status}); log in with a password instead"
            )
        if resp.status_code in (400, 401, 403):
            again = "; log in again (docker login)" if method == "POST" else ""
            raise AccessDenied(
                f"registry {self.name}: token server {realm.host} refused {who} ({status}) "
                f"for {what}{again}"
            )
        if resp.status_code == 404:
            server = loggable(self.registry, realm)
            raise RemoteError(
                f"registry {self.name}: token server {server}: 404 (bad realm?)",
                status=404,
            )
