"""The pages' options (twistd, presence.tac, the operator guide) and where their shared secrets come
from: files the operator gives, or the database every node shares."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor

from presence.config import Config
from presence.identity import new_user_key
from presence.tap import SETTINGS, Options, config_from_env
from presence.web.idp import load_issuer, load_secret

WEB_OPTIONS = ["session_secret_file", "session_lifetime", "identity_key_file", "login_link_lifetime", "smtp_host",
               "smtp_port", "smtp_from", "verify_poll", "verify_timeout", "verify_allow_private"]


def test_the_pages_options_parse_and_match_the_environment():
    options = Options()
    options.parseOptions(["--session-secret-file", "/etc/presence/secret", "--session-lifetime", "3600",
                          "--identity-key-file", "/etc/presence/idp.pem", "--login-link-lifetime", "600",
                          "--smtp-host", "mail.example.org", "--smtp-port", "2525", "--smtp-from", "p@example.org",
                          "--verify-poll", "120", "--verify-timeout", "3", "--verify-allow-private"])
    config = options.config()
    assert (config.session_secret_file, config.session_lifetime, config.identity_key_file) == (
        "/etc/presence/secret", 3600.0, "/etc/presence/idp.pem")
    assert (config.login_link_lifetime, config.smtp_host, config.smtp_port, config.smtp_from) == (
        600.0, "mail.example.org", 2525, "p@example.org")
    assert (config.verify_poll, config.verify_timeout, config.verify_allow_private) == (120.0, 3.0, True)
    env = {"PRESENCE_SESSION_SECRET_FILE": "/etc/presence/secret", "PRESENCE_SESSION_LIFETIME": "3600",
           "PRESENCE_IDENTITY_KEY_FILE": "/etc/presence/idp.pem", "PRESENCE_LOGIN_LINK_LIFETIME": "600",
           "PRESENCE_SMTP_HOST": "mail.example.org", "PRESENCE_SMTP_PORT": "2525", "PRESENCE_SMTP_FROM": "p@example.org",
           "PRESENCE_VERIFY_POLL": "120", "PRESENCE_VERIFY_TIMEOUT": "3", "PRESENCE_VERIFY_ALLOW_PRIVATE": "1"}
    assert config_from_env(env) == Config(**{**config.__dict__, "node": config_from_env(env).node})


def test_the_defaults_are_safe():
    config = Config()
    assert config.smtp_host == "" and config.verify_allow_private is False
    assert config.session_secret_file == "" and config.identity_key_file == ""


def test_every_pages_option_has_help_and_is_in_the_operator_guide():
    helped = dict(SETTINGS)
    guide = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    for name in WEB_OPTIONS:
        assert helped[name], name
        assert f"`--{name.replace('_', '-')}`" in guide, name


@pytest_twisted.ensureDeferred
async def test_the_session_secret_from_a_file_made_if_missing(tmp_path, sqlite_store):
    path = tmp_path / "secret"
    config = Config(session_secret_file=str(path))
    first = await load_secret(config, sqlite_store, 1.0)
    assert len(first) == 64 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert await load_secret(config, sqlite_store, 2.0) == first
    path.write_text("short\n")
    with pytest.raises(ValueError, match="at least 32 characters"):
        await load_secret(config, sqlite_store, 3.0)


@pytest_twisted.ensureDeferred
async def test_without_a_file_every_node_gets_the_same_secret_and_key_from_the_database(sqlite_store):
    config = Config(public_url="https://presence.example.org")
    assert await load_secret(config, sqlite_store, 1.0) == await load_secret(config, sqlite_store, 2.0)
    a = await load_issuer(config, sqlite_store, reactor, 1.0)
    b = await load_issuer(config, sqlite_store, reactor, 2.0)
    assert a.domain == b.domain == "presence.example.org"
    assert a.public_key.public_numbers() == b.public_key.public_numbers()


@pytest_twisted.ensureDeferred
async def test_the_identity_key_from_a_file_made_if_missing(tmp_path, sqlite_store):
    path = tmp_path / "idp.pem"
    config = Config(identity_key_file=str(path), public_url="https://presence.example.org:8443")
    first = await load_issuer(config, sqlite_store, reactor, 1.0)
    assert first.domain == "presence.example.org:8443" and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = await load_issuer(config, sqlite_store, reactor, 2.0)
    assert again.public_key.public_numbers() == first.public_key.public_numbers()
    assert await sqlite_store._query("SELECT COUNT(*) FROM web_secrets WHERE name = 'identity_key'") == [(0,)]
    weak = new_user_key(1024).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    path.write_bytes(weak)
    with pytest.raises(ValueError, match="RSA key of at least 2048 bits"):
        await load_issuer(config, sqlite_store, reactor, 3.0)


# -- secrets at rest ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_database_keeps_the_secrets_encrypted_with_a_key_it_does_not_hold(sqlite_store):
    from presence.secrets_at_rest import PREFIX

    config = Config(public_url="https://presence.example.org")
    secret = await load_secret(config, sqlite_store, 1.0)
    issuer = await load_issuer(config, sqlite_store, reactor, 1.0)
    rows = dict(await sqlite_store._query("SELECT name, value FROM web_secrets"))
    assert set(rows) == {"session_secret", "identity_key"}
    assert all(value.startswith(PREFIX) for value in rows.values())
    assert secret.decode() not in rows["session_secret"] and "PRIVATE KEY" not in rows["identity_key"]
    key_file = sqlite_store.path + ".key"   # beside the node's state, not in it
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    again = await load_issuer(config, sqlite_store, reactor, 2.0)
    assert again.public_key.public_numbers() == issuer.public_key.public_numbers()
    assert await load_secret(config, sqlite_store, 2.0) == secret


@pytest_twisted.ensureDeferred
async def test_secrets_stored_in_clear_by_an_earlier_version_are_encrypted_once(sqlite_store, tmp_path):
    from presence.secrets_at_rest import PREFIX

    await sqlite_store.web_secret("session_secret", "c" * 64, 0.0)   # what b52f725 stored
    config = Config(secrets_key_file=str(tmp_path / "k"))
    assert await load_secret(config, sqlite_store, 1.0) == b"c" * 64   # the same secret: sessions survive
    [(value,)] = await sqlite_store._query("SELECT value FROM web_secrets WHERE name = 'session_secret'")
    assert value.startswith(PREFIX) and "c" * 64 not in value
    assert await load_secret(config, sqlite_store, 2.0) == b"c" * 64


@pytest_twisted.ensureDeferred
async def test_another_key_stops_the_node_with_a_clear_message(sqlite_store, tmp_path):
    from presence.secrets_at_rest import SecretsKeyError

    await load_secret(Config(secrets_key_file=str(tmp_path / "first")), sqlite_store, 1.0)
    with pytest.raises(SecretsKeyError, match="encrypted with another key .* same --secrets-key-file"):
        await load_secret(Config(secrets_key_file=str(tmp_path / "second")), sqlite_store, 2.0)
    (tmp_path / "bad").write_text("not a key\n")
    with pytest.raises(SecretsKeyError, match="not a secrets key"):
        await load_secret(Config(secrets_key_file=str(tmp_path / "bad")), sqlite_store, 3.0)


def test_the_hostile_input_options_have_help_defaults_and_are_in_the_operator_guide():
    helped = dict(SETTINGS)
    guide = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    security = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    for name in ("support_timeout", "max_assertion_lifetime", "max_certificate_lifetime", "clock_skew",
                 "fetch_max_head", "fetch_max_header_lines", "max_body", "secrets_key_file",
                 "login_links_per_client", "login_links_total", "client_address_header"):
        option = f"`--{name.replace('_', '-')}`"
        assert helped[name] and option in guide, name
        assert option in security or name in ("support_timeout", "secrets_key_file") or name.startswith("client"), name
    config = Config()
    assert (config.max_body, config.fetch_max_head, config.fetch_max_header_lines) == (1024 * 1024, 16384, 100)
    assert (config.max_assertion_lifetime, config.max_certificate_lifetime, config.clock_skew) == (600, 86400, 120)
    assert (config.login_links_per_client, config.login_links_total, config.client_address_header) == (10, 300, "")


def test_nodes_starting_together_on_one_machine_read_one_whole_key(tmp_path):
    """Several nodes making the default key file at once: each reads the same, whole key."""
    import threading

    from presence.config import Config
    from presence.secrets_at_rest import SecretBox

    config = Config(database="postgresql://x@127.0.0.1/db", secrets_key_file=str(tmp_path / "shared.key"))
    boxes, errors = [], []

    def start() -> None:
        try:
            boxes.append(SecretBox.from_config(config))
        except Exception as e:  # what a node that read half a key would raise
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(boxes) == 16
    sealed = boxes[0].seal("the cookie secret")
    assert {box.open(sealed, "cookie secret") for box in boxes} == {"the cookie secret"}
    assert [p.name for p in tmp_path.iterdir()] == ["shared.key"]   # no draft left behind
