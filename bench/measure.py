"""Timing helpers and the result row every scenario returns.

Wall-clock time of whole processes (`cat`, `curl`, `cp`, `ls`), because that is what a user
waits for; both sides of a comparison pay the same process start-up (about a millisecond).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

MB = 1_000_000  # throughputs and memory are reported in decimal MB
C_LOCALE = {**os.environ, "LC_ALL": "C"}


class BenchError(RuntimeError):
    """A step of a scenario failed (a tool exited non-zero, a result did not verify)."""


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: a value that was really measured, not an interpolation."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def run(args: Sequence[str | Path], *, stdout: int | None = subprocess.DEVNULL) -> bytes:
    """Run a tool; BenchError with its stderr if it fails."""
    result = subprocess.run(
        [str(a) for a in args], stdout=stdout, stderr=subprocess.PIPE, env=C_LOCALE, timeout=900
    )
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(map(str, args))}: exit {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()[-500:]}"
        )
    return result.stdout or b""


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds that fn took, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cpu_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every CPU so far, from /proc/stat."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def timed_busy(fn: Callable[[], T]) -> tuple[float, float, T]:
    """Seconds that fn took, the share of all CPUs busy meanwhile (0..1), what it returned."""
    busy, total = cpu_ticks()
    seconds, result = timed(fn)
    busy_after, total_after = cpu_ticks()
    return seconds, (busy_after - busy) / max(1, total_after - total), result


def timed_run(args: Sequence[str | Path]) -> float:
    """Seconds a tool took, its output thrown away."""
    return timed(lambda: run(args))[0]


def sides(rep: int) -> tuple[str, str]:
    """Which side goes first: swapped on odd repetitions, so drift falls on both."""
    return ("regfs", "peer") if rep % 2 == 0 else ("peer", "regfs")


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


@dataclass
class Row:
    """One line of the table: regfs's figure, its peer's, their ratio, and the target.

    `ratio` is how many times better regfs is than the peer (> 1: regfs wins), whatever the
    unit: regfs/peer for throughputs, peer/regfs for times. `passed` is None when there is
    no target to check.
    """

    measure: str  # the scenario (--only name)
    metric: str  # what this row shows
    unit: str
    regfs: float
    peer_name: str = ""
    peer: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


def throughput_row(
    measure: str,
    metric: str,
    regfs: list[float],
    peer_name: str,
    peer: list[float],
    min_ratio: float | None,
) -> Row:
    """Medians of MB/s samples; passes when regfs >= min_ratio times the peer (no target
    with None: a figure for context, such as a limit of the machine)."""
    mine, theirs = median(regfs), median(peer)
    ratio = mine / theirs
    return Row(
        measure,
        metric,
        "MB/s",
        mine,
        peer_name,
        theirs,
        ratio,
        "" if min_ratio is None else f"≥ {min_ratio:g}x peer",
        None if min_ratio is None else ratio >= min_ratio,
        {"regfs": regfs, "peer": peer},
    )
