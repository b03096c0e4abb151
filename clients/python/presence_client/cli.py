"""`presence-device`: pair this machine once, then keep it reported.

    presence-device pair --url http://node:8080 --name "kitchen laptop" --state ~/.presence-device.json
    presence-device run --state ~/.presence-device.json --idle-after 300 --idle-command 'my-idle-seconds'

`run` reports online while it runs, unavailable once the idle command says the user has been idle
`--idle-after` seconds, and offline when it exits on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from presence_client.credentials import Credentials
from presence_client.device import PresenceDevice
from presence_client.errors import PairingError, PresenceError, Revoked
from presence_client.idle import command_hook
from presence_client.pairing import pair

EXIT_REVOKED = 3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="presence-device", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log what the client does")
    sub = p.add_subparsers(dest="command", required=True)
    paired = sub.add_parser("pair", help="pair this machine with a person's account (shows a code to enter at /me/pair)")
    paired.add_argument("--url", required=True, help="the node's web URL, e.g. http://node:8080")
    paired.add_argument("--ws", help="the node's websocket URL (default: the one the node names, its --public-ws-url)")
    paired.add_argument("--name", help="the name the person sees (default: this machine's host name)")
    paired.add_argument("--state", required=True, type=Path, help="where to keep the key and certificate (mode 0600)")
    run = sub.add_parser("run", help="keep this machine reported until SIGINT/SIGTERM")
    run.add_argument("--state", required=True, type=Path, help="the file `pair` wrote")
    run.add_argument("--idle-after", type=float, default=300.0, help="seconds idle before unavailable (default 300)")
    run.add_argument("--idle-command", help="a command printing the user's idle time in seconds")
    run.add_argument("--check-every", type=float, default=5.0, help="how often to ask the idle command (seconds)")
    return p


async def do_pair(args: argparse.Namespace) -> int:
    import socket

    name = args.name or socket.gethostname()
    credentials: Credentials = await pair(args.url, name=name, ws_url=args.ws)
    credentials.save(args.state)
    print(f"paired: {credentials.email}, device {credentials.device!r}; credentials in {args.state}", flush=True)
    return 0


async def do_run(args: argparse.Namespace) -> int:
    device = PresenceDevice.from_file(args.state, on_notification=lambda n: print(
        f"notification from {n.get('app')}: {n.get('message')}" + (f" {n['action']}" if n.get("action") else ""),
        flush=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = device.start()
    idle = None
    if args.idle_command:
        idle = loop.create_task(device.watch_idle(command_hook(args.idle_command), args.idle_after, args.check_every))
    await asyncio.wait({task, loop.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if idle is not None:
        idle.cancel()
    if task.done():
        task.result()   # raises what ended it
        return 0
    await device.close(offline=True)
    print("offline", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        return asyncio.run(do_pair(args) if args.command == "pair" else do_run(args))
    except Revoked as e:
        print(f"presence-device: {e}; pair again with `presence-device pair` if the person wants it", file=sys.stderr)
        return EXIT_REVOKED
    except (PairingError, PresenceError, OSError) as e:
        print(f"presence-device: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
