"""A session handles one connection's messages strictly in order, even when one waits."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from presence.metrics import Metrics
from presence.ws.session import OK_REPLY, Session
from tests.fakes import ListPeer


class Recording(Session):
    __slots__ = ("log", "gates")

    def __init__(self, peer):
        super().__init__(peer, Clock(), 10, Metrics())
        self.log: list = []
        self.gates: dict[str, Deferred] = {}

    async def dispatch(self, message):
        name = message["n"]
        self.log.append(("start", name))
        if name in self.gates:
            await self.gates[name]
        self.log.append(("end", name))
        return OK_REPLY if name != "dict" else {"result": name}


def test_messages_wait_for_the_one_in_progress_and_keep_their_order():
    peer = ListPeer()
    session = Recording(peer)
    session.gates["a"] = Deferred()
    session.gates["c"] = Deferred()
    for name in "abcd":
        session.received('{"n": "%s"}' % name)
    assert session.log == [("start", "a")]                 # b, c and d wait for a
    session.gates["a"].callback(None)
    assert session.log == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c")]
    session.received('{"n": "e"}')                          # arrives while c waits: after d
    session.gates["c"].callback(None)
    assert [name for what, name in session.log if what == "start"] == list("abcde")
    assert peer.sent == [{"result": "OK"}] * 5
    session.received('{"n": "dict"}')                       # idle again: handled at once
    assert session.log[-1] == ("end", "dict") and peer.sent[-1] == {"result": "dict"}


# -- hostile input (issue 14) ----------------------------------------------------------------------
class _Echo(Session):
    __slots__ = ()

    async def dispatch(self, message):
        return {"result": "OK"}


def test_deeply_nested_json_is_malformed_not_an_internal_error(capsys):
    """Regression: RecursionError from the parser was answered as errno 50 with a traceback each time."""
    import gc

    from twisted.logger import globalLogPublisher

    # Earlier tests' garbage is finalized now, not deep in the parser's recursion (where a finalizer
    # that warns fails, and pytest reports that as this test's).
    gc.collect()

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        peer = ListPeer()
        session = _Echo(peer, Clock(), 10, Metrics())
        for text in ("[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000):
            session.received(text)
        session.received('{"type": "x"}')                    # and the session goes on
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [m.get("errno") for m in peer.sent[:3]] == [1, 1, 1] and peer.closed is None
    assert peer.sent[3] == {"result": "OK"}
    assert not [e for e in events if e.get("log_failure") is not None or e.get("event") == "session.error"]


class _LimitPeer(ListPeer):
    def __init__(self):
        super().__init__()
        self.raised = 0

    def authenticated(self):
        self.raised += 1


def test_authenticating_raises_the_peers_message_limit():
    peer = _LimitPeer()
    session = _Echo(peer, Clock(), 10, Metrics())
    session.opened()
    assert peer.raised == 0
    session.authenticated()
    assert peer.raised == 1
    _Echo(ListPeer(), Clock(), 10, Metrics()).authenticated()   # a peer without limits is fine too
