"""The benchmark's command line.

    python -m bench run --connections 19000      # the full run (a few minutes)
    python -m bench run --quick                  # 300 connections, short steps (under a minute)
    python -m bench top PROFILE.txt              # hot spots of a py-spy profile (--profile DIR)
    python -m bench cross-node --rate 200,500,1000,2000 --seconds 10   # 3 nodes on PostgreSQL (issue 4)
    python -m bench notify --devices 10000       # live notifications on one node (issue 7)
    python -m bench cluster-hold --connections 45000 --nodes 3   # N connections on K nodes (issue 8)
    python -m bench chaos --seconds 600 --seed 42  # fault injection and the invariants (issue 13)
    python -m bench hostile --seconds 10 --out hostile.json  # each attack of issue 14, a healthy client beside it
    python -m bench sync --grants 100000     # an application with 100,000 grants asks for the state (issue 15)

See bench/__init__.py and docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from bench import common

FULL_RAMP = [500, 1000, 1500, 2000, 2500, 3000, 4000, 5000, 7500, 10000, 12500, 15000, 20000, 25000, 30000]
QUICK_RAMP = [100, 200, 400]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark a Presence node against two references.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run every scenario against the node, an Autobahn reference and the raw floor")
    r.add_argument("--connections", "-n", type=int, default=None,
                   help=f"N: connections held at once (default 19000, at most {common.MAX_PER_NODE} per node)")
    r.add_argument("--quick", action="store_true",
                   help="a small run: 300 connections, short ramp and steps, 2 s grace (the smoke test's run)")
    r.add_argument("--generators", "-g", type=int, default=3, help="load-generator processes (default 3)")
    r.add_argument("--ramp", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="throughput steps, status changes/s, comma-separated (default up to 30000; '' skips it)")
    r.add_argument("--step-seconds", type=float, default=None, help="length of a throughput step (default 5)")
    r.add_argument("--drain", type=float, default=3.0, help="seconds a step waits for its last deliveries")
    r.add_argument("--max-p50", type=float, default=200.0,
                   help="a step is sustained while the median latency, overall and over the step's last fifth, "
                        "stays at most this many ms (and 95%% of the rate is sent, 99.5%% delivered, no errors)")
    r.add_argument("--rounds", type=int, default=None, help="fan-out rounds per shape (default 3; median reported)")
    r.add_argument("--fanout-timeout", type=float, default=60.0)
    r.add_argument("--grace", type=float, default=None, help="the node's --grace (default 10, its own default)")
    r.add_argument("--ping-interval", type=float, default=0.0,
                   help="the node's --ping-interval (default 0: no pings, like the references)")
    r.add_argument("--node-arg", dest="node_args", action="append", default=[],
                   help="one more argument for `twistd presence`, e.g. --node-arg=--batch-window=0.01 (repeatable)")
    r.add_argument("--backlog", type=int, default=4096, help="listen backlog of the node and the references")
    r.add_argument("--inflight", type=int, default=256, help="handshakes in flight per generator")
    r.add_argument("--presence-src", default=str(common.ROOT),
                   help="the presence sources the node runs from (default: this checkout)")
    r.add_argument("--presence-rev", default=None,
                   help="run the node from a clean export of this git revision of the checkout (e.g. HEAD), "
                        "unaffected by uncommitted changes")
    r.add_argument("--no-references", dest="references", action="store_false", help="skip the two references")
    r.add_argument("--profile", type=Path, default=None,
                   help="record the node with py-spy during each scenario into DIR/<scenario>.txt (py-spy must be "
                        "installed: pip install py-spy); read them with `python -m bench top`")
    r.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait (up to SECONDS) until other processes use under 10%% of a core")
    r.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    r.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    r.add_argument("--run-dir", default=None, help="keep logs, store and configs here (default: a temporary directory)")
    r.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    r.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
    rates = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    def shared(q: argparse.ArgumentParser, quick: str) -> None:
        q.add_argument("--quick", action="store_true", help=quick)
        q.add_argument("--seconds", type=float, default=None, help="length of each rate's step (default 10)")
        q.add_argument("--drain", type=float, default=5.0, help="seconds a step waits for its last deliveries")
        q.add_argument("--generators", "-g", type=int, default=2, help="load-generator processes (default 2)")
        q.add_argument("--max-p50", type=float, default=200.0,
                       help="a step keeps up while its median latency stays at most this many ms")
        q.add_argument("--grace", type=float, default=10.0, help="the nodes' --grace")
        q.add_argument("--profile", type=Path, default=None, help="record the node(s) with py-spy into DIR")
        common.add_cluster_options(q)

    x = sub.add_parser("cross-node", help="latency from devices on node A to an application on node B (3 nodes, "
                                          "one PostgreSQL)")
    shared(x, "a small run: 60 devices, 100 and 200 changes/s for 2 s each (the smoke test's run)")
    x.add_argument("--rate", type=rates, default=None,
                   help="status changes/s sent by the devices on A, comma-separated (default 200,500,1000,2000)")
    x.add_argument("--devices", type=int, default=None, help="devices on node A (default 2000)")
    x.add_argument("--heartbeat", type=float, default=1.0, help="the nodes' --heartbeat (default 1)")
    x.add_argument("--no-observer-c", dest="observer_c", action="store_false",
                   help="no second application connection on node C")
    y = sub.add_parser("notify", help="live notifications: an application posts, devices on one node receive")
    shared(y, "a small run: 200 devices, 500 and 1,000 notifications/s for 2 s each (the smoke test's run)")
    y.add_argument("--rate", type=rates, default=None,
                   help="notifications/s posted, comma-separated (default 2500,5000,10000,15000)")
    y.add_argument("--devices", type=int, default=None, help="devices connected, one person each (default 10000)")
    y.add_argument("--via", choices=("http", "ws"), default="http",
                   help="post over HTTP (POST /<appid>/notification, default) or the application's websocket")
    y.add_argument("--batch", type=int, default=100, help="items per request (the node's limit is 100)")
    y.add_argument("--poster-connections", type=int, default=8,
                   help="the application's connections, one request in flight on each (default 8)")
    y.add_argument("--no-ack", dest="ack", action="store_false", help="devices do not acknowledge what they get")
    y.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                   help="the node's store: SQLite (default, as `bench run`) or a fresh PostgreSQL database")
    y.add_argument("--notify-rate", type=float, default=1_000_000,
                   help="the node's --notify-rate (default 1000000: the rate limit is not what is measured)")
    y.add_argument("--notify-burst", type=int, default=1_000_000, help="the node's --notify-burst")
    from bench.cluster_hold import add_parser as cluster_hold_parser

    cluster_hold_parser(sub)
    from bench.chaos import add_parser as chaos_parser

    chaos_parser(sub)
    from bench.hostile import add_parser as hostile_parser

    hostile_parser(sub)
    from bench.sync import add_parser as sync_parser

    sync_parser(sub)
    t = sub.add_parser("top", help="the hot spots of a py-spy raw profile")
    t.add_argument("profile", type=Path)
    t.add_argument("--limit", type=int, default=25)
    return p


def settle(o: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick and enforce the per-node cap."""
    o.connections = o.connections or (300 if o.quick else common.MAX_PER_NODE)
    if o.connections > common.MAX_PER_NODE:
        print(f"N capped at {common.MAX_PER_NODE:,}: one node process holds at most ~19,000 connections "
              "(20,000 open files); more needs several nodes", file=sys.stderr)
        o.connections = common.MAX_PER_NODE
    if o.connections < 2 * o.generators:
        sys.exit("--connections must be at least twice --generators")
    o.ramp = o.ramp if o.ramp is not None else (QUICK_RAMP if o.quick else FULL_RAMP)
    o.step_seconds = o.step_seconds or (1.5 if o.quick else 5.0)
    o.drain = min(o.drain, 1.5) if o.quick else o.drain
    o.rounds = o.rounds or (2 if o.quick else 3)
    o.grace = o.grace if o.grace is not None else (2.0 if o.quick else 10.0)
    o.timeout = o.timeout or (300 if o.quick else 3600)
    if o.profile:
        o.profile.mkdir(parents=True, exist_ok=True)
    return o


