"""What a node needs at run time: autobahn only speeds up unmasking large frames, so it is in the
test extra (and the optional `speedups` extra), not in install_requires, and a node runs without it."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _requirements(section: str, option: str) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return [line.split()[0].lower() for line in parser[section][option].strip().splitlines() if line.strip()]


def test_autobahn_is_a_test_dependency_not_a_run_time_one():
    assert "autobahn" not in _requirements("options", "install_requires")
    assert "autobahn" in _requirements("options.extras_require", "test")
    assert "pybrowserid" in _requirements("options.extras_require", "test")


def test_the_websocket_server_works_without_autobahn():
    # autobahn made unimportable: the frames module and the node's modules import, and large
    # payloads are unmasked by the big-integer XOR.
    code = (
        "import sys; sys.modules['autobahn'] = None\n"
        "import presence.node, presence.ws.server\n"
        "from presence.ws import frames\n"
        "data = bytes(range(256)) * 2048\n"
        "mask = b'\\x01\\x02\\x03\\x04'\n"
        "masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))\n"
        "assert frames.unmask(mask, masked) == data\n"
        "assert frames._large_unmask() is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
