"""Grouped: callers that arrive while a batch runs share the next round trip."""

import pytest
from twisted.internet.defer import Deferred

from presence.batching import Grouped


class Backend:
    def __init__(self):
        self.batches: list[list] = []
        self.pending: list[Deferred] = []

    async def run(self, items):
        self.batches.append(list(items))
        d = Deferred()
        self.pending.append(d)
        await d
        if "boom" in items:
            raise RuntimeError("store down")
        return [item * 2 for item in items]


def test_calls_during_a_batch_make_up_the_next_one_and_get_their_own_results():
    backend = Backend()
    grouped = Grouped(backend.run, max_batch=3)
    results = []
    first = grouped(1)
    first.addCallback(results.append)
    others = [grouped(i) for i in (2, 3, 4, 5)]
    for d in others:
        d.addCallback(results.append)
    assert backend.batches == [[1]]
    backend.pending[0].callback(None)
    assert backend.batches == [[1], [2, 3, 4]]               # at most max_batch, in arrival order
    backend.pending[1].callback(None)
    assert backend.batches == [[1], [2, 3, 4], [5]]
    backend.pending[2].callback(None)
    assert results == [2, 4, 6, 8, 10]
    grouped(6).addCallback(results.append)                    # idle again: starts at once
    assert backend.batches[-1] == [6]


def test_a_failed_batch_fails_only_its_callers():
    backend = Backend()
    grouped = Grouped(backend.run, max_batch=2)
    ok = grouped(1)
    failed = [grouped("boom"), grouped(2)]
    later = grouped(3)
    errors = []
    for d in failed:
        d.addErrback(lambda f: errors.append(f.value))
    backend.pending[0].callback(None)
    backend.pending[1].callback(None)
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError]
    assert ok.result == 2 and backend.batches[-1] == [3]
    backend.pending[2].callback(None)
    assert later.result == 6
