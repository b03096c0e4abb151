"""The twistd plugin's options and presence.tac's environment give the same configuration."""

from __future__ import annotations

import subprocess
import sys

import pytest
from twisted.python import usage

from presence.config import Config
from presence.tap import Options, config_from_env, makeService


def test_defaults_are_the_embedded_single_machine_setup():
    options = Options()
    options.parseOptions([])
    config = options.config()
    assert config == Config(node=config.node)
    assert config.database == "sqlite:presence.sqlite" and config.web == "tcp:8080" and config.ws == "tcp:8081"


def test_every_option_parses_and_lists_repeat():
    options = Options()
    options.parseOptions(["--database", "postgresql://u@h/db", "--grace", "2.5", "--device-burst", "3",
                          "--trusted-issuer", "a.example", "--trusted-issuer", "b.example",
                          "--insecure-identity", "--public-ws-url", "wss://presence.example/ws"])
    config = options.config()
    assert config.database == "postgresql://u@h/db" and config.grace == 2.5 and config.device_burst == 3
    assert config.trusted_issuers == ["a.example", "b.example"] and config.insecure_identity
    assert config.public_ws_url == "wss://presence.example/ws"


def test_a_bad_number_is_a_usage_error_naming_the_option():
    options = Options()
    options.parseOptions(["--grace", "soon"])
    with pytest.raises(usage.UsageError, match="--grace"):
        options.config()


def test_the_tac_environment_matches_the_options():
    env = {"PRESENCE_DATABASE": "sqlite:/tmp/x.sqlite", "PRESENCE_GRACE": "3",
           "PRESENCE_TRUSTED_ISSUERS": "a.example, b.example", "PRESENCE_INSECURE_IDENTITY": "true"}
    options = Options()
    options.parseOptions(["--database", "sqlite:/tmp/x.sqlite", "--grace", "3", "--trusted-issuer", "a.example",
                          "--trusted-issuer", "b.example", "--insecure-identity"])
    assert config_from_env(env) == options.config()


def test_make_service_builds_a_node_without_starting_it():
    service = makeService(Config(database="sqlite::memory:"))
    assert [s.name for s in service] == ["presence-node"]


def test_version():
    out = subprocess.run([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                          "presence", "--version"], capture_output=True, text=True, timeout=60)
    from presence import __version__

    assert f"presence {__version__}" in out.stdout
