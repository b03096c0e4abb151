"""The peer conformance suite: the Autobahn TestSuite's cases, run on Python 3 by kosoku, against an
echo session on presence.ws.server (tests/wsecho.py), each side in a process of its own.

Every case of groups 1-7, 9 and 10 that needs neither binary messages nor compression must be OK or
NON-STRICT (or INFORMATIONAL where the case can only ever be that: 7.1.6, 7.13.x); binary cases are
refused with 1003 (by design: the protocol is JSON text); the 9.x cases (large messages, many
fragments) take at most three times what Autobahn's own Twisted server takes, in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

pytest.importorskip("kosoku")

# Cases that send binary messages: refused at their first frame with 1003.
BINARY = ("1.2.", "9.2.", "9.4.", "9.6.", "9.8.")
# Cases whose verdict is INFORMATIONAL whatever the peer does (Autobahn's case files say so).
INFORMATIONAL_ONLY = {"7.1.6", "7.13.1", "7.13.2"}


def is_binary(case: str) -> bool:
    return case.startswith(BINARY)


class EchoServer:
    def __init__(self, which: str):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.wsecho", which], stdout=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline()     # the port, once it listens
        assert line.strip().isdigit(), f"the {which} echo server did not start"
        self.url = f"ws://127.0.0.1:{line.strip()}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def fuzz(url: str, cases: list[str], concurrency: int = 1) -> dict[str, dict]:
    done = subprocess.run([sys.executable, "-m", "tests.wsecho", "fuzz", url, str(concurrency), *cases],
                          capture_output=True, text=True, timeout=120)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert results, f"kosoku gave no results: {done.stderr[-2000:]}"
    return {r["case"]: r for r in results}


@pytest.fixture(scope="module")
def presence_echo():
    server = EchoServer("presence")
    yield server
    server.stop()


def check(results: dict[str, dict]) -> Counter:
    """Every case as required; returns the verdicts counted per group."""
    wrong, counts = [], Counter()
    for case, r in results.items():
        group = case.split(".")[0]
        if is_binary(case):
            verdict = "refused 1003" if r["code"] == 1003 and "'message'" not in r["received"] else "WRONG"
        elif case in INFORMATIONAL_ONLY:
            verdict = r["behavior"] if r["behavior"] == "INFORMATIONAL" else "WRONG"
        elif r["behavior"] in ("OK", "NON-STRICT") and r["close"] in ("OK", "INFORMATIONAL"):
            verdict = r["behavior"]
        else:
            verdict = "WRONG"
        if verdict == "WRONG":
            wrong.append(r)
        counts[group, verdict] += 1
    assert not wrong, wrong
    return counts


def test_groups_1_to_7_and_10(presence_echo):
    groups = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"]
    results = fuzz(presence_echo.url, groups, concurrency=4)    # 5.19, 5.20 and 6.4.x wait seconds each
    counts = check(results)
    print("\n" + "\n".join(f"{g:>3} {v:<13} {n}" for (g, v), n in sorted(counts.items(), key=lambda x: (int(x[0][0]), x[0][1]))))
    assert {case.split(".")[0] for case in results} == {"1", "2", "3", "4", "5", "6", "7", "10"}
    assert len(results) >= 247          # kosoku 0.1.0 has 247 cases in these groups


def test_group_9_against_autobahns_own_server(presence_echo):
    reference = EchoServer("autobahn")
    try:
        ours = fuzz(presence_echo.url, ["9.*"])
        theirs = fuzz(reference.url, ["9.*"])
    finally:
        reference.stop()
    counts = check(ours)
    assert all(r["behavior"] == "OK" for r in theirs.values())
    text = [case for case in ours if not is_binary(case)]
    ours_ms, theirs_ms = sum(ours[c]["ms"] for c in text), sum(theirs[c]["ms"] for c in text)
    print(f"\n9.x text cases: presence {ours_ms} ms, autobahn {theirs_ms} ms; {dict(counts)}")
    for case in text:
        print(f"  {case:<6} {ours[case]['ms']:>6} ms  autobahn {theirs[case]['ms']:>6} ms")
    assert len(text) == 27 and ours_ms <= 3 * theirs_ms
