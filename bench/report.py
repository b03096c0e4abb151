"""Progress lines, statistics and the tables: results against the two references, the throughput
ramp, and the issue's targets marked met or missed."""

from __future__ import annotations

import math
import sys
import time

_T0 = time.monotonic()


def say(text: str, indent: bool = True) -> None:
    """A progress line, stamped with the seconds since the bench started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", file=sys.stdout, flush=True)


def percentile(values: list[float], q: float) -> float:
    """`values` sorted; nearest-rank percentile (q in 0..100)."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


def median(values: list[float]) -> float:
    return percentile(sorted(values), 50)


# -- formatting ------------------------------------------------------------------------------------------
def _num(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, str):
        return value
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(node, ref) -> str:
    if node is None or ref is None or not isinstance(node, (int, float)) or not isinstance(ref, (int, float)):
        return "—"
    if ref == 0 or math.isnan(node) or math.isnan(ref):
        return "—"
    return f"{node / ref:.2f}x"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def _get(results: dict, target: str, *path, default=None):
    value = results.get(target, {})
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return default
        value = value[key]
    return value


def metrics(results: dict) -> list[tuple[str, tuple, int]]:
    """(label, path into a target's results, digits) for the comparison table."""
    n = results["meta"]["connections"]
    return [
        ("RSS per idle connection (KiB)", ("idle", "rss_per_conn_kib"), 2),
        ("connect rate, devices with assertion (handshakes/s)", ("idle", "devices", "rate"), 0),
        ("connect rate, applications with API key (handshakes/s)", ("idle", "apps", "rate"), 0),
        (f"connect rate, {n:,} applications x 1 connection (handshakes/s)", ("many_apps_connect", "rate"), 0),
        (f"fan-out to last of {n:,}, 1 app x {n:,} connections (ms)", ("fanout_one_app", "ms"), 1),
        (f"fan-out to last of {n:,}, {n:,} apps x 1 connection (ms)", ("fanout_many_apps", "ms"), 1),
        (f"reconnect storm, {n:,} clients back and current (s)", ("storm", "seconds"), 2),
        ("throughput, highest sustained (status changes/s)", ("throughput", "sustained"), 0),
        ("worst event-loop stall, idle connect (ms)", ("idle", "stall_ms"), 1),
        ("worst event-loop stall, throughput ramp (ms)", ("throughput", "stall_ms"), 1),
        ("worst event-loop stall, reconnect storm (ms)", ("storm", "stall_ms"), 1),
        ("worst event-loop stall, fan-out 1 app (ms)", ("fanout_one_app", "stall_ms"), 1),
        ("worst event-loop stall, fan-out N apps (ms)", ("fanout_many_apps", "stall_ms"), 1),
        ("other processes' CPU meanwhile, mean (% of one core)", ("other_cpu_pct",), 0),
    ]


def comparison_table(results: dict) -> str:
    rows = []
    for label, path, digits in metrics(results):
        node = _get(results, "node", *path)
        ab = _get(results, "autobahn", *path)
        floor = _get(results, "floor", *path)
        if path[0] == "fanout_many_apps":  # the references broadcast one message; same figure for both shapes
            ab = _get(results, "autobahn", "fanout_one_app", path[1])
            floor = _get(results, "floor", "fanout_one_app", path[1])
        rows.append([label, _num(node, digits), _num(ab, digits), _ratio(node, ab), _num(floor, digits),
                     _ratio(node, floor)])
    return markdown(["metric", "node", "autobahn ref", "node/autobahn", "raw floor", "node/floor"], rows)


