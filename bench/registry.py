"""Start and stop Debian's `docker-registry` (distribution 2.8) on a storage root: the peer.

Configured as the official `registry:2` image ships it (filesystem driver, in-memory blob
descriptor cache) with logging cut to warnings and no access log, so the peer spends its time
serving rather than logging. `catalog.maxentries` is raised so one `_catalog?n=` request can
list every repository (2.8 refuses `n` above it with PAGINATION_NUMBER_INVALID).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

BINARY = "docker-registry"
SECRET = "regfs-bench"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
MAX_CATALOG = 100_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class RegistryProcess:
    """One `docker-registry serve` on 127.0.0.1; config and log in `workdir`, not in `root`."""

    root: Path
    workdir: Path
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _config(self) -> str:
        q = json.dumps  # a JSON string is a valid YAML scalar: safe for any path
        return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {q(str(self.root))}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
catalog:
  maxentries: {MAX_CATALOG}
http:
  addr: 127.0.0.1:{self.port}
  secret: {q(SECRET)}
"""

    def start(self) -> Self:
        """Start and wait until `GET /v2/` answers 200 (another port if this one was taken)."""
        if shutil.which(BINARY) is None:
            raise RuntimeError(f"{BINARY} not found: `make deb` installs it")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for _ in range(3):
                self.port = _free_port()
                if self._try_start():
                    return self
            raise RuntimeError(f"registry could not bind a port:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _try_start(self) -> bool:
        config = self.workdir / "config.yml"
        config.write_text(self._config())
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [BINARY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                if "address already in use" in self._log_tail():
                    return False
                raise RuntimeError(f"registry exited at start:\n{self._log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/", timeout=1.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"registry not ready after {STARTUP_TIMEOUT} s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "<no log>"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
