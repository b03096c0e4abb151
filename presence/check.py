"""``presence-admin check``: validate a node's configuration and its store before starting it.

Takes the same options as ``twistd presence`` (or, with ``--env``, the PRESENCE_* variables of
presence.tac) and prints one line per check: ``OK``, ``WARNING`` (works, but probably not what
production wants) or ``PROBLEM`` (the node would fail or misbehave), each problem and warning with
the fix on the next line. Nothing is bound and nothing is written: endpoints are parsed against a
memory reactor, a SQLite file is opened read-only (and not created), the schema is not upgraded.
Exit status 0 when there is no problem (and, with ``--strict``, no warning), 1 otherwise.
"""

from __future__ import annotations

import datetime
import os
import socket
import sqlite3
import sys
from dataclasses import dataclass
from typing import IO, Any, Mapping, Sequence
from urllib.parse import urlsplit

from twisted.python import usage

from presence.config import Config
from presence.public_urls import is_loopback, unreachable

OK, WARNING, PROBLEM = "OK", "WARNING", "PROBLEM"

ENDPOINT_EXAMPLES = ("tcp:8080, tcp:8080:interface=10.0.0.5, ssl:443:privateKey=key.pem:certKey=cert.pem, "
                     "systemd:domain=INET6:name=web, unix:/run/presence/web.sock")
#: A certificate that expires sooner than this gets a warning.
RENEW_BEFORE = datetime.timedelta(days=14)


@dataclass
class Finding:
    level: str
    what: str
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.level:<8} {self.what}: {self.detail}"]
        if self.fix and self.level != OK:
            out.append(f"{'':<8} fix: {self.fix}")
        return out


# -- the configuration --------------------------------------------------------------------------------
def config_from_arguments(arguments: Sequence[str], database: str | None = None, env: Mapping[str, str] | None = None
                          ) -> Config:
    """The Config ``twistd presence <arguments>`` (or presence.tac with ``env``) would run with;
    ``database`` (presence-admin's own --database) when the arguments do not name one.
    Raises usage.UsageError."""
    from presence.tap import Options, config_from_env

    if env is not None:
        if arguments:
            raise usage.UsageError("give either --env or twistd presence options, not both")
        config = config_from_env(env)
        if database is not None and "PRESENCE_DATABASE" not in env:
            config.database = database
        return config
    options = Options()
    options.parseOptions(list(arguments))
    config = options.config()
    if database is not None and not any(a == "--database" or a.startswith("--database=") for a in arguments):
        config.database = database
    return config


