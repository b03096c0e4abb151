"""The healthy client of `python -m bench hostile`: one device beside the attack.

    python -m bench.hostile_client CONFIG.json

It signs in (an assertion the bench made with the node's own identity provider's key, so no fetch
is involved), sends ten statuses to warm up, prints {"ev": "ready"}, and on "go" (stdin) sends a
status every 50 ms for `seconds`, timing each round trip to its {"result": "OK"}. Then it checks that
a fresh device can still sign in and be answered, and prints {"ev": "result", ...}. A process of its
own so that the attacker's CPU use does not delay its clock readings.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench import common

STATUS_INTERVAL = 0.05


async def healthy(config: dict) -> None:
    """Connect, sign in, then on "go" send a status every 50 ms for `seconds`; print the round trips.
    Statuses are pipelined when a reply is late (the node answers a connection's messages in order), so
    a stalled node shows as one long round trip, not as fewer samples."""
    from bench.hostile_attacks import read_message, ws_open
    from bench.wsclient import CLOSE, frame

    port = config["ws_port"]
    statuses = [frame(b'{"type":"status","status":"online"}'), frame(b'{"type":"status","status":"unavailable"}')]
    sent: list[float] = []
    rtts: list[float] = []
    notes: list[str] = []
    state = {"ok": 0, "ko": 0, "closed": ""}

    async def sign_in(device: str) -> tuple:
        reader, writer = await ws_open(port)
        writer.write(frame(json.dumps({"type": "connect", "assertion": config["assertion"],
                                       "device": device}).encode()))
        opcode, payload = await asyncio.wait_for(read_message(reader, writer), 30)
        if not payload.startswith((b'{"result":true', b'{"result":"OK"')):
            raise RuntimeError(f"the healthy device could not sign in: {payload[:300]!r}")
        return reader, writer

    async def read(reader, writer) -> None:
        while True:
            try:
                opcode, payload = await read_message(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                state["closed"] = f"connection lost: {type(e).__name__}"
                return
            if opcode == CLOSE:
                state["closed"] = f"closed {int.from_bytes(payload[:2], 'big') if len(payload) >= 2 else ''}"
                return
            if not payload.startswith(b'{"result"'):
                continue        # a notifications message, say
            if sent:
                rtts.append(1000 * (time.monotonic() - sent.pop(0)))
            state["ok" if b'"OK"' in payload else "ko"] += 1
            if b'"KO"' in payload and len(notes) < 5:
                notes.append(payload[:200].decode("utf-8", "replace"))

    reader, writer = await sign_in("healthy")
    reading = asyncio.create_task(read(reader, writer))
    for k in range(10):   # warm up: the first statuses of a device cost more (a new row)
        sent.append(time.monotonic())
        writer.write(statuses[k % 2])
        await asyncio.sleep(STATUS_INTERVAL)
    await asyncio.sleep(0.3)
    warm = list(rtts)
    rtts.clear()
    state.update(ok=0, ko=0)
    print(json.dumps({"ev": "ready", "warm_ms": [round(x, 1) for x in warm]}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    t0 = time.monotonic()
    end = t0 + config["seconds"]
    k = 0
    while time.monotonic() < end and not state["closed"]:
        sent.append(time.monotonic())
        writer.write(statuses[k % 2])
        k += 1
        await asyncio.sleep(max(0.0, t0 + k * STATUS_INTERVAL - time.monotonic()))
    waited = time.monotonic()
    while sent and time.monotonic() - waited < 5 and not state["closed"]:
        await asyncio.sleep(0.01)
    unanswered = [1000 * (time.monotonic() - s) for s in sent]   # a stall at the end counts whole
    reading.cancel()
    writer.transport.abort()
    fresh: dict = {}
    try:
        t1 = time.monotonic()
        reader2, writer2 = await asyncio.wait_for(sign_in("healthy-after"), 10)
        writer2.write(statuses[0])
        opcode, payload = await asyncio.wait_for(read_message(reader2, writer2), 10)
        fresh = {"ok": b'"OK"' in payload, "ms": round(1000 * (time.monotonic() - t1), 1)}
        writer2.transport.abort()
    except Exception as e:   # noqa: BLE001 - reported
        fresh = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    print(json.dumps({"ev": "result", "sent": k, "ok": state["ok"], "ko": state["ko"], "closed": state["closed"],
                      "rtts_ms": [round(x, 2) for x in rtts], "unanswered_ms": [round(x, 1) for x in unanswered],
                      "ko_sample": notes, "fresh": fresh}), flush=True)


if __name__ == "__main__":
    common.die_with_parent()
    common.lifetime_guard(600)
    with open(sys.argv[1]) as f:
        asyncio.run(healthy(json.load(f)))
