"""`python -m bench --quick` as a smoke test: every measure runs and reports numbers.

No timing assertions (figures on a shared CI machine mean nothing); this only keeps the
benchmark from rotting, and checks it cleans up after itself.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
MEASURES = {"cold_read", "warm_read", "random_read", "push", "rss", "ls", "ls_long", "parallel"}
MEASURES |= {"remote_cold_read", "remote_random_read", "walk", "remote_walk", "tags_rss"}
TIMEOUT = 240  # the quick run takes ~30 s; 100 s and more on a loaded machine


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def run_bench(*args: str, module: str = "bench") -> subprocess.CompletedProcess[str]:
    """Run the bench; on a timeout, SIGTERM lets it unmount and clean up before it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{module} {' '.join(args)} did not finish in {TIMEOUT} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.registry
def test_quick_bench_reports_every_measure(tmp_path):
    out = tmp_path / "results.json"
    work = tmp_path / "work"
    work.mkdir()
    result = run_bench("--quick", "--json", str(out), "--dir", str(work))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    document = json.loads(out.read_text())
    assert document["errors"] == {}
    assert document["daemon_tracebacks"] == []
    rows = document["rows"]
    assert {row["measure"] for row in rows} == MEASURES
    for row in rows:
        assert is_number(row["regfs"]), row
        if row["peer_name"]:
            assert is_number(row["peer"]) and is_number(row["ratio"]), row
        if row["target"]:
            assert isinstance(row["passed"], bool), row
    assert "targets met" in result.stdout

    assert_cleaned_up(work)


def assert_cleaned_up(work: Path) -> None:
    """Nothing left behind: no work directory, no mount, no daemon or registry of ours."""
    assert list(work.iterdir()) == []
    assert str(work) not in Path("/proc/mounts").read_text()
    daemons = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert daemons.stdout == "", daemons.stdout


@pytest.mark.registry
@pytest.mark.remote
def test_quick_rootfs_bench_reports_every_measure(tmp_path):
    """`python -m bench.rootfs --quick`: tiny images of local files built and kept, each
    measure reported against its peer, blob bytes counted on both sources, nothing left."""
    out, work, images = tmp_path / "rootfs.json", tmp_path / "work", tmp_path / "images"
    work.mkdir()
    args = ("--quick", "--json", str(out), "--dir", str(work), "--images", str(images))
    result = run_bench(*args, module="bench.rootfs")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"

    document = json.loads(out.read_text())
    assert document["errors"] == {}
    assert document["daemon_tracebacks"] == []
    rows = {row["metric"]: row for row in document["rows"]}
    assert {row["measure"] for row in rows.values()} == {
        "first_cat", "kept_index_cat", "walk", "rss"
    }  # fmt: skip
    for row in rows.values():
        assert is_number(row["regfs"]), row
        if row["peer_name"]:
            assert is_number(row["peer"]) and is_number(row["ratio"]), row
        if row["target"]:
            assert isinstance(row["passed"], bool), row
    walked = [m for m in rows if m.startswith(("find", "ls -lR"))]
    assert len(walked) == 4, walked  # both tools, cold and warm
    for where in ("local", "HTTP"):  # the counters saw the blob being read
        first = rows[f"{where}: first cat on a fresh mount (index load + merge)"]
        later = rows[f"{where}: blob bytes read per ~100 KB cat, mean (then max)"]
        assert sum(first["samples"]["bytes"]) + sum(later["samples"]["regfs"]) > 0
    assert document["profile"]["index_load_ms"] > 0
    assert "targets met" in result.stdout
    assert_cleaned_up(work)
    # The images stay for the next run: a layout, a storage root and the unpacked tree.
    kept = sorted(p.name for p in images.iterdir())
    assert [name.split("-")[0] for name in kept] == ["big", "usr"], kept
    assert (images / kept[1] / "bundle" / "rootfs" / "usr").is_dir()
    assert all(len(rows[m]["samples"]["cpu"]) == 1 for m in walked)  # the daemon's CPU
    # One measure alone, on the kept images: its index is made first, as measure 1 would.
    result = run_bench(*args, "--only", "walk", module="bench.rootfs")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    document = json.loads(out.read_text())
    assert document["errors"] == {} and document["daemon_tracebacks"] == []
    assert {row["measure"] for row in document["rows"]} == {"walk"}
    assert_cleaned_up(work)
