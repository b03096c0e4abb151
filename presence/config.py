"""One configuration object shared by the twistd plugin, presence.tac and presence-admin."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass
class Config:
    # Listeners (twisted strports endpoint descriptions).
    web: str = "tcp:8080"
    ws: str = "tcp:8081"
    metrics: str = ""          # off unless given
    # How this node is reached from outside; used for entry points and assertion audiences.
    public_url: str = "http://localhost:8080"
    public_ws_url: str = "ws://localhost:8081"
    node: str = field(default_factory=socket.gethostname)
    database: str = "sqlite:presence.sqlite"

    # Identity.
    trusted_issuers: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=list)
    insecure_identity: bool = False
    support_cache_ttl: float = 3600.0
    support_timeout: float = 10.0
    # Assertions: the furthest in the future their expiry may lie (and the clocks' allowance).
    max_assertion_lifetime: float = 600.0
    max_certificate_lifetime: float = 86400.0
    clock_skew: float = 120.0

    # Outbound fetches (Verify, support documents): presence/fetch.py.
    fetch_max_head: int = 16 * 1024
    fetch_max_header_lines: int = 100

    # Request bodies of the HTTP listeners (POSTs), in bytes: larger ones get 413 before they are read.
    max_body: int = 1024 * 1024

    # Devices.
    grace: float = 10.0
    drain_time: float = 0.0
    device_rate: float = 5.0
    device_burst: int = 10

    # Applications.
    auth_timeout: float = 10.0
    batch_window: float = 0.01
    pending_ttl: float = 3600.0
    slow_limit: int = 10_000
    slow_timeout: float = 30.0

    # Live notifications.
    notify_queue: int = 100
    notify_ttl: float = 300.0
    notify_rate: float = 1000.0
    notify_burst: int = 2000
    notify_batch: int = 100

    # Several nodes on one database.
    heartbeat: float = 5.0
    node_timeout: float = 30.0
    log_retention: float = 600.0

    # Garbage collection (full collections stop the node while they run).
    gc_freeze: float = 30.0
    gc_compact: float = 3600.0

    # Websocket hygiene.
    max_message: int = 64 * 1024
    max_auth_message: int = 32 * 1024   # before authentication: a connect with 1000 application ids fits
    max_fragments: int = 1024
    max_output: int = 8 * 1024 * 1024
    handshake_timeout: float = 10.0
    ping_interval: float = 30.0

    # Logs: also write every log event as a JSON line to this file ("-": standard output).
    log_json: str = ""
    log_connections: bool = False

    # The web pages: sessions, Presence's own identity provider, domain verification.
    session_secret_file: str = ""     # empty: a secret kept in the database, shared by every node
    session_lifetime: float = 86400.0
    identity_key_file: str = ""       # empty: a key made once and kept in the database
    secrets_key_file: str = ""        # empty: <the SQLite file>.key, or presence-secrets.key (PostgreSQL)
    login_link_lifetime: float = 900.0
    login_links_per_client: int = 10     # one-time links one client address may ask for per link lifetime
    login_links_total: int = 300         # one-time links this node sends per link lifetime, all clients
    pair_code_lifetime: float = 600.0    # a device's pairing codes (RFC 8628 device authorization)
    pair_interval: float = 5.0           # seconds a pairing device waits between polls
    pairs_per_client: int = 10           # pairing codes one client address may ask for per code lifetime
    paired_certificate_lifetime: float = 30 * 86400.0   # a paired device's certificate (renewable)
    client_address_header: str = ""      # e.g. X-Forwarded-For behind a balancer (its last value is used)
    smtp_host: str = ""               # empty: one-time links are written to the node's log
    smtp_port: int = 25
    smtp_from: str = ""
    verify_poll: float = 3600.0
    verify_timeout: float = 10.0
    verify_allow_private: bool = False

    def accepted_audiences(self) -> list[str]:
        """Origins a device's assertion may be addressed to."""
        return [self.public_url, *self.audiences]
