"""`python -m bench hostile`, end to end with very short attacks, so it cannot rot: a real node, the
attackers and the healthy client; the table is printed and the node answered each attack as
docs/security.md says. The timing goals (100 ms, 50 MB) are the doc's, measured on a quiet machine,
not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = "fragments,issuer,ssrf,bodies,signin,heads"


def test_short_hostile_run_answers_each_attack_as_documented(tmp_path):
    out = tmp_path / "hostile.json"
    run = subprocess.run([sys.executable, "-m", "bench", "hostile", "--seconds", "1", "--attacks", ATTACKS,
                          "--connections", "0.5", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "| attack" in run.stdout and "healthy worst RTT ms" in run.stdout   # the table
    assert "idle RSS" in run.stdout                                            # and progress
    rows = {r["attack"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(ATTACKS.split(","))
    for name, row in rows.items():
        assert row["as_documented"], (name, row["answers"], row["documented"])
        assert row["alive"] and row["healthy"]["fresh"]["ok"], (name, row["healthy"])
        assert row["healthy"]["ok"] > 0 and row["healthy"]["ko"] == 0, (name, row["healthy"])
        assert row["rss_samples"] > 0 and row["worst_ms"] >= 0, name
    assert rows["fragments"]["answers"]["close 1009"] > 0
    assert rows["issuer"]["answers"]["errno 15"] > 0 and rows["issuer"]["log_lines"] > 0  # head-too-big
    assert rows["ssrf"]["answers"]["errno 15"] > 0 and rows["ssrf"]["log_lines"] > 0      # refused: private
    assert rows["bodies"]["answers"]["413 errno 45 (Content-Length)"] > 0
    assert rows["signin"]["answers"]["429"] > 0 and rows["signin"]["answers"].get("200", 0) <= 10
    assert set(rows["heads"]["answers"]) == {"431"}
