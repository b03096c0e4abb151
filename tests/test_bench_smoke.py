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


def _database_exists(name: str) -> bool:
    import psycopg2

    from tests.conftest import POSTGRES_ADMIN

    conn = psycopg2.connect(POSTGRES_ADMIN)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


def test_quick_cross_node_run_measures_latency_from_node_a_to_b_and_c(tmp_path):
    """Three real nodes on a fresh PostgreSQL database; devices on A, the application on B and C."""
    from tests.conftest import POSTGRES_ADMIN

    out = tmp_path / "cross.json"
    run = subprocess.run([sys.executable, "-m", "bench", "cross-node", "--quick", "--postgres", POSTGRES_ADMIN,
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "| rate/s" in run.stdout and "delivered on B" in run.stdout  # the table was printed
    assert "node A: devices:" in run.stdout and "sent:" in run.stdout  # and progress along the way
    results = json.loads(out.read_text())
    assert not [note for note in results["notes"] if "log" in note], results["notes"]  # no node or bench traceback
    assert not _database_exists(results["meta"]["database"])  # the bench dropped its database
    cross = results["cross"]
    assert cross["devices"]["failed"] == 0 and cross["devices"]["n"] == results["meta"]["devices"]
    steps = cross["steps"]
    assert [s["target"] for s in steps] == [100, 200], steps
    for step in steps:
        assert step["errors"] == 0 and step["sent"] > 0, step
        for node in ("b", "c"):  # every change reached the application's connection on B and on C
            s = step[node]
            assert s["delivered"] == step["sent"] and s["delivered_pct"] == 100.0, (node, step)
            assert 0 < s["p50"] <= s["p99"] <= s["max"] < 5000, (node, step)
        assert all(pct >= 0 for pct in step["cpu_pct"].values()) and step["pg_cpu_pct"] >= 0, step
    assert steps[0]["kept_up"], steps[0]


def test_quick_notify_run_measures_posted_notifications_reaching_devices(tmp_path):
    """One node, devices acknowledging, an application posting batches over HTTP."""
    out = tmp_path / "notify.json"
    run = subprocess.run([sys.executable, "-m", "bench", "notify", "--quick", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "| rate/s" in run.stdout and "target (issue 7)" in run.stdout  # the tables were printed
    assert "node: devices:" in run.stdout and "posted:" in run.stdout  # and progress along the way
    results = json.loads(out.read_text())
    assert not [note for note in results["notes"] if "log" in note or "refused" in note], results["notes"]
    r = results["notify"]
    assert r["devices"]["failed"] == 0 and r["devices"]["n"] == results["meta"]["devices"]
    steps = r["steps"]
    assert [s["target"] for s in steps] == [500, 1000], steps
    for step in steps:
        assert step["refused"] == step["http_errors"] == 0, step
        assert step["accepted"] == step["posted"] > 0, step
        assert step["delivered"] == step["accepted"] and step["delivered_pct"] == 100.0, step  # every item arrived
        assert step["acks"] == step["messages"] > 0 and step["ack_errors"] == 0, step
        assert 0 < step["p50"] <= step["p99"] <= step["max"] < 5000, step
        assert 0 < step["rtt_p50"] <= step["rtt_p99"], step
    assert steps[0]["kept_up"], steps[0]
    assert r["verdict"]["met"] is None  # no step at the 10,000/s in a quick run


def test_quick_cluster_hold_run_holds_connections_on_every_node_and_fans_out_across_them(tmp_path):
    """Two real nodes on a fresh PostgreSQL database hold the connections between them; a device on node 0
    changes status and every application connection on every node receives it."""
    from tests.conftest import POSTGRES_ADMIN

    out = tmp_path / "cluster.json"
    run = subprocess.run([sys.executable, "-m", "bench", "cluster-hold", "--quick", "--postgres", POSTGRES_ADMIN,
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "| node" in run.stdout and "RSS per connection KiB" in run.stdout  # the table was printed
    assert "devices:" in run.stdout and "fan-out round 1:" in run.stdout  # and progress along the way
    results = json.loads(out.read_text())
    assert not [note for note in results["notes"] if "log" in note], results["notes"]  # no node or bench traceback
    assert not _database_exists(results["meta"]["database"])  # the bench dropped its database
    r = results["cluster"]
    nodes = r["nodes"]
    assert len(nodes) == results["meta"]["nodes"] >= 2, nodes
    assert r["devices"]["failed"] == r["apps"]["failed"] == 0, r
    assert r["held"] == r["planned"] == results["meta"]["connections"] == sum(n["held"] for n in nodes)
    assert r["connect_rate"] > 0, r
    for n in nodes:
        assert n["held"] == n["planned"] > 0 and n["devices"] > 0 and n["apps"] > 0, n  # every node held its share
        assert _number(n["rss_per_conn_kib"]) and 0 < n["rss_per_conn_kib"] < 200, n
        fan = n["fanout"]
        assert fan["n"] == n["apps"] and fan["got"] == [n["apps"]] * results["meta"]["rounds"], n  # every connection
        assert fan["complete"] and all(0 < ms < 5000 for ms in fan["rounds_ms"]), n
    assert r["fanout"]["complete"] and 0 < r["fanout"]["ms"] < 5000, r["fanout"]
