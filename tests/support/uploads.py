"""Uploads: where their files lie in a root, and starting them through a mount."""

from __future__ import annotations

import os
from pathlib import Path

from support.mounts import Mount
from support.registry import repo_path, upload_path
from support.tools import run


def uuid_of(path: Path) -> str:
    return os.getxattr(path, "user.regfs.uuid").decode()


def state_path(root: Path, name: str, uuid: str, offset: int) -> Path:
    return upload_path(root, name, uuid) / "hashstates" / "sha256" / str(offset)


def upload_uuids(root: Path, name: str) -> list[str]:
    uploads = repo_path(root, name) / "_uploads"
    return sorted(os.listdir(uploads)) if uploads.exists() else []


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def new_repo(m: Mount, name: str) -> Path:
    """`mkdir -p` a repository through the mount: a fresh root needs nothing else."""
    repo = m.path(*name.split("/"))
    run("mkdir", "-p", repo)
    return repo
