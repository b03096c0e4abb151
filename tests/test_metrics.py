"""What operators see: /metrics moves by the right amounts during a flow, /healthz and /readyz answer
on both listeners and readiness follows the store, and SIGTERM drains connections over time."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater

from presence import errors
from presence.node import Node
from tests.fakes import eventually
from tests.test_node_e2e import Running, config, statuses
from tests.test_outage import database_up
from tests.wsclient import WSClient


async def scrape(node: Node) -> dict[tuple[str, tuple], float]:
    port = node.metrics_port.getHost().port
    response = await treq.get(f"http://127.0.0.1:{port}/metrics")
    assert response.code == 200
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest_twisted.async_yield_fixture
async def running(idp, tmp_path):
    node = Node(config(idp, tmp_path, metrics="tcp:0:interface=127.0.0.1"))
    await node.start()
    yield Running(node, idp)
    await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_flow_moves_the_counters_by_the_right_amounts(running):
    node = running.node
    before = await scrape(node)
    app, key = await running.app("alice@example.com")
    stream = await running.stream(app, key)
    bad = await WSClient.connect(running.ws, "/" + app.app_id)
    bad.send({"key": "wrong"})
    await bad.wait_closed()
    phone = await running.device("alice@example.com")
    await running.status(phone, "online")
    assert statuses(await stream.receive()) == [("alice@example.com", "online")]
    await running.status(phone, "unavailable")
    assert statuses(await stream.receive()) == [("alice@example.com", "unavailable")]
    phone.send({"type": "status", "status": "sleepy"})
    await phone.receive()
    after = await scrape(node)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("presence_handshakes_total", kind="application") == 1
    assert delta("presence_handshakes_total", kind="device") == 1
    assert delta("presence_handshake_failures_total", kind="application", errno=str(errors.BAD_KEY)) == 1
    assert delta("presence_closes_total", code=str(errors.CLOSE_AUTH_FAILED)) == 1
    assert delta("presence_status_changes_received_total") == 2
    assert delta("presence_updates_delivered_total") == 2
    assert delta("presence_batch_size_count") == 2 and delta("presence_batch_size_sum") == 2
    assert delta("presence_delivery_latency_seconds_count") == 2
    assert value(after, "presence_connections", kind="device") == 1
    assert value(after, "presence_connections", kind="application") == 1
    assert delta("presence_store_seconds_count", op="transaction") >= 4
    assert value(after, "presence_store_errors_total", op="query") == 0


@pytest_twisted.ensureDeferred
async def test_health_endpoints_on_both_listeners(running):
    for port in (running.node.web_port.getHost().port, running.node.metrics_port.getHost().port):
        healthz = await treq.get(f"http://127.0.0.1:{port}/healthz")
        assert healthz.code == 200 and await healthz.json() == {"status": "ok"}
        readyz = await treq.get(f"http://127.0.0.1:{port}/readyz")
        assert readyz.code == 200 and (await readyz.json())["ready"] is True
    # the pages are still there behind them
    page = await treq.get(f"http://127.0.0.1:{running.node.web_port.getHost().port}/")
    assert page.code == 200 and "Presence" in await page.text()


@pytest_twisted.ensureDeferred
async def test_readiness_follows_the_store(idp, tmp_path, postgres_url):
    node = Node(config(idp, tmp_path, database=postgres_url, metrics="tcp:0:interface=127.0.0.1"))
    await node.start()
    url = f"http://127.0.0.1:{node.metrics_port.getHost().port}/readyz"
    try:
        body = await (await treq.get(url)).json()
        assert body == {"ready": True, "store": "ok", "bus": "ok", "node": "ok"}
        database_up(postgres_url, False)
        response = await treq.get(url)
        body = await response.json()
        assert response.code == 503 and body["ready"] is False and body["store"].startswith("unavailable")
        database_up(postgres_url, True)

        async def ready_again():
            return (await treq.get(url)).code == 200

        for _ in range(100):
            if await ready_again():
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert await ready_again()
    finally:
        database_up(postgres_url, True)
        await node.stop()


@pytest.mark.parametrize("drain", [1.0])
@pytest_twisted.ensureDeferred
async def test_sigterm_drains_devices_over_the_drain_time_and_loses_no_change(idp, tmp_path, drain):
    node = Node(config(idp, tmp_path, drain_time=drain, grace=0.3))
    await node.start()
    running = Running(node, idp)
    people = [f"p{i}@example.com" for i in range(8)]
    app, key = await running.app(*people)
    stream = await running.stream(app, key)
    devices = [await running.device(email) for email in people]
    for device in devices:
        await running.status(device, "online")
    seen = []
    while len(seen) < len(people):
        seen += statuses(await stream.receive())
    closed_at: list[float] = []
    for device in devices:
        device.closed.addCallback(lambda code: closed_at.append(reactor.seconds()) or code)
    await node.stop()
    codes = [device.close_code for device in devices]
    assert codes == [errors.CLOSE_GOING_AWAY] * len(devices)
    assert max(closed_at) - min(closed_at) >= drain * 0.6   # spread, not all at once
    offline = []
    while len(offline) < len(people):
        offline += statuses(await stream.receive())
    assert sorted(offline) == sorted((email, "offline") for email in people)
    await eventually(lambda: stream.close_code == errors.CLOSE_GOING_AWAY)


def test_bulk_histogram_scrapes_like_a_prometheus_histogram():
    from prometheus_client import CollectorRegistry, generate_latest

    from presence.metrics import BulkHistogram

    registry = CollectorRegistry()
    h = BulkHistogram("x_seconds", "an example", (0.1, 1.0), registry)
    h.observe(0.1)               # on a bound: counts in that bucket (le is "less or equal")
    h.observe(0.5, times=19_000)
    h.observe(7.0)
    value = registry.get_sample_value
    assert value("x_seconds_bucket", {"le": "0.1"}) == 1
    assert value("x_seconds_bucket", {"le": "1.0"}) == 19_001
    assert value("x_seconds_bucket", {"le": "+Inf"}) == 19_002
    assert value("x_seconds_count") == 19_002
    assert value("x_seconds_sum") == pytest.approx(0.1 + 9_500 + 7.0)
    assert b"# TYPE x_seconds histogram" in generate_latest(registry)
