"""`regfs check` and `regfs purge-uploads`: storage/check.py on the command line, with a
progress bar when stderr is a terminal. Apart from regfs/cli.py so that what they import
(trio, tqdm, the checks) is loaded by these two commands only."""

from __future__ import annotations

import argparse
import sys
from typing import Never

import trio
from tqdm import tqdm

from storage.check import UPLOAD_PURGE_AGE, Severity, check, purge_uploads

from .sources import existing_root


class TerminalProgress:
    """storage.check's Progress as a bar on stderr, only when stderr is a terminal (tqdm
    stays silent otherwise), so logs and pipes get the findings alone."""

    def __init__(self) -> None:
        self.bar: tqdm[Never] | None = None

    def begin(self, what: str, total: int, unit: str) -> None:
        self.close()
        self.bar = tqdm(
            total=total,
            desc=what,
            unit=unit if unit == "B" else f" {unit}",  # 5/9 [00:01, 4.2 uploads/s]
            unit_scale=unit == "B",
            unit_divisor=1024,
            disable=None,  # None: off when stderr is no terminal
            file=sys.stderr,
        )

    def advance(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.update(amount)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_check(args: argparse.Namespace) -> int:
    progress = TerminalProgress()
    try:
        root = existing_root(args.root, args.s3_endpoint)
        age = UPLOAD_PURGE_AGE if args.upload_age is None else args.upload_age
        findings = trio.run(check, root, args.verify, age, progress)
    finally:
        progress.close()
    for finding in findings:
        print(finding)
    worst = max((f.severity for f in findings), default=0)
    damage = sum(f.severity == Severity.DAMAGE for f in findings)
    print(
        f"{len(findings)} findings, {damage} damage" if findings else "no findings", file=sys.stderr
    )
    return int(worst)


def run_purge(args: argparse.Namespace) -> int:
    progress = TerminalProgress()
    try:
        root = existing_root(args.root, args.s3_endpoint)
        purged = trio.run(purge_uploads, root, args.older_than, args.dry_run, progress)
    finally:
        progress.close()
    verb = "would delete" if args.dry_run else "deleted"
    for upload in purged:
        print(
            f"{verb} {upload.repository}/uploads/{upload.shown} "
            f"(upload {upload.uuid}, started {upload.started_at:%F %T}Z)"
        )
    print(f"{verb} {len(purged)} uploads", file=sys.stderr)
    return 0
