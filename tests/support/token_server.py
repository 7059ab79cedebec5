"""A token server for the real registry's `auth: token`, on loopback, for tests.

What registry 2.8 (`registry/auth/token`) needs to accept a token, found by running it:

- config `auth.token`: `realm` (this server's URL, sent to clients in the challenge),
  `service`, `issuer`, `rootcertbundle` (PEM certificates that anchor the signing keys);
- a JWT signed with RS256 whose header carries `x5c`: the signing certificate (standard
  base64 DER); a self-signed certificate that is itself in `rootcertbundle` verifies
  (the alternative, `kid` = the libtrust key id of a bundled key, is not needed);
- claims `iss` = issuer, `aud` = service, `exp`/`nbf`/`iat` (the registry allows 60 s of
  clock leeway, so an expired token keeps working a minute: clients must not rely on the
  registry to notice), `sub`, `jti`, and `access`: `[{"type", "name", "actions"}]` covering
  what the request needs (`pull`; `pull`+`push`; `delete` for DELETE;
  `registry:catalog:*` for `/v2/_catalog`).

The server answers `GET /token?service=&scope=...&account=` with
`{"token", "access_token", "expires_in", "issued_at"}`, grants every scope asked for, and
records each request. With `users`, it requires matching Basic credentials (401 otherwise).
`POST /token` takes the OAuth2 refresh-token grant (distribution's `spec/auth/oauth.md`)
with a refresh token (`docker login`'s identity token) from `refresh_tokens` (token →
account); 400 `invalid_grant` otherwise. With `oauth=False` POST is 404, as on token servers
that only have the GET endpoint.
`invalid_next = n` makes the next n tokens unacceptable to the registry (wrong audience):
a client must then get a new one.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.loopback import LoopbackHandler, LoopbackHTTP
from support.registry import write_self_signed_cert
from support.servers import StartStop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenRequest:
    """One request the server saw: the scopes asked for and who asked (None: anonymous)."""

    scopes: tuple[str, ...]
    account: str | None
    granted: bool
    token: str = field(default="", repr=False)
    grant_type: str | None = None  # of a POST; None for a GET


@dataclass(eq=False)
class TokenServer(StartStop):
    """`with TokenServer(workdir) as ts:` then `RegistryServer(..., auth=ts.registry_auth())`."""

    workdir: Path
    service: str = "regfs-test-registry"
    issuer: str = "regfs-test-issuer"
    users: Mapping[str, str] | None = None
    expires_in: int = 300
    invalid_next: int = 0
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    oauth: bool = True
    requests: list[TokenRequest] = field(default_factory=list, init=False)
    _http: LoopbackHTTP | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def cert_path(self) -> Path:
        return Path(self.workdir) / "token-cert.pem"

    @property
    def realm(self) -> str:
        assert self._http is not None, "token server not started"
        return f"http://127.0.0.1:{self._http.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        """The registry config's `auth:` section that trusts this server."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def start(self) -> Self:
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        files = write_self_signed_cert(self.cert_path, Path(self.workdir) / "token-key.pem")
        self._key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self._http = LoopbackHTTP(_Handler, self, "token-server")
        log.info("token server on %s", self.realm)
        return self

    def stop(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.stop()

    @property
    def granted(self) -> list[TokenRequest]:
        with self._lock:
            return [r for r in self.requests if r.granted]

    def issue(self, scopes: list[str], account: str | None) -> dict[str, Any]:
        """The JSON answer for a granted request: every action of every scope."""
        with self._lock:
            invalid, self.invalid_next = self.invalid_next > 0, max(0, self.invalid_next - 1)
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name and actions:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": "someone-else" if invalid else self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": self._x5c})
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }


class _Handler(LoopbackHandler):
    def do_GET(self) -> None:
        ts: TokenServer = self.server.owner  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        if url.path != "/token":
            self._answer(404, {"error": "not found"})
            return
        query = parse_qs(url.query)
        scopes = [s for value in query.get("scope", []) for s in value.split()]
        account = self._basic_user(ts)
        granted = account is not False
        answer = ts.issue(scopes, account or None) if granted else {"details": "bad credentials"}
        with ts._lock:
            ts.requests.append(
                TokenRequest(tuple(scopes), account or None, granted, answer.get("token", ""))
            )
        self._answer(200 if granted else 401, answer)

    def do_POST(self) -> None:
        ts: TokenServer = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length", 0))
        form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        if urlsplit(self.path).path != "/token" or not ts.oauth:
            self._answer(404, {"details": "not found"})
            return
        scopes = form.get("scope", "").split()
        grant = form.get("grant_type")
        refresh = form.get("refresh_token", "")
        usable = (
            grant == "refresh_token" and form.get("client_id") and form.get("service") == ts.service
        )
        account = ts.refresh_tokens.get(refresh) if usable else None
        if account is None:
            answer = {"error": "invalid_grant", "error_description": "unknown refresh token"}
        else:
            answer = ts.issue(scopes, account)
            del answer["token"]  # an OAuth2 answer names it access_token only
        with ts._lock:
            ts.requests.append(
                TokenRequest(
                    tuple(scopes),
                    account,
                    account is not None,
                    answer.get("access_token", ""),
                    grant,
                )
            )
        self._answer(200 if account is not None else 400, answer)

    def _basic_user(self, ts: TokenServer) -> str | bool | None:
        """The user of valid Basic credentials, None for anonymous, False if refused."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False if ts.users else None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        if ts.users is None:
            return user
        return user if ts.users.get(user) == password else False

    def _answer(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("token server: " + format, *args)
