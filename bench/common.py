"""What every bench process shares: the file limit, dying with the parent, the naming scheme of
the seeded store (so generators and the seeder agree without exchanging lists), small helpers."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project (the node's default source)
MAX_PER_NODE = 19_000  # a node process holds at most 20,000 files; keep room for its own
EMAIL_DOMAIN = "bench.test"

# Seeded names. Application ids are letters and digits only, like the node's own ids.
FAN_APP = "benchfan"                 # fan-out shape 1: one application, N connections
PROBE_APP = "benchprobe"             # the stall probe's connection (nobody granted it)
STAR_A = f"stara@{EMAIL_DOMAIN}"     # the person whose change fans out to FAN_APP
STAR_B = f"starb@{EMAIL_DOMAIN}"     # the person who granted every B application


def b_app(i: int) -> str:
    """Fan-out shape 2: application i of N, one connection each."""
    return f"benchb{i}"


def tp_app(g: int) -> str:
    """Throughput: generator g's observing application, granted by generator g's devices."""
    return f"benchtp{g}"


NOTE_APP = "benchnote"               # live notifications: granted by every device, posts to them


def note_uid(i: int) -> str:
    """Device person i's id for NOTE_APP, chosen by the seeder so the poster knows it (22 characters,
    letters and digits, like the node's own ids)."""
    return f"n{i:021d}"


def device_email(i: int) -> str:
    return f"d{i}@{EMAIL_DOMAIN}"


def devices_of(g: int, generators: int, devices: int) -> range:
    """Device persons are dealt round robin: generator g holds d{g}, d{g+G}, ..."""
    return range(g, devices, generators)


def source_addresses(g: int, per_generator: int = 8) -> list[str]:
    """Loopback source addresses of generator g (127.0.0.10 and up), so ports never run out."""
    base = 10 + g * per_generator
    if base + per_generator > 255:
        raise ValueError("too many generators for 127.0.0.0/24")
    return [f"127.0.0.{base + k}" for k in range(per_generator)]


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: get `sig` when the parent process goes away, so nothing outlives the bench."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_setup() -> None:
    """preexec_fn of every process the bench starts."""
    raise_nofile()
    die_with_parent()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(port: int, deadline: float, alive=lambda: True, host: str = "127.0.0.1") -> None:
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the process meant to listen on {port} exited")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def proc_status(pid: int, field: str = "VmRSS") -> int:
    """A /proc/<pid>/status field in bytes (kB in the file)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def lifetime_guard(seconds: float) -> None:
    """Every bench process stops by itself: SIGALRM ends it after `seconds`."""
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(max(1, int(seconds)))


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def add_cluster_options(q) -> None:
    """The options of every subcommand that runs nodes on a PostgreSQL database of its own."""
    q.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test",
                   help="an administrative URL of the PostgreSQL server; the bench creates (and drops) its own "
                        "database there")
    q.add_argument("--node-arg", dest="node_args", action="append", default=[],
                   help="one more argument for every `twistd presence` (repeatable)")
    q.add_argument("--backlog", type=int, default=4096)
    q.add_argument("--inflight", type=int, default=256, help="handshakes in flight per generator")
    q.add_argument("--presence-src", default=str(ROOT))
    q.add_argument("--presence-rev", default=None,
                   help="run the nodes from a clean export of this git revision (e.g. HEAD)")
    q.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait (up to SECONDS) until other processes use under 10%% of a core")
    q.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    q.add_argument("--markdown", type=Path, default=None, help="also write the tables as Markdown")
    q.add_argument("--run-dir", default=None, help="keep logs and configs here (default: a temporary directory)")
    q.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    q.add_argument("--timeout", type=float, default=None, help="stop everything after this many seconds")
