"""Mount options, from the command line or `-o a,b=c` (the mount(8) and fstab form)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_TAG_TTL = 5.0
DEFAULT_READ_AHEAD_KB = 1024  # the largest FUSE request (256 pages) the kernel will send
DEFAULT_INDEX_CACHE_SIZE = 1 << 30


class OptionValueError(ValueError):
    """A bad option value, its message written for the user (the option's name is added)."""


@dataclass
class MountOptions:
    source: str
    mountpoint: str
    read_only: bool = False
    allow_other: bool = False
    debug: bool = False
    log_file: str | None = None
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    tag_ttl: float = DEFAULT_TAG_TTL
    read_ahead_kb: int = DEFAULT_READ_AHEAD_KB
    init: bool = False  # make a non-empty directory a storage root
    # Names only where the kernel wants no attributes (regfs's pyfuse3 build; `Operations`).
    plain_readdir: bool = False
    # Remote sources (http:// and https://).
    insecure: bool = False
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None  # read by the command, never passed on to the daemon
    timeout: float | None = None  # seconds per connect/read/write; None: the client's 30 s
    s3_endpoint: str | None = None  # s3:// sources: an S3-compatible server instead of AWS
    # The byte bound of the on-disk cache of layer indexes (the rootfs/ view).
    index_cache_size: int = DEFAULT_INDEX_CACHE_SIZE

    def fuse_options(self) -> set[str]:
        # default_permissions: the kernel checks modes, as for a local filesystem. nosuid,
        # nodev: an image's setuid files and device nodes (rootfs/) are shown as the tar has
        # them, and must never give their powers to whoever runs or opens them.
        opts = {
            "default_permissions",
            "nosuid",
            "nodev",
            "subtype=regfs",
            f"fsname={_fsname(self.source)}",
        }
        if self.read_only:
            opts.add("ro")
        if self.allow_other:
            opts.add("allow_other")
        return opts


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise ValueError(text)
    return value


def kibibytes(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(text: str) -> int:
    """A positive size: bytes, or binary units as ls -h and dd write them (512M, 2G, 1.5GiB)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(?:([KMGT])(?:i?B)?|B)?", text.strip(), re.IGNORECASE)
    value = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()]) if match else 0
    if value <= 0:
        raise OptionValueError(f"bad size {text!r} (e.g. 512M, 2G or a number of bytes)")
    return value


def endpoint_url(text: str) -> str:
    """An S3 endpoint: http:// or https:// and a host, nothing the client would guess at."""
    try:
        parts = urlsplit(text)
        good = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and not (parts.query or parts.fragment or parts.username)
            and (parts.port or 1) > 0  # a bad port raises ValueError
        )
    except ValueError:
        good = False
    if not good:
        raise OptionValueError(
            f"bad S3 endpoint {text!r} (an http:// or https:// URL, e.g. http://127.0.0.1:9000)"
        )
    return text


def _fsname(source: str) -> str:
    """The source as given, as sshfs shows its own (the type says regfs): `mount -a` counts
    an fstab line as mounted only when /proc/mounts shows the line's source there."""
    return source.replace(",", "_").replace(" ", "_")


# -o names → (field, parser). Flags take no value.
_FLAGS = {
    "ro": "read_only",
    "allow_other": "allow_other",
    "debug": "debug",
    "insecure": "insecure",
    "init": "init",
    "plain_readdir": "plain_readdir",
}
_VALUES: dict[str, tuple[str, Callable[[str], object]]] = {
    "uid": ("uid", int),
    "gid": ("gid", int),
    "file_mode": ("file_mode", lambda v: int(v, 8)),
    "dir_mode": ("dir_mode", lambda v: int(v, 8)),
    "tag_ttl": ("tag_ttl", float),
    "read_ahead_kb": ("read_ahead_kb", kibibytes),
    "log": ("log_file", str),
    "ca_file": ("ca_file", str),
    "username": ("username", str),
    "password_file": ("password_file", str),
    "timeout": ("timeout", _seconds),
    "s3_endpoint": ("s3_endpoint", endpoint_url),
    "index_cache_size": ("index_cache_size", byte_size),
}
# Accepted from mount(8)/fstab and meaningless here.
_IGNORED = {
    "rw",
    "_netdev",
    "nofail",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "defaults",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
}


def apply_o_options(options: MountOptions, text: str) -> None:
    """Apply `-o a,b=c`; an unknown option raises ValueError naming the known ones."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if key in _FLAGS and not sep:
            setattr(options, _FLAGS[key], True)
        elif key in _VALUES and sep:
            name, parse = _VALUES[key]
            try:
                setattr(options, name, parse(value))
            except OptionValueError as exc:
                raise ValueError(f"-o {key}: {exc}") from None
            except ValueError:
                raise ValueError(f"-o {key}: bad value {value!r}") from None
        elif key not in _IGNORED and not key.startswith("x-"):  # x-systemd.*: for others
            known = sorted([*_FLAGS, *(f"{k}=…" for k in _VALUES)])
            raise ValueError(f"unknown mount option {item!r} (known: {', '.join(known)})")
