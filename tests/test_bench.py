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
MEASURES |= {"remote_cold_read", "remote_random_read"}
TIMEOUT = 120  # the quick run takes ~20 s; leave room for a loaded machine


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the bench; on a timeout, SIGTERM lets it unmount and clean up before it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
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
        pytest.fail(f"bench --quick did not finish in {TIMEOUT} s:\n{err[-3000:]}")
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

    # Nothing left behind: no work directory, no mount, no daemon of ours.
    assert list(work.iterdir()) == []
    assert str(work) not in Path("/proc/mounts").read_text()
    daemons = subprocess.run(["pgrep", "-f", str(work)], capture_output=True, text=True)
    assert daemons.stdout == "", daemons.stdout
