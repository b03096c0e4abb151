"""The PostgreSQL backend: a txpostgres pool (no threads), rebuilt lazily after the connection is lost."""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, TypeVar

import psycopg2
import psycopg2.extensions
from twisted.internet import defer, error
from twisted.logger import Logger
from txpostgres import txpostgres

from presence.store.base import CommitUnknown, StoreUnavailable
from presence.store.sql import Interaction, Script, SQLStore

T = TypeVar("T")
log = Logger()

# Failures that mean the connection (or the server) is gone, as opposed to a refused query.
CONNECTION_ERRORS = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    txpostgres.RollbackFailed,
    error.ConnectionClosed,
)

# The server gave up on one statement or transaction (a deadlock, a serialization failure, a statement
# timeout or cancel) and rolled it back: the connection is fine, unlike the OperationalErrors above.
REFUSED_TRANSACTIONS = (
    psycopg2.extensions.TransactionRollbackError,
    psycopg2.extensions.QueryCanceledError,
)

# Any constant: taken for the length of a migration transaction, so two nodes never migrate at once.
MIGRATION_LOCK_KEY = 0x70726573  # "pres"


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """``?`` placeholders to psycopg2's ``%s`` (a literal % must then be doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _reason(e: BaseException) -> str:
    if isinstance(e, defer.FirstError):
        e = e.subFailure.value
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class _AtCommit(Exception):
    """The connection failed at the COMMIT itself: whether the server applied it is unknown."""

    def __init__(self, failure):
        super().__init__(_reason(failure.value))
        self.failure = failure


def _at_commit(e: BaseException) -> bool:
    if isinstance(e, txpostgres.RollbackFailed):
        e = e.originalFailure.value
    return isinstance(e, _AtCommit)


class _Connection(txpostgres.Connection):
    """A pooled connection that reports the server closing it while idle (a restart,
    pg_terminate_backend, idle_session_timeout) to ``on_lost``, instead of an unhandled error."""

    on_lost: Callable[[], None] | None = None

    def doRead(self):
        try:
            return super().doRead()
        except CONNECTION_ERRORS as e:  # only raised when no query is waiting for the answer
            return self._lost(_reason(e))
        except ValueError as e:
            # txpostgres registers the socket again after libpq dropped it (fd -1; psycopg2 may not
            # mark the connection closed yet): lost as well
            if "negative" in str(e) or getattr(getattr(self, "_connection", None), "closed", 1):
                return self._lost("the server closed the connection")
            raise

    def _lost(self, why: str) -> error.ConnectionLost:
        if self.on_lost is not None:
            self.reactor.callLater(0, self.on_lost)
        return error.ConnectionLost(why)  # the reactor then calls connectionLost

    def _runInteraction(self, interaction, *args, **kwargs):
        """txpostgres' transaction, except that a rollback failing because the connection is gone
        (the server restarted, the backend was terminated) is not logged as an unhandled error with
        a traceback: the transaction died with the connection, and the caller gets RollbackFailed,
        which the store reports as one clear StoreUnavailable."""
        cursor = self.cursor()
        d = cursor.execute("begin")
        d.addCallback(interaction, *args, **kwargs)
        d.addCallback(lambda result: cursor.execute("commit").addCallbacks(
            lambda _: result, lambda f: defer.fail(_AtCommit(f)) if f.check(*CONNECTION_ERRORS) else f))

        def roll_back(failure):
            undo = defer.maybeDeferred(cursor.execute, "rollback")
            undo.addErrback(lambda _: defer.fail(txpostgres.RollbackFailed(self, failure)))
            return undo.addCallback(lambda _: failure)

        return d.addErrback(roll_back)


class _Pool(txpostgres.ConnectionPool):
    def __init__(self, reactor, dsn: str, size: int, on_lost: Callable[[_Pool], None]):
        self.reactor = reactor  # read by the base class when it builds the connections
        self.on_lost = on_lost
        super().__init__(None, dsn, min=size)

    def connectionFactory(self, reactor, cooperator) -> _Connection:
        connection = _Connection(reactor, cooperator)
        connection.on_lost = lambda: self.on_lost(self)
        return connection

    def close_quietly(self) -> None:
        """Close the idle connections, whatever state they are in (some may never have connected)."""
        for connection in list(self.connections):
            try:
                connection.close()
            except Exception:
                pass


async def _drive(cursor, interaction: Interaction[T]) -> T:
    """Feed an interaction's statements to a txpostgres cursor (inside runInteraction's transaction)."""
    rows: list[tuple] | None = None  # a generator is started with None
    while True:
        try:
            step = interaction.send(rows)
        except StopIteration as done:
            return done.value
        if isinstance(step, Script):
            await cursor.execute(step.text)
            rows = []
        else:
            sql, args = step
            await cursor.execute(_pg(sql), args)
            rows = cursor.fetchall() if cursor.description is not None else []


class PostgresStore(SQLStore):
    dialect = "postgres"
    migration_lock = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
    # The two-key form: its keys never collide with the one-key migration lock.
    # Every person of a batch, in the order of their lock keys, so two nodes locking overlapping
    # batches never wait on each other in a cycle.
    person_lock = ("SELECT count(pg_advisory_xact_lock(1, h)) FROM"
                   " (SELECT DISTINCT hashtext(e) AS h FROM unnest(?::text[]) AS e ORDER BY h) AS keys")
    notify = "SELECT pg_notify('presence', ?)"
    fence_lock = " FOR KEY SHARE"   # a reaper's DELETE waits for it; a heartbeat's UPDATE does not
    clock_sql = "extract(epoch from clock_timestamp())"

    def __init__(self, url: str, reactor=None, pool_size: int = 3, connect_timeout: float = 10.0):
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._reactor = reactor
        self.settle_clock = reactor
        self._pool: _Pool | None = None
        self._connecting = defer.DeferredLock()
        self._closed = False
        try:
            dsn = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError as e:
            raise ValueError(f"bad --database {url!r}: {e}") from e
        # For messages: where the server is, never the password.
        self.where = f"{dsn.get('host', 'localhost')}:{dsn.get('port', '5432')}/{dsn.get('dbname', '')}"

    # -- the pool ------------------------------------------------------------------------------
    async def _start(self) -> _Pool:
        pool = _Pool(self._reactor, self.url, self.pool_size, on_lost=self._discard)
        # libpq ignores connect_timeout for asynchronous connections, so time the start ourselves;
        # a plain Deferred in between can be cancelled (txpostgres' own cannot, cleanly).
        started: defer.Deferred = defer.Deferred()
        try:
            # txpostgres polls libpq's socket as it connects and may raise at once, not through the
            # Deferred (the socket changed under epoll as the server restarted: ENOENT, fd -1)
            pool.start().chainDeferred(started)
        except Exception as e:
            started.errback(e)
        started.addTimeout(self.connect_timeout, self._reactor)
        try:
            await started
        except Exception as e:
            pool.close_quietly()
            reason = f"no answer in {self.connect_timeout:g}s" if isinstance(e, defer.TimeoutError) else _reason(e)
            raise StoreUnavailable(
                f"cannot reach PostgreSQL at {self.where}: {reason}; check --database and that the server runs"
            ) from e
        return pool

    async def _ready(self) -> _Pool:
        """The pool, (re)connecting first if there is none: after open(), or after a lost connection."""
        if self._pool is None:
            async with self._connecting:
                if self._closed:
                    raise StoreUnavailable("the store is closed")
                if self._pool is None:
                    self._pool = await self._start()
        return self._pool

    def _discard(self, pool: _Pool) -> None:
        """Forget a pool that lost a connection: the next call builds a new one. When one connection
        is lost the others usually are too (the server restarted), and a new pool costs little."""
        if self._pool is pool:
            log.warn("lost the connection to PostgreSQL at {where}; reconnecting on the next call", where=self.where,
                     event="store.connection_lost")
            self._pool = None
            pool.close_quietly()

    async def _call(self, run: Callable[[_Pool], Awaitable[Any]]) -> Any:
        """Run against the pool and turn driver errors into the store's own."""
        pool = await self._ready()
        try:
            return await run(pool)
        except psycopg2.IntegrityError as e:
            raise ValueError(f"refused by the database: {_reason(e)}") from e
        except REFUSED_TRANSACTIONS as e:
            # Subclasses of OperationalError, but the connection is fine: keep the pool.
            raise StoreUnavailable(
                f"PostgreSQL at {self.where} refused the transaction: {_reason(e)}; nothing of it was applied"
            ) from e
        except (*CONNECTION_ERRORS, _AtCommit) as e:
            self._discard(pool)
            if _at_commit(e):
                raise CommitUnknown(
                    f"PostgreSQL at {self.where} failed at the commit: {_reason(e)}; whether it was applied is"
                    " unknown; the next call reconnects"
                ) from e
            raise StoreUnavailable(
                f"PostgreSQL at {self.where} failed: {_reason(e)}; the next call reconnects;"
                " check that the server runs"
            ) from e
        finally:
            if pool is not self._pool:
                pool.close_quietly()  # discarded (or closed) while we ran: do not leak its connections

    # -- backend primitives ----------------------------------------------------------------
    async def _connect(self) -> None:
        await self._ready()

    async def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return await self._call(lambda pool: pool.runQuery(_pg(sql), args))

    async def _execute(self, sql: str, args: tuple = ()) -> None:
        await self._call(lambda pool: pool.runOperation(_pg(sql), args))

    async def _transaction(self, interaction: Interaction[T]) -> T:
        return await self._call(
            lambda pool: pool.runInteraction(lambda cursor: defer.Deferred.fromCoroutine(_drive(cursor, interaction)))
        )

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close_quietly()
