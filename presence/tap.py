"""``twistd presence``: the options (each with help and default) and the service they build.

presence.tac builds the same service from PRESENCE_* environment variables, from the same table.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from twisted.application.service import IServiceCollection, MultiService
from twisted.python import usage

from presence.config import Config
from presence.public_urls import with_public_urls

# (Config field, help). The option is the field with dashes; the environment variable PRESENCE_<FIELD>.
SETTINGS: list[tuple[str, str]] = [
    ("web", "strports endpoint for the web pages"),
    ("ws", "strports endpoint for the websockets (devices at /presence, applications at /<appid>)"),
    ("metrics", "strports endpoint for /metrics, /healthz and /readyz (off when empty; keep it private)"),
    ("public_url", "how people reach the web pages; also the audience devices' assertions must name (default: derived from --web, e.g. http://localhost:18480 for tcp:18480)"),
    ("public_ws_url", "how the websocket listener is reached from outside; entry points are <this>/<appid> (default: derived from --ws)"),
    ("node", "this node's name (unique among nodes sharing a database)"),
    ("database", "sqlite:PATH (embedded, default) or postgresql://user:password@host:port/database"),
    ("insecure_identity", "accept identity issuers over plain http and on loopback/IP addresses (tests and local setups only)"),
    ("support_cache_ttl", "seconds to cache an identity issuer's /.well-known/browserid document"),
    ("support_timeout", "seconds one fetch of an identity issuer's /.well-known/browserid document may take"),
    ("max_assertion_lifetime", "refuse assertions that expire more than this many seconds in the future"),
    ("max_certificate_lifetime", "refuse identity certificates that expire more than this many seconds in the future"),
    ("clock_skew", "seconds of clock difference allowed when checking the times in assertions and certificates"),
    ("fetch_max_head", "largest response head (status line and headers) an outbound fetch accepts, in bytes"),
    ("fetch_max_header_lines", "most response header lines an outbound fetch accepts"),
    ("max_body", "largest request body the HTTP listeners accept, in bytes (larger: 413 before it is read)"),
    ("grace", "seconds a dropped device keeps its status before it counts as offline"),
    ("drain_time", "seconds over which a stopping node spreads closing its device connections"),
    ("device_rate", "status messages per second a device may send (sustained)"),
    ("device_burst", "status messages a device may send in a burst"),
    ("auth_timeout", "seconds a new websocket has to authenticate (connect or key)"),
    ("batch_window", "seconds to gather status changes into one list per application"),
    ("pending_ttl", "seconds a change waits for an application that is not connected"),
    ("slow_limit", "people with undelivered changes before a slow application connection is closed"),
    ("slow_timeout", "seconds an application connection may stop reading before it is closed"),
    ("notify_queue", "live notifications kept per person and application; past it the oldest is dropped"),
    ("notify_ttl", "seconds a live notification waits for a device to acknowledge it"),
    ("notify_rate", "live notifications per second an application may send to this node (sustained)"),
    ("notify_burst", "live notifications an application may send to this node in a burst"),
    ("notify_batch", "most live notifications in one request or notify message"),
    ("heartbeat", "seconds between this node's heartbeats in the database"),
    ("node_timeout", "seconds without a heartbeat after which a node counts as dead and a survivor cleans up after it"),
    ("log_retention", "seconds the change log keeps changes for nodes that reconnect and replay, and for"
                      " applications that resume with since"),
    ("gc_freeze", "seconds between freezing long-lived objects out of garbage collection (0: only at start)"),
    ("gc_compact", "seconds between full garbage collections of frozen objects (one pause each; 0: never)"),
    ("max_message", "largest websocket message accepted, in bytes"),
    ("max_auth_message", "largest websocket message accepted before the client authenticated, in bytes"),
    ("max_fragments", "most frames one fragmented websocket message may come in (past it: close 1009)"),
    ("max_output", "bytes that may wait for a websocket peer that does not read before it is closed (4005)"),
    ("handshake_timeout", "seconds a client has to finish the websocket opening handshake"),
    ("ping_interval", "seconds between websocket pings (0: none); a peer that does not answer is dropped"),
    ("log_json", "also write the log as JSON lines (one event per line) to this file; '-' for standard output"),
    ("log_connections", "log every device and application that authenticates (off: at thousands of connects a second those lines are most of the log and a fair part of its cost; presence_handshakes_total counts them)"),
    ("session_secret_file", "file holding the secret that signs the pages' cookies (made if missing); empty: kept in the database, shared by all nodes"),
    ("session_lifetime", "seconds a sign-in to the pages lasts"),
    ("identity_key_file", "PEM private key of Presence's own identity provider (made if missing); empty: kept in the database"),
    ("secrets_key_file", "key that encrypts the secrets kept in the database (made, mode 0600, if missing); empty: <SQLite file>.key, or presence-secrets.key in the working directory with PostgreSQL; every node sharing a database needs the same one"),
    ("login_link_lifetime", "seconds a one-time sign-in link stays valid"),
    ("login_links_per_client", "one-time sign-in links one client address may ask for per --login-link-lifetime (0: no limit)"),
    ("login_links_total", "one-time sign-in links this node sends per --login-link-lifetime, all clients together (0: no limit)"),
    ("pair_code_lifetime", "seconds a device's pairing codes stay valid (the person enters the code on /me/pair within it)"),
    ("pair_interval", "seconds a pairing device waits between polls for the person's decision"),
    ("pairs_per_client", "pairing codes one client address may ask for per --pair-code-lifetime (0: no limit)"),
    ("paired_certificate_lifetime", "seconds a paired device's certificate is valid (it renews it while valid; revoking on /me ends it at once)"),
    ("client_address_header", "header holding the client's address, set by a trusted balancer in front (e.g. X-Forwarded-For; its last value is used); empty: the connection's peer"),
    ("smtp_host", "mail server that sends one-time sign-in links; empty: the links are written to the node's log"),
    ("smtp_port", "port of --smtp-host"),
    ("smtp_from", "sender address of sign-in mails (default: presence@<host of --public-url>)"),
    ("verify_poll", "seconds to keep checking an application's domain in the background after a failed Verify"),
    ("verify_timeout", "seconds one fetch of http://<domain>/__presence may take"),
    ("verify_allow_private", "let domain verification fetch private, loopback and link-local addresses (tests and local setups only)"),
]
LISTS: list[tuple[str, str, str]] = [
    ("trusted_issuers", "trusted-issuer", "an identity issuer trusted for any email address (repeatable)"),
    ("audiences", "audience", "another origin device assertions may name (repeatable)"),
]

_DEFAULTS = Config()
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_DERIVED = ("public_url", "public_ws_url")   # empty unless given: derived from the listeners


def _coerce(name: str, value: Any) -> Any:
    kind = type(getattr(_DEFAULTS, name))
    if kind is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    try:
        return kind(value)
    except ValueError:
        raise usage.UsageError(f"--{name.replace('_', '-')} needs a {kind.__name__}, not {value!r}")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Run a Presence node: devices report status, granted applications receive it live."
    optFlags = [[name.replace("_", "-"), None, text] for name, text in SETTINGS if isinstance(getattr(_DEFAULTS, name), bool)]
    optParameters = [
        [name.replace("_", "-"), None, "" if name in _DERIVED else getattr(_DEFAULTS, name), text]
        for name, text in SETTINGS
        if not isinstance(getattr(_DEFAULTS, name), bool)
    ]

    def __init__(self) -> None:
        super().__init__()
        for field, _, _ in LISTS:
            self[field] = []

    def opt_trusted_issuer(self, issuer: str) -> None:
        """an identity issuer trusted for any email address (repeatable)"""
        self["trusted_issuers"].append(issuer)

    def opt_audience(self, origin: str) -> None:
        """another origin device assertions may name (repeatable)"""
        self["audiences"].append(origin)

    def opt_version(self) -> None:
        """print the version and exit"""
        from presence import __version__

        print(f"presence {__version__}")
        raise SystemExit(0)

    def config(self) -> Config:
        values = {name: _coerce(name, self[name.replace("_", "-")]) for name, _ in SETTINGS}
        values.update({field: list(self[field]) for field, _, _ in LISTS})
        given = {name: values.pop(name) for name in _DERIVED}
        return with_public_urls(Config(**values), given["public_url"], given["public_ws_url"])


def config_from_env(env: Mapping[str, str] = os.environ) -> Config:
    """PRESENCE_<SETTING> variables (lists comma-separated), for presence.tac."""
    values: dict[str, Any] = {}
    for name, _ in SETTINGS:
        raw = env.get("PRESENCE_" + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    for field, _, _ in LISTS:
        raw = env.get("PRESENCE_" + field.upper())
        if raw:
            values[field] = [item.strip() for item in raw.split(",") if item.strip()]
    given = {name: values.pop(name, "") for name in _DERIVED}
    return with_public_urls(Config(**values), given["public_url"], given["public_ws_url"])


def makeService(options: Options | Config, reactor: Any = None) -> IServiceCollection:
    config = options if isinstance(options, Config) else options.config()
    if config.log_json:
        from presence.logs import start_json_log

        start_json_log(config.log_json)
    from presence.node import Node

    top = MultiService()
    node = Node(config, reactor=reactor)
    node.exit_on_start_failure = True
    node.setServiceParent(top)
    return top
