"""A Presence device, from signing in to a status: the standard library and the presence package only.

    python docs/examples/device.py alice@example.com http://localhost:18480 ws://localhost:18481

1. asks the node for a one-time sign-in link for the address (a node without --smtp-host writes the
   link to its log: "one-time sign-in link for alice@example.com ...: http://.../login/link#...");
2. reads the link you paste, makes a key pair and has Presence certify it for the address;
3. signs an assertion for the node's public URL (the audience devices name), connects to
   <websocket URL>/presence and reports "online".

A real device keeps the key and the certificate (valid a day) and signs a fresh assertion (valid two
minutes) for each connection; it asks for a new link only when the certificate has expired.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from urllib.parse import urlsplit

from presence.identity import jws, make_assertion, new_user_key


class Pages:
    """The node's pages as a browser sees them: cookies, and the CSRF token every POST carries."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.http = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        page = self.http.open(self.url + "/login").read().decode()
        self.csrf = re.search(r'<meta name="csrf-token" content="([^"]*)"', page).group(1)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"content-type": "application/json", "x-csrf-token": self.csrf})
        try:
            with self.http.open(request) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            sys.exit(f"{path}: {json.load(e).get('error', e)}")


class WebSocket:
    """Just enough of RFC 6455 for this example: JSON text messages, answering pings."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        self.sock = socket.create_connection((parts.hostname, parts.port or (443 if secure else 80)), timeout=10)
        if secure:
            self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=parts.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit(f"{url}: {head.decode(errors='replace').splitlines()[0]}")

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the node closed the connection")
        return data

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, message: dict | bytes, opcode: int = 1) -> None:
        payload = json.dumps(message).encode() if opcode == 1 else message
        n, mask = len(payload), os.urandom(4)   # a client masks every frame
        length = bytes([0x80 | n]) if n < 126 else struct.pack("!BH", 0x80 | 126, n) if n < 65536 else \
            struct.pack("!BQ", 0x80 | 127, n)
        self.sock.sendall(bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> dict:
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload, opcode = self._read(n), b0 & 0x0F
            if opcode == 1:
                return json.loads(payload)
            if opcode == 9:
                self.send(payload, 10)   # ping: pong
            elif opcode == 8:
                raise ConnectionError(f"closed by the node: {payload[2:].decode(errors='replace')}")

    def close(self) -> None:
        self.send(struct.pack("!H", 1000), 8)
        self.sock.close()


def main(email: str, pages_url: str = "http://localhost:8080", ws_url: str = "ws://localhost:8081") -> None:
    # 1. a one-time link proves the address
    pages = Pages(pages_url)
    sent = pages.post("/login/start", {"email": email})
    where = "your mail" if sent["via"] == "mail" else "the node's log"
    print(f"A one-time sign-in link for {sent['email']} is in {where}; paste it here:", flush=True)
    token = urlsplit(sys.stdin.readline().strip()).fragment

    # 2. Presence certifies a key this device made (in the BrowserID form: {"algorithm": "RS", ...})
    key = new_user_key()
    certified = pages.post("/login/certify", {"token": token,
                                              "publicKey": jws.public_key_to_json(key.public_key(), "browserid")})
    print(f"certified a key for {certified['email']}", flush=True)

    # 3. an assertion for the node's public URL, then connect and report a status
    assertion = make_assertion(certified["certificate"], key, pages.url, time.time())
    device = WebSocket(ws_url.rstrip("/") + "/presence")
    device.send({"type": "connect", "assertion": assertion, "device": "example"})
    print("connect:", json.dumps(device.receive()), flush=True)
    device.send({"type": "status", "status": "online"})
    print("status:", json.dumps(device.receive()), flush=True)
    device.close()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:4])
