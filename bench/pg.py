"""A throw-away PostgreSQL database for one bench run, and the CPU its backends use.

The bench creates `presence_bench_<pid>_<random>` through an administrative URL (any database of
the server, e.g. postgresql://postgres@127.0.0.1:5432/test), hands the nodes a URL of the new
database tagged with `application_name=presence-bench-<node>`, and drops it (WITH (FORCE)) at the
end. The server is on this machine, so its backends' CPU time is read from /proc.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from bench import common


class PgDatabase:
    def __init__(self, admin_url: str):
        import psycopg2

        self.admin_url = admin_url
        self.name = f"presence_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self._psycopg2 = psycopg2
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.name}"')
        self.dropped = False

    def _admin(self):
        conn = self._psycopg2.connect(self.admin_url, connect_timeout=10)
        conn.autocommit = True
        return _Closing(conn)

    def url(self, application_name: str = "") -> str:
        """This database's URL, tagged with `application_name` (so its backends can be told apart)."""
        parts = urlsplit(self.admin_url)
        query = dict(parse_qsl(parts.query))
        if application_name:
            query["application_name"] = application_name
        return urlunsplit(parts._replace(path="/" + self.name, query=urlencode(query)))

    def backends(self) -> dict[int, str]:
        """pid -> application_name of every backend connected to this database."""
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s", (self.name,))
            return {int(pid): name or "" for pid, name in cur.fetchall()}

    def cpu(self) -> dict[int, float]:
        """pid -> CPU seconds so far of this database's backends (those /proc lets us read)."""
        out = {}
        for pid in self.backends():
            try:
                out[pid] = common.cpu_seconds(pid)
            except OSError:
                pass
        return out

    def drop(self) -> None:
        if self.dropped:
            return
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.dropped = True


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds the backends used between two `PgDatabase.cpu()` readings (new backends count whole)."""
    return sum(max(cpu - before.get(pid, 0.0), 0.0) for pid, cpu in after.items())


class _Closing:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, *exc):
        self.conn.close()
