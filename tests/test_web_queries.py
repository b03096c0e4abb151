"""``GET /<appid>/people`` and ``GET /<appid>/people/<uid>`` on a started node, on both stores: pages
cover every granted person once with a cursor, say the seq they hold, and a wrong key is refused."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq

from presence import errors
from tests.test_sync_e2e import running  # noqa: F401 (a started node on each store)


def url(running, path: str) -> str:
    return f"http://127.0.0.1:{running.node.web_port.getHost().port}{path}"


async def get(running, path: str, key: str | None, **params):
    headers = {"authorization": [f"Bearer {key}"]} if key is not None else {}
    response = await treq.get(url(running, path), headers=headers, params=params or None)
    return response.code, await response.json(), response


@pytest_twisted.ensureDeferred
async def test_pages_cover_every_granted_person_once_and_say_the_seq_they_hold(running):
    people = [f"p{i:02d}@example.com" for i in range(23)]
    app, key = await running.app(*people)
    other, _ = await running.app("stranger@example.com")
    phone = await running.device(people[4], "phone")
    await running.status(phone, "online")
    got, cursor, pages = [], None, 0
    while True:
        params = {"limit": "5"} if cursor is None else {"limit": "5", "cursor": cursor}
        code, body, _ = await get(running, f"/{app.app_id}/people", key, **params)
        assert code == 200
        pages += 1
        got += body["people"]
        assert body["seq"] == await running.node.store.last_change()
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 5 and [p["email"] for p in got] == people
    by_email = {p["email"]: p for p in got}
    assert by_email[people[4]]["status"] == "online" and by_email[people[4]]["last_active"] is not None
    assert {p["status"] for e, p in by_email.items() if e != people[4]} == {"offline"}
    uid = (await running.node.store.get_grant(people[4], app.app_id)).uid
    assert by_email[people[4]]["uid"] == uid
    code, body, _ = await get(running, f"/{app.app_id}/people/{uid}", key)
    assert code == 200 and body["person"] == by_email[people[4]] and body["seq"] >= body["person"]["seq"]
    # the default page, and the whole list in one
    code, body, _ = await get(running, f"/{app.app_id}/people", key, limit="1000")
    assert code == 200 and len(body["people"]) == 23 and body["next"] is None


@pytest_twisted.ensureDeferred
async def test_a_wrong_or_missing_key_and_bad_queries_are_refused(running):
    app, key = await running.app("alice@example.com")
    other, other_key = await running.app("alice@example.com")
    for path in (f"/{app.app_id}/people", f"/{app.app_id}/people/whatever"):
        code, body, response = await get(running, path, "x" * 1024)
        assert (code, body["errno"]) == (401, errors.BAD_KEY)
        code, body, response = await get(running, path, other_key)        # another application's key
        assert (code, body["errno"]) == (401, errors.BAD_KEY)
        code, body, response = await get(running, path, None)
        assert (code, body["errno"]) == (401, errors.BAD_FIELD)
        assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="presence"']
    code, body, _ = await get(running, "/nosuchapp/people", key)
    assert (code, body["errno"]) == (404, errors.UNKNOWN_APP)
    # alice's uid for the other application is not one of this application's
    other_uid = (await running.node.store.get_grant("alice@example.com", other.app_id)).uid
    code, body, _ = await get(running, f"/{app.app_id}/people/{other_uid}", key)
    assert (code, body["errno"]) == (404, errors.UNKNOWN_UID)
    for params in ({"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"cursor": "!!!"}):
        code, body, _ = await get(running, f"/{app.app_id}/people", key, **params)
        assert (code, body["errno"]) == (400, errors.BAD_FIELD), params
