"""The fault-injection checker of issue 13 (`python -m bench chaos`): its invariant logic on hand-made
data (so a checker bug shows without nodes), its seeded schedule, and a short run of both scenarios
against real nodes, which must find no violation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos_check import check, last_received
from bench.chaos_cluster import faketime_library
from bench.chaos_faults import KINDS, Schedule, Timings
from bench.chaos_fleet import Record

ROOT = Path(__file__).resolve().parent.parent
APP = "app1"


def truth(devices: dict, views: dict | None = None, waiting: dict | None = None) -> dict:
    """The store's answer as bench.chaos_store truth gives it; statuses follow from the devices."""
    rank = {"offline": 0, "unavailable": 1, "online": 2}
    status = {email: max((d["status"] for d in rows), key=rank.get, default="offline")
              for email, rows in devices.items()}
    return {"devices": devices, "status": status, "views": views if views is not None else {APP: status},
            "waiting": waiting or {}}


def update(record: Record, email: str, status: str, seq: int | None = None) -> None:
    record.updates.append({"app": APP, "conn": "app1#0", "n": next(record.arrivals), "email": email,
                           "status": status, "seq": seq})


def letters(violations: list[dict]) -> str:
    return "".join(sorted({v["invariant"] for v in violations}))


def test_a_consistent_state_has_no_violation():
    record = Record()
    update(record, "ann@x", "online")
    update(record, "ann@x", "unavailable")
    store = truth({"ann@x": [{"device": "d0", "node": "a", "status": "unavailable"}], "bob@x": []})
    assert check(record, {"ann@x/d0": "unavailable"}, {APP: ["ann@x", "bob@x"]}, store) == []


def test_an_application_told_an_old_status_violates_a_and_c():
    record = Record()
    update(record, "ann@x", "online")
    store = truth({"ann@x": [{"device": "d0", "node": "a", "status": "offline"}]})
    assert letters(check(record, {"ann@x/d0": "offline"}, {APP: ["ann@x"]}, store)) == "ac"


def test_a_device_row_without_a_live_device_violates_b():
    # the application was told the truth of the store, but the store keeps a device nobody holds
    record = Record()
    update(record, "ann@x", "online")
    store = truth({"ann@x": [{"device": "d0", "node": "b", "status": "online"}]})
    found = check(record, {}, {APP: ["ann@x"]}, store)
    assert letters(found) == "bc" and any("no live connection" in v["detail"] for v in found)


def test_the_highest_seq_wins_over_arrival_order_and_a_reused_seq_violates_e():
    record = Record()
    update(record, "ann@x", "online", seq=7)
    update(record, "ann@x", "offline", seq=5)   # late, older
    assert last_received(record.updates) == {(APP, "ann@x"): "online"}
    update(record, "ann@x", "unavailable", seq=7)
    store = truth({"ann@x": [{"device": "d0", "node": "a", "status": "online"}]})
    assert "e" in letters(check(record, {"ann@x/d0": "online"}, {APP: ["ann@x"]}, store))


def test_notifications_reach_every_live_device_unless_acknowledged():
    record = Record()
    record.sent["n1"] = {"app": APP, "email": "ann@x", "attempts": ["ok"]}
    record.sent["n2"] = {"app": APP, "email": "ann@x", "attempts": ["ok"]}
    record.received += [{"device": "ann@x/d0", "email": "ann@x", "id": 1, "message": "n1"},
                        {"device": "ann@x/d0", "email": "ann@x", "id": 2, "message": "n2"}]
    record.acks[2] = "ok"   # n2 acknowledged: d1 need not see it
    rows = [{"device": "d0", "node": "a", "status": "offline"}, {"device": "d1", "node": "a", "status": "offline"}]
    live = {"ann@x/d0": "offline", "ann@x/d1": "offline"}
    found = check(record, live, {}, truth({"ann@x": rows}, waiting={"ann@x": [{"id": 1, "message": "n1"}]}))
    assert [v["key"] for v in found] == ["d:n1@ann@x/d1"]


def test_errno_50_then_a_retry_stored_twice_violates_d_and_e():
    record = Record()
    record.sent["n1"] = {"app": APP, "email": "ann@x", "attempts": ["errno 50", "ok"]}
    record.sent["n2"] = {"app": APP, "email": "ann@x", "attempts": ["errno 50", "errno 50", "errno 50"]}
    record.received += [{"device": "ann@x/d0", "email": "ann@x", "id": 1, "message": "n1"},
                        {"device": "ann@x/d0", "email": "ann@x", "id": 2, "message": "n1"},
                        {"device": "ann@x/d0", "email": "ann@x", "id": 3, "message": "n2"}]
    record.acks.update({1: "ok", 2: "ok", 3: "ok"})
    found = check(record, {"ann@x/d0": "offline"}, {},
                  truth({"ann@x": [{"device": "d0", "node": "a", "status": "offline"}]}))
    assert sorted(v["key"] for v in found) == ["d:n2", "e:n1"]
    # an attempt that got no answer may have stored it: one more id is then no violation
    record.sent["n1"]["attempts"] = ["lost", "ok"]
    assert [v["key"] for v in check(record, {"ann@x/d0": "offline"}, {},
                                    truth({"ann@x": [{"device": "d0", "node": "a", "status": "offline"}]}))] == ["d:n2"]


def test_the_same_seed_draws_the_same_schedule_and_every_kind_comes_up():
    def draw(seed: str) -> list[str]:
        schedule = Schedule(seed, KINDS["postgres"], ["a", "b", "c"], Timings(), rounds=1)
        return [f.describe() for _ in range(3) for f in schedule.next_round()]

    assert draw("7") == draw("7") != draw("8")
    first = Schedule("7", KINDS["postgres"], ["a", "b", "c"], Timings(), rounds=1).next_round()
    assert {f.kind for f in first} == set(KINDS["postgres"])


# Under CI (.ci/run installs faketime) a missing libfaketime fails the run instead of skipping it.
@pytest.mark.skipif(faketime_library() is None and not os.environ.get("CI"),
                    reason="clock skew needs libfaketime (apt-get install faketime)")
def test_a_short_chaos_run_of_both_scenarios_finds_no_violation(tmp_path):
    out = tmp_path / "chaos.json"
    run = subprocess.run([sys.executable, "-m", "bench", "chaos", "--scenario", "both", "--seconds", "45",
                          "--seed", "13", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    for scenario in result["scenarios"]:
        assert scenario["error"] is None, scenario["error"]
        assert all(count >= 1 for count in scenario["faults"].values()), scenario["faults"]
        assert scenario["traffic"]["status_ok"] > 0 and scenario["traffic"]["notifications_ok"] > 0
    assert "| scenario | fault | injected | violations | invariants |" in run.stdout
    assert result["violations"] == 0 and run.returncode == 0, run.stdout[-6000:]
