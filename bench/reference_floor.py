"""The raw floor: a bare non-blocking socket server (one epoll loop, no framework) that completes a
minimal websocket handshake and, on a trigger, sends one small frame to every connection in a loop.
It is what any Python websocket server must at least spend; the node is compared with it.

    python -m bench.reference_floor --port PORT [--host 127.0.0.1] [--backlog 4096]

Paths: /trigger — each message received is sent to every subscriber; /probe — pings are answered
with pongs (the stall probe); anything else is a subscriber, answered {"result":"OK"} for every
read (so a client's first message, its "authentication", gets an answer as from the node).
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time

from bench import common
from bench.wsclient import CLOSE, PING, PONG, TEXT, accept_key, parse, server_frame

OK = server_frame(b'{"result":"OK"}')


class Client:
    __slots__ = ("sock", "kind", "buf")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.kind = ""      # "" while in the handshake, then "sub", "trigger" or "probe"
        self.buf = b""


def handshake_answer(head: bytes) -> tuple[str, bytes] | None:
    lines = head.split(b"\r\n")
    try:
        path = lines[0].split(b" ")[1].decode("latin-1")
    except IndexError:
        return None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            accept = accept_key(value.strip())
            return path, (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    return None


def serve(host: str, port: int, backlog: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    listener.setblocking(False)
    sel = selectors.EpollSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    subs: dict[int, socket.socket] = {}
    print("listening", flush=True)

    def drop(client: Client) -> None:
        sel.unregister(client.sock)
        subs.pop(client.sock.fileno(), None)
        client.sock.close()

    def send(client: Client, data: bytes) -> bool:
        """One non-blocking send (the frames are small); a peer that is gone is dropped."""
        try:
            client.sock.send(data)
            return True
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            drop(client)
            return False

    while True:
        for key, _ in sel.select(1.0):
            client = key.data
            if client is None:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # out of files: the bench caps N below the limit
                    sock.setblocking(False)
                    sel.register(sock, selectors.EVENT_READ, Client(sock))
                continue
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                drop(client)
                continue
            if client.kind == "sub":
                send(client, OK)
                continue
            client.buf += data
            if not client.kind:
                end = client.buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                answer = handshake_answer(client.buf[:end])
                if answer is None:
                    drop(client)
                    continue
                path, reply = answer
                client.buf = client.buf[end + 4:]
                if not send(client, reply):
                    continue
                client.kind = {"/trigger": "trigger", "/probe": "probe"}.get(path, "sub")
                if client.kind == "sub":
                    subs[client.sock.fileno()] = client.sock
                    if client.buf:
                        client.buf = b""
                        send(client, OK)
                    continue
            frames, client.buf = parse(client.buf)
            for opcode, payload in frames:
                if opcode == CLOSE:
                    drop(client)
                    break
                if client.kind == "probe" and opcode == PING:
                    if not send(client, server_frame(payload, PONG)):
                        break
                elif client.kind == "trigger" and opcode == TEXT:
                    out = server_frame(payload)
                    t0 = time.monotonic()
                    for sock in subs.values():  # the floor: one send per connection, nothing else
                        try:
                            sock.send(out)
                        except OSError:
                            pass
                    print(f"broadcast to {len(subs)} in {(time.monotonic() - t0) * 1000:.1f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--lifetime", type=float, default=3 * 3600)
    args = p.parse_args(argv)
    common.raise_nofile()
    common.die_with_parent()
    common.lifetime_guard(args.lifetime)
    try:
        serve(args.host, args.port, args.backlog)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
