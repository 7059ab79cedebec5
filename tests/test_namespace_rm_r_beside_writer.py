"""`rm -r` of a namespace beside a writer hides the repositories in it until the writer lets
go; what another node writes into one of them meanwhile keeps it, and un-hides it and the
namespaces above (`Tree.upload_released`'s NotEmpty branch)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.mounts import Mount
from support.tools import ls, run

from storage.digests import digest_bytes
from storage.drivers import FilesystemDriver
from storage.registry import Registry


@pytest.mark.mount
async def test_a_repository_written_to_behind_an_rm_r_stays_and_shows_again(
    tmp_path: Path, mount: Callable[..., Mount]
) -> None:
    root = tmp_path / "root"
    m = mount(root, "--tag-ttl", "1")
    org, repo = m.path("org"), m.path("org", "app")
    os.makedirs(repo)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cp = subprocess.Popen(["cp", str(fifo), str(repo / "uploads" / "x")])
    with open(fifo, "wb") as feed:
        feed.write(os.urandom(100_000))
        feed.flush()
        for _ in range(200):
            if ls(repo / "uploads") == ["x"]:
                break
            threading.Event().wait(0.02)
        assert run("rm", "-r", org, check=False).returncode == 0
        assert not org.exists()  # hidden while the writer holds its upload
        # another node pushes a layer into org/app meanwhile
        blob = os.urandom(5000)
        upload = await Registry(FilesystemDriver(root)).repository("org/app").layers.upload()
        await upload.write_at(0, blob)
        await upload.finish(digest_bytes(blob))
        feed.write(os.urandom(1000))
    assert cp.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while not org.exists() and time.monotonic() < deadline:  # the writer's release
        threading.Event().wait(0.05)
    assert ls(org) == ["app"]
    layers = [f"sha256:{digest_bytes(blob).hex}"]
    while ls(repo / "layers") != layers and time.monotonic() < deadline:  # --tag-ttl
        threading.Event().wait(0.1)
    assert ls(repo / "layers") == layers
    assert (root / "docker/registry/v2/repositories/org/app/_layers").is_dir()
    log = "\n".join(p.read_text() for p in tmp_path.glob("regfs*.log"))
    assert "rmdir: org/app stays after all" in log
    assert "rmdir: org stays" not in log  # un-hidden with it, not tried and refused
