"""`python -m bench`: run the scenarios, print the table, write the JSON; clean up always.

Everything lives in one temporary work directory (storage root, mountpoint, scratch files,
registry config and logs), removed at the end even on failure, Ctrl-C or SIGTERM, after the
mount is unmounted and the registry stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType

from .caches import HOW_COLD, can_drop_all
from .config import Config, MiB, format_size, parse_size
from .measure import Row
from .mount import Mount
from .registry import RegistryProcess
from .report import host_info, summary, table, write_json
from .root import Root
from .scenarios import MARGIN, SHARED_LAYER, Env, Scenario
from .scenarios import SCENARIOS as LISTED
from .walk import SCENARIOS as WALKS

SCENARIOS = (*LISTED, *WALKS)
NAMES = tuple(s.name for s in SCENARIOS)

RESULTS = Path(__file__).resolve().parent / "results"
TOOLS = ("cat", "cp", "mv", "ls", "curl", "openssl", "fusermount3", "docker-registry")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure regfs and its peers in the same run; print a table, write JSON.",
    )
    parser.add_argument("--size", type=parse_size, help="layer and push size (default 1G)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition")
    parser.add_argument("--reps", type=int, help="fresh mounts per scenario (default 5)")
    parser.add_argument("--only", help=f"comma-separated scenarios: {','.join(NAMES)}")
    parser.add_argument("--entries", type=int, help="repositories and tags to list (10000)")
    parser.add_argument("--random-reads", type=int, help="4 KiB reads per repetition (1000)")
    parser.add_argument("--rss-sizes", help="blob sizes streamed for peak RSS (1G,4G)")
    parser.add_argument("--dir", type=Path, help="where the work directory goes ($TMPDIR)")
    parser.add_argument("--json", type=Path, help="write the JSON here (bench/results/…)")
    return parser


def build_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    if args.only:
        only = frozenset(n.strip() for n in args.only.split(",") if n.strip())
        if unknown := only - set(NAMES):
            raise SystemExit(f"bench: unknown scenario(s) {sorted(unknown)}; know {NAMES}")
        overrides["only"] = only
    if args.rss_sizes:
        overrides["rss_sizes"] = tuple(parse_size(s) for s in args.rss_sizes.split(","))
    for name in ("size", "reps", "entries", "random_reads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.dir is not None:
        overrides["workdir"] = args.dir
    config = replace(Config.quick_mode() if args.quick else Config(), **overrides)
    if min(config.reps, config.entries, config.random_reads, config.size >> 20) < 1:
        raise SystemExit("bench: --reps, --entries and --random-reads ≥ 1, --size ≥ 1M")
    # The parallel readers share out one layer's worth of bytes.
    return replace(config, reader_size=max(config.size // config.readers, MiB))


def disk_needed(config: Config, scenarios: Sequence[Scenario]) -> int:
    shared = config.size if any(s.name in SHARED_LAYER for s in scenarios) else 0
    return shared + sum(s.disk(config) for s in scenarios) + MARGIN


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def workspace(base: Path) -> Iterator[Path]:
    """A temporary work directory; on the way out, signals wait until clean-up is done."""
    workdir = Path(tempfile.mkdtemp(prefix="regfs-bench-", dir=base))
    try:
        yield workdir
    finally:
        previous = (
            signal.signal(signal.SIGINT, signal.SIG_IGN),
            signal.signal(signal.SIGTERM, signal.SIG_IGN),
        )
        try:
            mount = Mount(workdir / "root", workdir / "mnt", workdir / "logs")
            mount.stop()
            if mount.mounted:  # never let rmtree walk into a live mount
                say(f"bench: could not unmount {mount.mountpoint}; left {workdir} in place")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_scenarios(
    env: Env, scenarios: Sequence[Scenario], rows: list[Row], errors: dict[str, str]
) -> None:
    for index, scenario in enumerate(scenarios, 1):
        say(f"[{index}/{len(scenarios)}] {scenario.name} …")
        start = time.monotonic()
        try:
            found = scenario.run(env)
        except Exception as exc:  # one broken scenario should not hide the others' figures
            errors[scenario.name] = f"{type(exc).__name__}: {exc}"
            say(f"    failed: {errors[scenario.name]}")
            continue
        rows.extend(found)
        say(f"    done in {time.monotonic() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = build_config(args)
    scenarios = [s for s in SCENARIOS if config.wants(s.name)]
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        say(f"bench: missing tools {missing}: `make deb` installs them")
        return 2
    base = config.workdir or Path(tempfile.gettempdir())
    need, free = disk_needed(config, scenarios), shutil.disk_usage(base).free
    if free < need:
        say(
            f"bench: needs {format_size(need)} free in {base}, has {free >> 20} MiB; "
            "use --dir or a smaller --size"
        )
        return 2
    cold = HOW_COLD if can_drop_all() else "posix_fadvise(DONTNEED) on the files (not root)"
    started, host = datetime.now(), host_info()
    document: dict[str, object] = {
        "started": started.isoformat(timespec="seconds"),
        "host": host,
        "config": {**vars(config), "only": sorted(config.only or NAMES)},
        "cold_caches": cold,
    }
    say(
        f"regfs bench: layer {format_size(config.size)}, {config.reps} fresh mount(s) per "
        f"scenario, medians; cold reads: {cold}; work dir under {base} "
        f"(needs ≤ {format_size(need)})"
    )
    rows: list[Row] = []
    errors: dict[str, str] = {}
    signal.signal(signal.SIGTERM, _interrupt)
    env: Env | None = None
    try:
        with workspace(base) as workdir, contextlib.ExitStack() as stack:
            store = Root(workdir / "root", workdir / "scratch")
            store.scratch.mkdir(parents=True)
            env = Env(config, store, workdir / "mnt", workdir / "logs")
            if any(s.needs_registry for s in scenarios):
                registry = RegistryProcess(store.root, workdir / "registry")
                env.registry_url = stack.enter_context(registry).url
            run_scenarios(env, scenarios, rows, errors)
    except KeyboardInterrupt:
        say("bench: interrupted; everything was cleaned up")
        return 130
    document.update(
        finished=datetime.now().isoformat(timespec="seconds"),
        loadavg_after=host_info()["loadavg"],
        errors=errors,
        daemon_tracebacks=env.problems if env else [],
    )
    out = args.json or RESULTS / f"{started:%Y%m%d-%H%M%S}-{os.getpid()}.json"
    write_json(out, document, rows)
    load_before, load_after = host["loadavg"][0], document["loadavg_after"][0]  # type: ignore[index]
    print(
        f"regfs bench, {document['started']}, {host['cpus']} CPUs, load average "
        f"{load_before:.1f} → {load_after:.1f}; layer {format_size(config.size)}, "
        f"{config.reps} fresh mount(s) per scenario, medians"
    )
    print(f"cold reads: {cold}\n")
    print(table(rows))
    for name, error in errors.items():
        print(f"error in {name}: {error}")
    for problem in env.problems if env else []:
        print(f"the daemon logged a traceback (a regfs bug?): {problem}")
    print(f"\n{summary(rows, errors)}; JSON: {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