def _origin_problem(url: str, schemes: tuple[str, ...], paths: bool) -> str | None:
    """Why ``url`` is not a ``scheme://host[:port]`` (with a path if ``paths``), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        return f"does not parse ({e})"
    if parts.scheme.lower() not in schemes:
        return f"the scheme is {parts.scheme or 'missing'!r}, not {' or '.join(schemes)}"
    if not parts.hostname:
        return "it names no host"
    if "@" in parts.netloc:
        return "it carries a user name or password"
    if parts.query or parts.fragment:
        return "it has a query or fragment"
    if not paths and parts.path not in ("", "/"):
        return f"it has a path ({parts.path}); an origin is scheme, host and port only"
    return None


def check_urls(config: Config) -> list[Finding]:
    found: list[Finding] = []
    page = urlsplit(config.public_url)
    why = _origin_problem(config.public_url, ("http", "https"), paths=False)
    if why:
        found.append(Finding(PROBLEM, "--public-url", f"{config.public_url!r} is not an http(s) origin: {why}",
                             "give how people reach the pages, e.g. https://presence.example.org"))
    else:
        found.append(Finding(OK, "--public-url", config.public_url))
        if page.scheme == "http" and not is_loopback(page.hostname):
            found.append(Finding(WARNING, "--public-url", "plain http on a public host: browsers only offer the "
                                 "sign-in pages' WebCrypto to https pages (and localhost)",
                                 "serve the pages over https (ssl: endpoint or a TLS-terminating load balancer)"))
    why = _origin_problem(config.public_ws_url, ("ws", "wss"), paths=True)
    if why:
        found.append(Finding(PROBLEM, "--public-ws-url", f"{config.public_ws_url!r} is not a ws(s) URL: {why}",
                             "give how the websocket listener is reached, e.g. wss://presence.example.org"))
    else:
        found.append(Finding(OK, "--public-ws-url", config.public_ws_url))
        if page.scheme == "https" and urlsplit(config.public_ws_url).scheme == "ws":
            found.append(Finding(WARNING, "--public-ws-url", "ws:// from https pages: browsers block it",
                                 "use wss:// (TLS on the websocket listener or at the load balancer)"))

    for option, problem, fix in unreachable(config):
        found.append(Finding(WARNING, option, problem, fix))
    from presence.identity.verifier import normalize_origin

    for audience in config.audiences:
        if normalize_origin(audience) is None:
            found.append(Finding(PROBLEM, "--audience", f"{audience!r} is not an http(s) or ws(s) origin",
                                 "scheme, host and port only, e.g. https://app.example.org"))
        else:
            found.append(Finding(OK, "--audience", audience))
    return found


def check_identity(config: Config) -> list[Finding]:
    from presence.identity.support import check_domain

    found: list[Finding] = []
    host = urlsplit(config.public_url).hostname
    if config.insecure_identity and not is_loopback(host):
        found.append(Finding(WARNING, "--insecure-identity", f"on, with a public URL on {host}: identity issuers "
                             "may then be fetched over plain http and on private addresses",
                             "remove --insecure-identity (it is for tests and local setups only)"))
    for issuer in config.trusted_issuers:
        try:
            check_domain(issuer, config.insecure_identity)
        except ValueError as e:
            found.append(Finding(PROBLEM, "--trusted-issuer", str(e),
                                 "a plain domain name such as login.example.org: no scheme, port, path or IP "
                                 "address"))
        else:
            found.append(Finding(OK, "--trusted-issuer", issuer))
    return found


def check_numbers(config: Config) -> list[Finding]:
    found: list[Finding] = []
    for name, value in vars(config).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            option = "--" + name.replace("_", "-")
            found.append(Finding(PROBLEM, option, f"{value:g} is negative", f"give {option} a value of 0 or more"))
    for name in ("device_rate", "device_burst", "max_message"):
        value = getattr(config, name, None)
        if value is not None and value == 0:
            option = "--" + name.replace("_", "-")
            found.append(Finding(PROBLEM, option, "0 refuses everything", f"give {option} a positive value"))
    if config.database.startswith(("postgresql:", "postgres:")) and config.node_timeout <= 2 * config.heartbeat:
        found.append(Finding(WARNING, "--node-timeout", f"{config.node_timeout:g}s is not more than two heartbeats "
                             f"({config.heartbeat:g}s each): a busy node may be taken for dead",
                             "keep --node-timeout several times --heartbeat (defaults: 30 and 5)"))
    return found


# -- endpoints ----------------------------------------------------------------------------------------
def _names_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def _certificate_findings(option: str, path: str, public: str) -> list[Finding]:
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        return [Finding(PROBLEM, option, f"cannot read the certificate {path}: {e}",
                        "certKey= must name a PEM certificate the node's user can read")]
    found: list[Finding] = []
    now = datetime.datetime.now(datetime.timezone.utc)
    ends = cert.not_valid_after_utc
    if ends <= now:
        found.append(Finding(PROBLEM, option, f"the certificate {path} expired on {ends:%Y-%m-%d}",
                             "renew it and restart the node"))
    elif cert.not_valid_before_utc > now:
        found.append(Finding(PROBLEM, option, f"the certificate {path} is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC", "check the clock, or the certificate"))
    elif ends - now < RENEW_BEFORE:
        found.append(Finding(WARNING, option, f"the certificate {path} expires on {ends:%Y-%m-%d}",
                             "renew it soon (the node reads it at start: restart after renewing)"))
    host = urlsplit(public).hostname
    if host:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = san.get_values_for_type(x509.DNSName)
            ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names, ips = [], []
        if not any(_names_match(n, host) for n in names) and host.strip("[]") not in ips:
            found.append(Finding(WARNING, option, f"the certificate is for {', '.join(names + ips) or 'no name'}, "
                                 f"not {host} (from {public}): clients that check names will refuse it",
                                 "use a certificate for the public host name, or fix the public URL"))
    return found


def check_endpoint(option: str, description: str, public: str | None = None) -> tuple[list[Finding], Any]:
    """Parse a strports description without listening; (findings, the endpoint or None)."""
    from twisted.internet.endpoints import _parse, serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        args, kwargs = _parse(description)
    except Exception as e:  # noqa: BLE001 - a description that does not even split
        args, kwargs = [], {}
        parse_error: Exception | None = e
    else:
        parse_error = None
    kind = (args[0] if args else description.split(":", 1)[0]).lower()
    if kind == "systemd" and parse_error is None:
        return _check_systemd(option, description, kwargs), None
    fix = f"write a strports description such as {ENDPOINT_EXAMPLES}"
    if parse_error is not None:
        return [Finding(PROBLEM, option, f"{description!r} does not parse: {parse_error}", fix)], None
    if kind == "ssl":
        unreadable = _ssl_files(option, kwargs)
        if unreadable:
            return unreadable, None
    try:
        endpoint = serverFromString(MemoryReactor(), description)
    except OSError as e:
        return [Finding(PROBLEM, option, f"cannot read {e.filename or 'a file it names'}: {e.strerror}",
                        "check privateKey=/certKey= (PEM files) and that the node's user can read them")], None
    except Exception as e:  # noqa: BLE001 - endpoint parsers raise anything
        if kind == "ssl":
            return [Finding(PROBLEM, option, f"the key and certificate do not load: {e or type(e).__name__}",
                            "privateKey= must be the PEM private key of the PEM certificate in certKey=")], None
        return [Finding(PROBLEM, option, f"{description!r} does not parse: {e or type(e).__name__}", fix)], None
    found = [Finding(OK, option, description)]
    if kind == "ssl" and public:
        path = kwargs.get("certKey") or kwargs.get("privateKey") or "server.pem"
        found += _certificate_findings(option, path, public)
        if urlsplit(public).scheme in ("http", "ws"):
            found.append(Finding(WARNING, option, f"serves TLS, but the public URL {public} is not https/wss",
                                 "make the public URL https:// (pages) or wss:// (websockets)"))
    if kind == "unix":
        directory = os.path.dirname(os.path.abspath(str(getattr(endpoint, "_address", args[1] if len(args) > 1 else ""))))
        if not os.path.isdir(directory):
            found.append(Finding(PROBLEM, option, f"the directory {directory} does not exist",
                                 "create it (RuntimeDirectory= under systemd) or fix the path"))
    return found, endpoint


def _ssl_files(option: str, kwargs: dict) -> list[Finding]:
    """Every file an ssl: description names that is missing or unreadable."""
    found = []
    files = {"privateKey": kwargs.get("privateKey", "server.pem")}
    files.update({name: kwargs[name] for name in ("certKey", "extraCertChain", "dhParameters") if name in kwargs})
    for name, path in files.items():
        if not os.path.isfile(path):
            found.append(Finding(PROBLEM, option, f"{name}={path}: no such file",
                                 f"fix the path of {name}= (a PEM file), or create it"))
        elif not os.access(path, os.R_OK):
            found.append(Finding(PROBLEM, option, f"{name}={path}: not readable by this user",
                                 "let the node's user read it (e.g. chgrp presence and chmod g+r), and run this "
                                 "check as that user"))
    return found


def _check_systemd(option: str, description: str, kwargs: dict) -> list[Finding]:
    fix = "systemd:domain=INET6:name=<FileDescriptorName> (or index=N), as in docs/systemd/"
    domain = kwargs.get("domain")
    if not domain or not hasattr(socket, "AF_" + domain):
        return [Finding(PROBLEM, option, f"{description!r}: domain={domain} is not an address family "
                        "(INET, INET6 or UNIX)", fix)]
    if ("index" in kwargs) == ("name" in kwargs):
        return [Finding(PROBLEM, option, f"{description!r}: give exactly one of index= and name=", fix)]
    if "index" in kwargs and not kwargs["index"].isdigit():
        return [Finding(PROBLEM, option, f"{description!r}: index={kwargs['index']} is not a number", fix)]
    which = f"named {kwargs['name']}" if "name" in kwargs else f"number {kwargs['index']}"
    return [Finding(OK, option, f"{description} (the socket {which} systemd passes; it exists only under systemd)")]


def _address(endpoint: Any) -> tuple[str, int] | None:
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and port:
        return getattr(endpoint, "_interface", "") or "", port
    return None


def check_endpoints(config: Config) -> list[Finding]:
    found: list[Finding] = []
    bound: dict[str, tuple[str, int]] = {}
    listeners = [("--web", config.web, config.public_url), ("--ws", config.ws, config.public_ws_url)]
    if getattr(config, "metrics", ""):
        listeners.append(("--metrics", config.metrics, None))
    for option, description, public in listeners:
        findings, endpoint = check_endpoint(option, description, public)
        found += findings
        address = _address(endpoint)
        if address is None:
            continue
        for other, (interface, port) in bound.items():
            if port == address[1] and (interface == address[0] or "" in (interface, address[0])):
                found.append(Finding(PROBLEM, option, f"port {port} is also {other}'s",
                                     "give each listener a port of its own"))
        bound[option] = address
    return found


# -- the store ----------------------------------------------------------------------------------------
def _schema_findings(dialect: str, version: int, where: str) -> list[Finding]:
    from presence.store.migrations import SchemaError, Scripts, schema_dir

    scripts = Scripts(schema_dir(dialect))
    latest = scripts.latest
    if version > latest:
        return [Finding(PROBLEM, "schema", f"{where} is at schema version {version}, newer than this Presence "
                        f"knows ({latest})", "run the Presence version that upgraded it (pip install --upgrade "
                        "presence), or restore a backup taken before that upgrade")]
    current = version
    try:
        while (step := scripts.next(current)) is not None:
            current = step.target
    except SchemaError as e:
        return [Finding(PROBLEM, "schema", str(e), "upgrade in steps with the Presence versions in between")]
    if version == latest:
        return [Finding(OK, "schema", f"version {version} (current)")]
    if version == 0:
        return [Finding(OK, "schema", f"none yet: the node creates version {latest} at its first start")]
    return [Finding(OK, "schema", f"version {version}: the node upgrades it to {latest} at start "
                    "(back the database up first)")]


def check_sqlite(path: str) -> list[Finding]:
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    what = "--database"
    if not os.path.exists(path):
        if not os.path.isdir(directory):
            return [Finding(PROBLEM, what, f"sqlite: the directory {directory} does not exist",
                            "create it (the node's WorkingDirectory/StateDirectory) or fix --database")]
        if not os.access(directory, os.W_OK | os.X_OK):
            return [Finding(PROBLEM, what, f"sqlite: cannot create {path}: {directory} is not writable by this user",
                            "run the node as a user that can write the directory, or fix --database")]
        return [Finding(OK, what, f"sqlite: {path} does not exist yet; the node creates it"),
                *_schema_findings("sqlite", 0, path)]
    found: list[Finding] = []
    if not os.access(path, os.R_OK | os.W_OK) or not os.access(directory, os.W_OK | os.X_OK):
        found.append(Finding(PROBLEM, what, f"sqlite: {path} (or its directory, where SQLite keeps its journal) "
                             "is not readable and writable by this user",
                             "run the node (and this check) as the user that owns the file"))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            rows = conn.execute("SELECT version FROM schema_version").fetchall() if "schema_version" in tables else []
        finally:
            conn.close()
    except sqlite3.Error as e:
        return found + [Finding(PROBLEM, what, f"sqlite: {path} cannot be read as a database: {e}",
                                "point --database at the node's Presence database (or restore it from a backup)")]
    if tables and "schema_version" not in tables:
        return found + [Finding(PROBLEM, what, f"sqlite: {path} is a database, but not a Presence one",
                                "point --database at the node's Presence database")]
    found.append(Finding(OK, what, f"sqlite: {path} opens"))
    return found + _schema_findings("sqlite", rows[0][0] if rows else 0, path)


async def check_postgres(url: str, reactor: Any, timeout: float) -> list[Finding]:
    from presence.store import StoreUnavailable
    from presence.store.postgres import PostgresStore

    what = "--database"
    try:
        store = PostgresStore(url, reactor=reactor, pool_size=1, connect_timeout=timeout)
    except ValueError as e:
        return [Finding(PROBLEM, what, str(e), "postgresql://user:password@host:port/database")]
    try:
        await store._connect()
        found = [Finding(OK, what, f"postgresql: {store.where} answers")]
        rows = await store._query("SELECT to_regclass('schema_version') IS NOT NULL")
        version = 0
        if rows[0][0]:
            version = (await store._query("SELECT version FROM schema_version") or [(0,)])[0][0]
        else:
            tables = await store._query("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()")
            if tables[0][0]:
                return found + [Finding(PROBLEM, what, f"{store.where} has tables, but is not a Presence database",
                                        "point --database at an empty database or the cluster's Presence database")]
        return found + _schema_findings("postgres", version, store.where)
    except StoreUnavailable as e:
        return [Finding(PROBLEM, what, f"database unreachable: {e}",
                        "check --database (host, port, database, user, password) and that the server runs "
                        "and accepts connections from this machine")]
    finally:
        await store.close()


async def check_store(config: Config, reactor: Any, timeout: float = 10.0) -> list[Finding]:
    url = config.database
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path == ":memory:" or path.startswith("file:"):
            return [Finding(WARNING, "--database", f"{url}: not a file the node keeps",
                            "use sqlite:PATH (a file) or postgresql://...")]
        return check_sqlite(path)
    if url.startswith(("postgresql://", "postgres://")):
        return await check_postgres(url, reactor, timeout)
    return [Finding(PROBLEM, "--database", f"{url!r} is neither sqlite: nor postgresql://",
                    "--database sqlite:PATH or postgresql://user:password@host:port/database")]


# -- all of it ----------------------------------------------------------------------------------------
async def check(config: Config, reactor: Any, timeout: float = 10.0) -> list[Finding]:
    return [*check_endpoints(config), *check_urls(config), *check_identity(config), *check_numbers(config),
            *await check_store(config, reactor, timeout)]


def report(findings: list[Finding], out: IO[str] = sys.stdout, strict: bool = False) -> int:
    for finding in findings:
        for line in finding.lines():
            print(line, file=out)
    problems = sum(f.level == PROBLEM for f in findings)
    warnings = sum(f.level == WARNING for f in findings)
    if problems or warnings:
        print(f"{problems} problem{'s' * (problems != 1)}, {warnings} warning{'s' * (warnings != 1)}", file=out)
    else:
        print("all OK", file=out)
    return 1 if problems or (strict and warnings) else 0


async def run(arguments: Sequence[str], database: str | None, reactor: Any, *, env: bool = False,
              strict: bool = False, timeout: float = 10.0, out: IO[str] = sys.stdout) -> int:
    """presence-admin check: returns the exit status."""
    try:
        config = config_from_arguments(arguments, database, os.environ if env else None)
    except usage.UsageError as e:
        return report([Finding(PROBLEM, "options", str(e), "see twistd presence --help")], out)
    return report(await check(config, reactor, timeout), out, strict)