def settle_other(o: argparse.Namespace) -> argparse.Namespace:
    """Defaults of cross-node and notify, which depend on --quick."""
    if o.command == "cross-node":
        o.rate = o.rate if o.rate is not None else ([100, 200] if o.quick else [200, 500, 1000, 2000])
        o.devices = o.devices or (60 if o.quick else 2000)
    else:
        o.rate = o.rate if o.rate is not None else ([500, 1000] if o.quick else [2500, 5000, 10000, 15000])
        o.devices = o.devices or (200 if o.quick else 10000)
        if o.devices > common.MAX_PER_NODE:
            sys.exit(f"--devices: one node holds at most {common.MAX_PER_NODE:,} connections")
    if o.devices < 2 * o.generators:
        sys.exit("--devices must be at least twice --generators")
    o.seconds = o.seconds or (2.0 if o.quick else 10.0)
    o.drain = min(o.drain, 3.0) if o.quick else o.drain
    o.grace = min(o.grace, 2.0) if o.quick else o.grace
    o.timeout = o.timeout or (240 if o.quick else 3600)
    if o.profile:
        o.profile.mkdir(parents=True, exist_ok=True)
    return o


async def _run(o: argparse.Namespace) -> dict:
    if o.command == "cross-node":
        from bench.crossnode import CrossNode as Bench
    elif o.command == "notify":
        from bench.notifications import Notify as Bench
    elif o.command == "cluster-hold":
        from bench.cluster_hold import ClusterHold as Bench
    else:
        from bench.scenarios import Bench

    bench = Bench(o)
    try:
        return await asyncio.wait_for(bench.run(), o.timeout)
    except asyncio.TimeoutError:
        sys.exit(f"the bench did not finish within {o.timeout:g}s (see --timeout); logs in {bench.run_dir}")


def main(argv: list[str] | None = None) -> None:
    o = parser().parse_args(argv)
    if o.command == "top":
        from bench.profile import top

        print(top(o.profile, o.limit))
        return
    common.raise_nofile()
    if o.command == "chaos":
        from bench.chaos import main as chaos

        chaos(o)
        return
    if o.command == "hostile":
        from bench.hostile import main as hostile

        hostile(o)
        return
    if o.command == "sync":
        from bench.sync import main as sync

        sync(o)
        return
    if o.command == "cluster-hold":
        from bench.cluster_hold import settle as settle_cluster

        o = settle_cluster(o)
    else:
        o = settle(o) if o.command == "run" else settle_other(o)
    results = asyncio.run(_run(o))
    if o.command == "cross-node":
        from bench.crossnode import render
    elif o.command == "notify":
        from bench.notifications import render
    elif o.command == "cluster-hold":
        from bench.cluster_hold import render
    else:
        from bench.report import render

    text = render(results)
    print()
    print(text)
    if o.json:
        o.json.write_text(json.dumps(results, indent=1, default=str))
    if o.markdown:
        o.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
