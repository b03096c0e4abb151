"""presence-admin check: one line per check, the fix for each problem, exit status 1 on a problem."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys

import pytest_twisted
from twisted.internet import reactor

from presence import check
from presence.store import open_store
from tests.test_tls import self_signed
from tests.test_twistd import free_port


def cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "presence.admin", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


async def run(*arguments: str, database: str | None = None, **kw) -> tuple[int, str]:
    out = io.StringIO()
    status = await check.run(list(arguments), database, reactor, out=out, **kw)
    return status, out.getvalue()


def line(output: str, start: str) -> str:
    """The first line starting with ``start``, and its fix line if it has one."""
    lines = output.splitlines()
    for i, text in enumerate(lines):
        if text.startswith(start):
            fix = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].lstrip().startswith("fix:") else ""
            return text + "\n" + fix
    raise AssertionError(f"no line starting with {start!r} in:\n{output}")


def test_the_defaults_in_an_empty_directory_are_all_ok(tmp_path):
    out = cli("check", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "all OK"
    for start in ("OK       --web: tcp:8080", "OK       --ws: tcp:8081", "OK       --public-url: http://localhost:8080",
                  f"OK       --database: sqlite: {tmp_path / 'presence.sqlite'} does not exist yet"):
        line(out.stdout, start)
    assert not (tmp_path / "presence.sqlite").exists()  # nothing is created


def test_problems_exit_1_with_their_fixes(tmp_path):
    out = cli("--database", f"sqlite:{tmp_path / 'p.sqlite'}", "check",
              "--web", "ssl:8443:privateKey=/nonexistent/key.pem:certKey=/nonexistent/cert.pem",
              "--ws", "tcpp:8081", "--public-url", "https://presence.example.org/pages",
              "--public-ws-url", "presence.example.org", "--trusted-issuer", "https://login.example.org",
              "--trusted-issuer", "login.example.org", "--grace", "-1")
    assert out.returncode == 1
    assert "privateKey=/nonexistent/key.pem: no such file" in line(out.stdout, "PROBLEM  --web: privateKey")
    assert "fix: fix the path of certKey=" in line(out.stdout, "PROBLEM  --web: certKey=/nonexistent/cert.pem")
    ws = line(out.stdout, "PROBLEM  --ws")
    assert "Unknown endpoint type" in ws and "fix: write a strports description such as tcp:8080" in ws
    assert "has a path" in line(out.stdout, "PROBLEM  --public-url")
    assert "not ws or wss" in line(out.stdout, "PROBLEM  --public-ws-url")
    assert "fix: a plain domain name" in line(out.stdout, "PROBLEM  --trusted-issuer")
    line(out.stdout, "OK       --trusted-issuer: login.example.org")
    assert "fix: give --grace a value of 0 or more" in line(out.stdout, "PROBLEM  --grace")
    assert out.stdout.splitlines()[-1] == "7 problems, 0 warnings"


def test_bad_options_and_other_commands_refusing_extra_arguments():
    out = cli("check", "--grace", "soon")
    assert out.returncode == 1 and "--grace needs a float" in line(out.stdout, "PROBLEM  options")
    assert cli("apps", "list", "--web", "tcp:1").returncode == 2  # only check takes the plugin's options


@pytest_twisted.ensureDeferred
async def test_insecure_identity_is_a_warning_off_loopback_and_strict_makes_it_fail(tmp_path):
    db = f"sqlite:{tmp_path / 'p.sqlite'}"
    status, out = await run("--insecure-identity", "--trusted-issuer", "127.0.0.1:5000", database=db)
    assert status == 0 and "WARNING" not in out  # a local setup: fine, and host:port issuers are allowed
    args = ("--insecure-identity", "--public-url", "https://presence.example.org",
            "--public-ws-url", "wss://presence.example.org")
    status, out = await run(*args, database=db)
    assert status == 0 and "fix: remove --insecure-identity" in line(out, "WARNING  --insecure-identity")
    assert out.splitlines()[-1] == "0 problems, 1 warning"
    status, _ = await run(*args, database=db, strict=True)
    assert status == 1
    status, out = await run("--public-url", "https://presence.example.org", database=db)
    assert "browsers block it" in line(out, "WARNING  --public-ws-url")  # ws:// from https pages


@pytest_twisted.ensureDeferred
async def test_ssl_endpoints_are_read_and_checked_against_the_public_urls(tmp_path):
    key, cert = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_key, _ = self_signed(other)
    db = f"sqlite:{tmp_path / 'p.sqlite'}"
    good = f"ssl:8443:privateKey={key}:certKey={cert}"
    status, out = await run("--web", good, "--ws", good.replace("8443", "8444"), "--public-url",
                            "https://localhost:8443", "--public-ws-url", "wss://localhost:8444", database=db)
    assert status == 0, out
    line(out, f"OK       --web: {good}")
    # the throwaway certificate lives a day: time to renew
    assert "expires on" in line(out, "WARNING  --web") and "fix: renew it soon" in line(out, "WARNING  --web")
    status, out = await run("--web", good, "--public-url", "https://presence.example.org", database=db)
    assert "not presence.example.org" in out and "clients that check names will refuse it" in out
    status, out = await run("--web", f"ssl:8443:privateKey={other_key}:certKey={cert}", database=db)
    assert status == 1 and "do not load" in line(out, "PROBLEM  --web")
    status, out = await run("--web", good, "--public-url", "http://presence.example.org:8443", database=db)  # TLS, but http
    assert "is not https/wss" in out


@pytest_twisted.ensureDeferred
async def test_systemd_endpoints_and_port_conflicts(tmp_path):
    db = f"sqlite:{tmp_path / 'p.sqlite'}"
    status, out = await run("--web", "systemd:domain=INET6:name=web", "--ws", "systemd:domain=INET:index=1",
                            database=db)
    assert status == 0, out
    assert "the socket named web systemd passes" in line(out, "OK       --web")
    status, out = await run("--web", "systemd:domain=INET", "--ws", "systemd:domain=INETX:index=0", database=db)
    assert "exactly one of index= and name=" in line(out, "PROBLEM  --web")
    assert "not an address family" in line(out, "PROBLEM  --ws")
    port = free_port()
    status, out = await run("--web", f"tcp:{port}", "--ws", f"tcp:{port}:interface=127.0.0.1", database=db)
    assert status == 1 and f"port {port} is also --web's" in line(out, "PROBLEM  --ws")


@pytest_twisted.ensureDeferred
async def test_sqlite_store_states(tmp_path):
    path = tmp_path / "presence.sqlite"
    store = open_store(f"sqlite:{path}")
    await store.open()
    await store.close()
    status, out = await run(database=f"sqlite:{path}")
    assert status == 0 and "(current)" in line(out, "OK       schema")

    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 999")
    conn.close()
    status, out = await run(database=f"sqlite:{path}")
    newer = line(out, "PROBLEM  schema")
    assert status == 1 and "schema version 999, newer than this Presence knows" in newer
    assert "fix: run the Presence version that upgraded it" in newer

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE things (x)")
    conn.close()
    status, out = await run(database=f"sqlite:{other}")
    assert status == 1 and "not a Presence one" in line(out, "PROBLEM  --database")

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    status, out = await run(database=f"sqlite:{garbage}")
    assert status == 1 and "cannot be read as a database" in line(out, "PROBLEM  --database")

    status, out = await run(database=f"sqlite:{tmp_path / 'missing' / 'p.sqlite'}")
    assert status == 1 and "does not exist" in line(out, "PROBLEM  --database")
    status, out = await run(database="mysql://db/presence")
    assert status == 1 and "fix: --database sqlite:PATH or postgresql://" in line(out, "PROBLEM  --database")


@pytest_twisted.ensureDeferred
async def test_postgresql_reachable_and_unreachable(postgres_url):
    status, out = await run(database=postgres_url)
    assert status == 0, out
    assert "answers" in line(out, "OK       --database: postgresql:")
    assert "none yet" in line(out, "OK       schema")
    store = open_store(postgres_url)
    await store.open()
    await store.close()
    status, out = await run("--database", postgres_url)  # as a plugin option this time
    assert "(current)" in line(out, "OK       schema")
    assert "password" not in out

    down = f"postgresql://presence:s3cret@127.0.0.1:{free_port()}/presence"
    status, out = await run(database=down, timeout=3)
    unreachable = line(out, "PROBLEM  --database")
    assert status == 1 and "database unreachable" in unreachable
    assert "fix: check --database" in unreachable and "the server runs" in unreachable
    assert "s3cret" not in out


def test_env_reads_presence_variables_like_presence_tac(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PRESENCE_DATABASE": f"sqlite:{tmp_path / 'env.sqlite'}",
           "PRESENCE_WS": "tcp:9999", "PRESENCE_TRUSTED_ISSUERS": "login.example.org,https://bad"}
    out = cli("check", "--env", env=env)
    assert out.returncode == 1
    line(out.stdout, "OK       --ws: tcp:9999")
    line(out.stdout, f"OK       --database: sqlite: {tmp_path / 'env.sqlite'}")
    line(out.stdout, "PROBLEM  --trusted-issuer: 'https://bad' is not a domain")
    out = cli("check", "--env", "--grace", "1", env=env)
    assert out.returncode == 1 and "not both" in out.stdout
