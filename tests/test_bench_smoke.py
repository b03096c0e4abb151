"""The benchmark harness, end to end at a small N, so it cannot rot: `python -m bench run --quick`
drives a real `twistd presence` node and both references, and every scenario must produce figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def test_quick_bench_run_measures_every_scenario(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--quick", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "| metric" in run.stdout and "target (issue 8)" in run.stdout  # the tables were printed
    assert "node: devices:" in run.stdout  # and progress along the way
    results = json.loads(out.read_text())
    n = results["meta"]["connections"]
    assert not [note for note in results["notes"] if note.startswith("bench process log")], results["notes"]

    for target in ("node", "autobahn", "floor"):
        r = results[target]
        idle = r["idle"]
        assert idle["devices"]["failed"] == idle["apps"]["failed"] == 0, target
        assert idle["connections"] == n, target
        assert idle["devices"]["rate"] > 0 and idle["apps"]["rate"] > 0, target
        assert _number(idle["rss_per_conn_kib"]) and idle["rss_per_conn_kib"] < 200, target

        storm = r["storm"]
        assert storm["n"] == n and storm["failed"] == storm["not_current"] == 0, (target, storm)
        assert 0 < storm["seconds_back"] <= storm["seconds"] < 60, (target, storm)

        fan = r["fanout_one_app"]
        assert fan["complete"] and fan["n"] == n, (target, fan)  # every subscriber had every change
        assert all(0 < ms < 5000 for ms in fan["rounds_ms"]), (target, fan)

        for scenario in ("idle", "storm", "fanout_one_app"):
            assert _number(r[scenario]["stall_ms"]) and r[scenario]["stall_ms"] >= 0, (target, scenario)

    node = results["node"]
    assert node["idle"]["rss_per_conn_kib"] > 0
    many = node["fanout_many_apps"]
    assert many["complete"] and many["n"] == n, many
    assert node["many_apps_connect"]["failed"] == 0
    steps = node["throughput"]["steps"]
    assert steps and steps[0]["sustained"], steps
    first = steps[0]
    assert first["delivered_pct"] == 100.0 and first["errors"] == 0, first
    assert 0 < first["p50"] <= first["p99"] <= first["max"] < 5000, first
    assert node["throughput"]["sustained"] >= first["target"]
