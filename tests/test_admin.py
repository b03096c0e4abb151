"""presence-admin: the whole application and grant flow from a shell, with a real domain check (the
pages' safe fetch: the local domain needs --allow-private)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from presence.admin import AdminError, parser, run
from presence.keys import key_matches


async def admin(database: str, *argv: str, allow_private: bool = True) -> str:
    out = io.StringIO()
    flags = ["--create", "--allow-ports"] + (["--allow-private"] if allow_private else [])
    await run(parser().parse_args(["--database", database, *flags, *argv]), reactor, out)
    return out.getvalue()


class KeyFile(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.body = b""
        self.ctype = b"text/plain"
        self.redirect = None

    def render_GET(self, request):
        if self.redirect is not None:
            request.setResponseCode(302)
            request.setHeader(b"location", self.redirect)
            return b""
        request.setHeader(b"content-type", self.ctype)
        return self.body


@pytest_twisted.async_yield_fixture
async def domain():
    """A local HTTP server standing in for an application's domain."""
    root = Resource()
    keyfile = KeyFile()
    root.putChild(b"__presence", keyfile)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield f"127.0.0.1:{port.getHost().port}", keyfile
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_register_verify_activate_grant_revoke(database_url, domain):
    host, keyfile = domain
    out = await admin(database_url, "apps", "create", "dev@example.com", host, "Chat", "--description", "A chat")
    verification_key = out.splitlines()[-1]
    assert len(verification_key) == 1024
    # the domain does not serve the key yet
    with pytest.raises(AdminError, match="does not hold"):
        await admin(database_url, "apps", "verify", "1")
    keyfile.body = verification_key.encode() + b"\n"
    keyfile.ctype = b"text/html"
    with pytest.raises(AdminError, match="text/plain"):
        await admin(database_url, "apps", "verify", "1")
    keyfile.ctype = b"text/plain; charset=utf-8"
    app_id = (await admin(database_url, "apps", "verify", "1")).split()[-1]
    api_key = (await admin(database_url, "apps", "activate", app_id)).splitlines()[-1]
    assert len(api_key) == 1024
    listing = await admin(database_url, "apps", "list")
    assert f"1\t{app_id}\tactive\t{host}\tChat\tdev@example.com" in listing
    assert api_key not in listing

    from presence.store import open_store

    store = open_store(database_url)
    await store.open()
    try:
        app = await store.get_app(app_id)
        assert key_matches(api_key, app.api_key_hash) and app.api_key_hash != api_key

        uid = (await admin(database_url, "grants", "add", "Alice@Example.com", app_id)).strip()
        assert (await admin(database_url, "grants", "list", "--app", app_id)) == f"alice@example.com\t{app_id}\t{uid}\n"
        assert (await admin(database_url, "grants", "revoke", "alice@example.com", app_id)).strip() == "revoked"
        assert await store.list_grants(app_id=app_id) == []
        with pytest.raises(AdminError, match="had not granted"):
            await admin(database_url, "grants", "revoke", "alice@example.com", app_id)

        await admin(database_url, "apps", "deactivate", app_id)
        app = await store.get_app(app_id)
        assert app.state == "verified" and app.api_key_hash is None
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_verify_refuses_a_loopback_domain_without_allow_private(sqlite_url, domain):
    host, keyfile = domain
    out = await admin(sqlite_url, "apps", "create", "dev@example.com", host, "Local", allow_private=False)
    keyfile.body = out.splitlines()[-1].encode()
    with pytest.raises(AdminError) as e:
        await admin(sqlite_url, "apps", "verify", "1", allow_private=False)
    message = str(e.value)
    assert message.startswith(f"not verified: could not fetch http://{host}/__presence")
    assert "127.0.0.1 is a loopback address; only public addresses are fetched" in message
    assert message.endswith("(for a local setup, add --allow-private)")
    assert (await admin(sqlite_url, "apps", "show", "1", allow_private=False)).split("\t")[2] == "pending"
    assert "verified: app id" in await admin(sqlite_url, "apps", "verify", "1")  # the same, allowed


@pytest_twisted.ensureDeferred
async def test_verify_follows_only_same_host_redirects_within_the_deadline(sqlite_url, domain):
    host, keyfile = domain
    await admin(sqlite_url, "apps", "create", "dev@example.com", host, "Moved")
    keyfile.redirect = b"http://elsewhere.example/__presence"
    with pytest.raises(AdminError, match="redirect may only stay on 127.0.0.1"):
        await admin(sqlite_url, "apps", "verify", "1")
    keyfile.redirect = None
    keyfile.body = b"x" * 10_000
    with pytest.raises(AdminError, match="larger than 4096 bytes"):
        await admin(sqlite_url, "apps", "verify", "1")


@pytest_twisted.ensureDeferred
async def test_clear_errors(sqlite_url):
    with pytest.raises(AdminError, match="no application"):
        await admin(sqlite_url, "apps", "activate", "7")
    with pytest.raises(AdminError, match="hostname"):
        await admin(sqlite_url, "apps", "create", "dev@example.com", "not a domain", "X")
    await admin(sqlite_url, "apps", "create", "dev@example.com", "example.com", "X")
    with pytest.raises(AdminError, match="verify"):
        await admin(sqlite_url, "apps", "activate", "1")
    with pytest.raises(AdminError, match="no verified application"):
        await admin(sqlite_url, "grants", "add", "a@example.com", "1")


def test_unreachable_database_is_a_one_line_error():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "presence.admin", "--database",
                          "postgresql://postgres@127.0.0.1:1/none", "apps", "list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.startswith("presence-admin: ") and "Traceback" not in out.stderr
    assert "--database" in out.stderr  # it says what to check


def test_a_missing_sqlite_file_is_refused_and_named_not_created(tmp_path):
    # presence-admin run from another directory than the node's: it names the file it looked for
    done = subprocess.run([sys.executable, "-m", "presence.admin", "apps", "list"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert f"presence-admin: no database at {tmp_path / 'presence.sqlite'}" in done.stderr and "--create" in done.stderr
    assert not (tmp_path / "presence.sqlite").exists()


@pytest_twisted.ensureDeferred
async def test_create_makes_the_database_when_asked(tmp_path):
    url = f"sqlite:{tmp_path / 'new.sqlite'}"
    with pytest.raises(AdminError, match="no database at"):
        await run(parser().parse_args(["--database", url, "apps", "list"]), reactor, io.StringIO())
    assert not (tmp_path / "new.sqlite").exists()
    await admin(url, "apps", "list")   # with --create
    assert (tmp_path / "new.sqlite").exists()
    assert await run(parser().parse_args(["--database", url, "apps", "list"]), reactor, io.StringIO()) is None
