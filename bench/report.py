"""The table on the terminal and the JSON file: the same rows, for people and for scripts."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .measure import Row

RATIO_NOTE = (
    "ratio: how many times better regfs is than the peer (regfs/peer for MB/s, peer/regfs "
    "for times); for RSS, peak at the small size / peak at the large size (1.0 = flat)"
)


def value(number: float | None, unit: str) -> str:
    if number is None:
        return "—"
    if unit == "ms":
        text = f"{number:.3f}" if number < 10 else f"{number:.0f}"
    elif unit == "MB":
        text = f"{number:.1f}"
    else:
        text = f"{number:.0f}"
    return f"{text} {unit}"


def verdict(row: Row) -> str:
    return {True: "pass", False: "FAIL", None: ""}[row.passed]


def table(rows: Sequence[Row]) -> str:
    header = ("measure", "regfs", "peer", "peer value", "ratio", "target", "result")
    lines = [header]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(
            (
                row.metric,
                value(row.regfs, row.unit),
                row.peer_name,
                value(row.peer, row.unit) if row.peer_name else "",
                ratio,
                row.target,
                verdict(row),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {1, 3, 4}
    out = []
    for index, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  {row.metric}: {row.note}" for row in rows if row.note]
    return "\n".join([*out, "", RATIO_NOTE, *(["notes:", *notes] if notes else [])])


def summary(rows: Sequence[Row], errors: dict[str, str]) -> str:
    checked = [r for r in rows if r.passed is not None]
    met = sum(1 for r in checked if r.passed)
    text = f"{met} of {len(checked)} targets met"
    if errors:
        text += f"; {len(errors)} scenario(s) failed: " + ", ".join(errors)
    return text


def host_info() -> dict[str, Any]:
    """Enough about the machine and the code to compare runs, including the load: figures
    taken while other work runs are noisy, and the load average says so."""
    here = Path(__file__).resolve().parent.parent
    git = subprocess.run(
        ["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "regfs_commit": git.stdout.strip() or None,
        "loadavg": os.getloadavg(),
    }


def write_json(path: Path, document: dict[str, Any], rows: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**document, "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
