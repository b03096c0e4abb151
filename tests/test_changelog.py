"""The change log's payload: compact for a person who granted many applications, and still able to
read entries written in the earlier form."""

from __future__ import annotations

import json

from presence import changelog
from presence.views import Update


def test_a_change_to_many_applications_is_written_once_per_person_not_once_per_application():
    updates = [Update(f"app{i}", "alice@example.com", f"uid{i}", "online", 1796000000.123456, 7) for i in range(19000)]
    payload = changelog.encode(updates)
    assert payload.count("alice@example.com") == 1 and payload.count("1796000000.123456") == 1
    assert changelog.decode(payload, 7) == (updates, frozenset(), [])


def test_updates_keep_their_own_numbers_and_order_when_asked():
    updates = [Update("a", "x@y", "u1", "online", 1.0, 3), Update("b", "x@y", "u2", "online", 1.0, 3),
               Update("a", "x@y", "u1", "offline", 1.0, 4), Update("a", "z@y", "u3", "unavailable", 2.0, 5)]
    decoded, queued, extras = changelog.decode(changelog.encode(updates, {"b"}, [{"k": 1}], keep_seq=True), 9)
    assert decoded == updates and queued == {"b"} and extras == [{"k": 1}]
    # without keep_seq, every update carries the logged change's number
    assert {u.seq for u in changelog.decode(changelog.encode(updates[:2]), 9)[0]} == {9}


def test_entries_in_the_earlier_form_are_still_read():
    old = json.dumps({"u": [["a", "x@y", "u1", "online", 1.0], ["b", "x@y", "u2", "online", 1.0, 4]], "q": ["a"]})
    assert changelog.decode(old, 6) == ([Update("a", "x@y", "u1", "online", 1.0, 6),
                                         Update("b", "x@y", "u2", "online", 1.0, 4)], frozenset({"a"}), [])
