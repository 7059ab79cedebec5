"""What one bench run measures: sizes, repetitions, which scenarios."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`1G`, `512M`, `64KiB`, `1000` → bytes (binary units: 1G is 1 GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 1G, 512M, 64K)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]} {unit}iB"
    return f"{n} B"


@dataclass(frozen=True)
class Config:
    """Everything a scenario may read; `quick` only changed the defaults."""

    size: int = GiB  # the layer that is read, and the file that is pushed
    reps: int = 5  # fresh mounts per scenario; medians over them
    entries: int = 10_000  # repositories in a namespace, tags in a repository
    random_reads: int = 1_000  # 4 KiB reads per repetition
    readers: int = 8  # parallel readers, each on its own layer
    reader_size: int = GiB // 8  # size of each parallel reader's layer
    rss_sizes: tuple[int, ...] = (GiB, 4 * GiB)  # streamed in and out, peak RSS each
    only: frozenset[str] | None = None
    workdir: Path | None = None  # where the temp root goes (default: $TMPDIR)
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> Config:
        """Small sizes, one repetition: a smoke run of every code path in seconds."""
        return cls(
            size=16 * MiB,
            reps=1,
            entries=200,  # a directory costs ~0.3 ms to make on this disk
            random_reads=200,
            reader_size=2 * MiB,
            rss_sizes=(8 * MiB, 32 * MiB),
            quick=True,
        )

    def wants(self, scenario: str) -> bool:
        return self.only is None or scenario in self.only
