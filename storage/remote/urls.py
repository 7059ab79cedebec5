"""Which registry a URL names: its origin, Docker Hub's other names, how logs show it.

Shared by the request core (client.py), authentication (auth.py) and the Docker config's
logins (credentials.py), because the rules that keep credentials at home and clear text off
the network are stated per origin: credentials go to the registry's origin only, plain http
only to loopback unless the user says so.
"""

from __future__ import annotations

import ipaddress

import httpx

# The names people give Docker Hub, which serve no registry API: `docker pull` goes to
# registry-1.docker.io for them, and so does regfs (and its logins are filed under any).
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io"})
DOCKER_HUB_API = "registry-1.docker.io"

Origin = tuple[str, str, int | None]  # scheme, host in lower case, port (None: the default)


def origin(url: httpx.URL) -> Origin:
    return (url.scheme, url.host.lower(), url.port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def leaves_https(source_scheme: str, target_scheme: str) -> bool:
    """Whether a URL a registry points to (a redirect, a `Link` to the next page, an
    upload's `Location`) must be refused: it is no http(s) URL, or it leads from https to
    plain http, where names, layer bytes and signed URLs would travel in clear."""
    return target_scheme not in ("http", "https") or (
        source_scheme == "https" and target_scheme != "https"
    )


def loggable(registry: httpx.URL, url: httpx.URL) -> str:
    """`url` for logs and messages: no query (upload `_state`, token scopes, signatures),
    and the host only when it is not the `registry`'s."""
    if origin(url) == origin(registry):
        return url.path
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}"
