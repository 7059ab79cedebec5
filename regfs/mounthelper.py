"""mount(8)'s helper: `mount -t fuse.regfs SOURCE MNT -o …` and /etc/fstab lines.

For `-t fuse.regfs` mount(8) runs /sbin/mount.fuse.regfs if it exists (mount.regfs for
`-t regfs`), as `HELPER SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`, with PATH
removed from its environment. `make install` links both names to the `regfs` script, which
knows them by the name it was run as. Without those links mount(8) falls back to fuse3's
/sbin/mount.fuse, which runs `regfs SOURCE MOUNTPOINT -o OPTIONS` through /bin/sh's default
PATH (/usr/local/bin: a package installed as root is found there); `regfs` takes that form
too. Both become `regfs mount -o OPTIONS SOURCE MOUNTPOINT`, so an option is checked, and
refused, in the same words as on the command line.
"""

from __future__ import annotations

import argparse

HELPER_NAMES = frozenset({"mount.fuse.regfs", "mount.regfs"})
TYPES = frozenset({"fuse.regfs", "regfs"})


def helper_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mount.fuse.regfs",
        description="mount(8)'s helper for regfs: run by `mount -t fuse.regfs` and for "
        "fstab lines of type fuse.regfs; the same as `regfs mount -o OPTIONS SOURCE "
        "MOUNTPOINT`.",
    )
    parser.add_argument("source", metavar="SOURCE")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    parser.add_argument("-t", dest="type", metavar="TYPE", help="fuse.regfs or regfs")
    parser.add_argument("-f", dest="fake", action="store_true", help="check, do not mount")
    parser.add_argument("-N", dest="namespace", metavar="NS", help="not supported")
    for flag, what in (("-s", "sloppy"), ("-n", "no mtab"), ("-v", "verbose")):
        parser.add_argument(flag, action="store_true", help=f"{what}: accepted, no effect")
    return parser


def is_fuse_call(argv: list[str], commands: frozenset[str]) -> bool:
    """fuse3's mount.fuse runs `regfs SOURCE MOUNTPOINT -o OPTIONS`, exactly that shape."""
    shape = len(argv) == 4 and argv[2] == "-o"
    return shape and argv[0] not in commands and not argv[0].startswith("-")


def mount_arguments(argv: list[str]) -> list[str]:
    """The `regfs mount` arguments for a helper's command line (argparse exits on bad usage)."""
    parser = helper_parser()
    args = parser.parse_args(argv)
    if args.type is not None and args.type not in TYPES:
        parser.error(f"type {args.type!r} is not regfs's (fuse.regfs or regfs)")
    if args.namespace is not None:
        parser.error("-N: mounting in another mount namespace is not supported")
    options = [f"-o{text}" for text in args.options if text]
    return ["mount", *options, *(["--fake"] if args.fake else []), args.source, args.mountpoint]
