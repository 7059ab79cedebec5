"""Who the user is to a registry: a login, and where the docker CLI keeps it.

Apart from auth.py (how a login is turned into what a registry accepts) because this reads
the user's files and runs their credential helpers, as the docker CLI does; nothing here
talks to a registry. Secrets never reach a repr, a log line or a message.

- `Credentials`: a username and a password, or an identity token (an OAuth2 refresh token).
- `docker_config_credentials`: the login `$DOCKER_CONFIG/config.json` (or `~/.docker/`)
  holds for a registry: its credential helper's, else its `auths` entry.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .urls import DOCKER_HUB_ALIASES, DOCKER_HUB_API

log = logging.getLogger(__name__)


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
_DOCKER_HUB = DOCKER_HUB_ALIASES | {DOCKER_HUB_API}
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
