"""Docker credential helpers, as the daemon finds them on PATH."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest


def credential_helper(
    monkeypatch: pytest.MonkeyPatch, bin_dir: Path, name: str, logins: dict[str, tuple[str, str]]
) -> None:
    """A `docker-credential-<name>` in bin_dir, put on PATH, answering `get` from `logins`
    (server → login), as docker's helpers do: JSON out, exit 1 with a message when it has none."""
    bin_dir.mkdir(exist_ok=True)
    if str(bin_dir) not in os.environ["PATH"].split(os.pathsep):
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    table = {k: {"ServerURL": k, "Username": u, "Secret": p} for k, (u, p) in logins.items()}
    script = bin_dir / f"docker-credential-{name}"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"table = {json.dumps(table)!r}\n"
        "assert sys.argv[1:] == ['get'], sys.argv\n"
        "server = sys.stdin.read().strip()\n"
        "login = json.loads(table).get(server)\n"
        "if login is None:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "print(json.dumps(login))\n"
    )
    script.chmod(0o755)


def docker_login(config_dir: Path, host: str, user: str, password: str) -> Path:
    """The config.json `docker login HOST` would leave in config_dir (a DOCKER_CONFIG)."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config_dir.mkdir(exist_ok=True)
    path = config_dir / "config.json"
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    path.chmod(0o600)
    return path