def ramp_table(results: dict) -> str:
    rows = []
    for step in _get(results, "node", "throughput", "steps", default=[]) or []:
        rows.append([_num(step["target"]), _num(step["achieved"]), f"{step['delivered_pct']:.1f}%",
                     _num(step["p50"], 1), _num(step["p99"], 1), _num(step["max"], 1),
                     _num(step["cpu_us_per_change"]), _num(step["stall_ms"], 1), _num(step.get("other_cpu_pct")),
                     "yes" if step["sustained"] else "NO"])
    return markdown(["target/s", "sent/s", "delivered", "p50 ms", "p99 ms", "max ms", "node CPU µs/change",
                     "stall ms", "other CPU %", "sustained"], rows)


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) — met None when the run could not measure it."""
    node = results.get("node", {})
    n = results["meta"]["connections"]
    out = []
    rss = _get(results, "node", "idle", "rss_per_conn_kib")
    out.append(("≤ 4 KiB RSS per idle connection", f"{_num(rss, 2)} KiB", None if rss is None else rss <= 4))
    floor_ms = _get(results, "floor", "fanout_one_app", "ms")
    for key, shape in (("fanout_one_app", f"1 app x {n:,} connections"), ("fanout_many_apps", f"{n:,} apps x 1 connection")):
        ms = _get(results, "node", key, "ms")
        complete = _get(results, "node", key, "complete")
        if ms is None:
            out.append((f"fan-out ({shape}) within 250 ms and 2x raw floor", "not measured", None))
            continue
        within = ms <= 250 and (floor_ms is None or ms <= 2 * floor_ms) and complete
        ratio = f", {ms / floor_ms:.1f}x floor ({floor_ms:.1f} ms)" if floor_ms else ""
        out.append((f"fan-out ({shape}) within 250 ms and 2x raw floor",
                    f"{ms:.1f} ms{ratio}{'' if complete else ', NOT all received'}", within))
    sustained = _get(results, "node", "throughput", "sustained")
    out.append(("≥ 20,000 device status changes/s", f"{_num(sustained)} /s sustained",
                None if sustained is None else sustained >= 20_000))
    steps = _get(results, "node", "throughput", "steps", default=[]) or []
    at10k = next((s for s in steps if s["target"] == 10_000), None)
    if at10k is not None:
        out.append(("p99 < 50 ms at 10,000 changes/s", f"p99 {at10k['p99']:.1f} ms"
                    + ("" if at10k["sustained"] else " (not sustained)"), at10k["p99"] < 50 and at10k["sustained"]))
    else:
        out.append(("p99 < 50 ms at 10,000 changes/s",
                    f"not reached (ramp stopped at {_num(steps[-1]['target']) if steps else '—'}/s)",
                    False if steps else None))
    stalls = [v for v in (_get(results, "node", k, "stall_ms") for k in
                          ("idle", "throughput", "storm", "fanout_one_app", "fanout_many_apps")) if v is not None]
    worst = max(stalls) if stalls else None
    out.append(("no event-loop stall > 50 ms", f"worst {_num(worst, 1)} ms (ping probe)",
                None if worst is None else worst <= 50))
    rate = _get(results, "node", "idle", "devices", "rate")
    apps = _get(results, "node", "idle", "apps", "rate")
    out.append(("≥ 3,000 handshakes/s", f"devices {_num(rate)}/s (with assertion), applications {_num(apps)}/s",
                None if rate is None else rate >= 3000))
    del node
    return out


def targets_table(results: dict) -> str:
    rows = [[t, m, "—" if ok is None else ("met" if ok else "MISSED")] for t, m, ok in targets(results)]
    return markdown(["target (issue 8)", "measured", ""], rows)


def render(results: dict) -> str:
    meta = results["meta"]
    parts = [
        f"Presence benchmark — N = {meta['connections']:,} connections, {meta['generators']} generators, "
        f"{meta['nproc']} cores, Python {meta['python']}, Twisted {meta['twisted']}, Autobahn {meta['autobahn']}",
        "",
        comparison_table(results),
        "",
        "ratio = node / reference: for times, memory and stalls lower is better; for rates higher is better.",
        "Stalls are measured from outside: the longest round trip of a websocket ping sent every 5 ms by a",
        "separate probe process (an upper bound of the server's worst event-loop stall).",
        "",
        "Throughput ramp (devices -> node -> applications, end-to-end latency):",
        "",
        ramp_table(results),
        "",
        targets_table(results),
    ]
    notes = results.get("notes") or []
    if notes:
        parts += ["", "Notes:", *[f"- {note}" for note in notes]]
    return "\n".join(parts)
