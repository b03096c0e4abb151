"""TLS through strports: a node serving https:// and wss:// on loopback with a throwaway self-signed
certificate; clients that trust it (and check the host name) get through, others do not."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from presence.node import Node
from tests.test_node_e2e import AUDIENCE, Running, config, statuses
from tests.wsclient import WSClient


def self_signed(directory: Path, names: tuple[str, ...] = ("localhost",),
                ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A key and a self-signed certificate (no CA) for ``names`` and ``ips``, valid for a day:
    (key.pem, cert.pem) in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def ssl_endpoint(key: Path, cert: Path) -> str:
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


class Secure(Running):
    """Running, with the application and the device over wss:// with verification."""

    def __init__(self, node: Node, idp, trust: Certificate):
        super().__init__(node, idp)
        self.trust = trust
        self.tls = optionsForClientTLS("localhost", trustRoot=trust)

    async def stream(self, app, key) -> WSClient:
        client = await WSClient.connect(self.ws, "/" + app.app_id, tls=self.tls, url_host="localhost")
        client.send({"key": key})
        assert await client.receive() == {"result": "OK", "app_id": app.app_id}
        return client

    async def device(self, email: str, device: str | None = None, **extra) -> WSClient:
        client = await WSClient.connect(self.ws, "/presence", tls=self.tls, url_host="localhost")
        client.send({"type": "connect", "assertion": self.idp.assertion(email, AUDIENCE), "device": device or "d"})
        assert (await client.receive())["result"] is True
        return client


@pytest_twisted.async_yield_fixture
async def secure(idp, tmp_path):
    key, cert = self_signed(tmp_path)
    node = Node(config(idp, tmp_path, web=ssl_endpoint(key, cert), ws=ssl_endpoint(key, cert)))
    await node.start()
    try:
        yield Secure(node, idp, Certificate.loadPEM(cert.read_bytes()))
    finally:
        await node.stop()


def https_client(trust: Certificate) -> treq.client.HTTPClient:
    return treq.client.HTTPClient(Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust)))


@pytest_twisted.ensureDeferred
async def test_https_pages_with_a_verified_certificate(secure):
    page = await https_client(secure.trust).get(f"https://localhost:{secure.node.web_port.getHost().port}/")
    assert page.code == 200 and "Presence" in await page.text()


@pytest_twisted.ensureDeferred
async def test_a_wss_application_receives_a_status_change_from_a_wss_device(secure):
    app, key = await secure.app("alice@example.com")
    stream = await secure.stream(app, key)
    assert stream.protocol.transport.getPeerCertificate() is not None  # really TLS
    phone = await secure.device("alice@example.com", "phone")
    await secure.status(phone, "online")
    assert statuses(await stream.receive()) == [("alice@example.com", "online")]


@pytest_twisted.ensureDeferred
async def test_clients_that_do_not_trust_the_certificate_or_name_another_host_fail(secure, tmp_path):
    web, ws = secure.node.web_port.getHost().port, secure.node.ws_port.getHost().port
    # the system's trust roots do not include a self-signed certificate
    with pytest.raises(Exception) as refused:
        await treq.get(f"https://localhost:{web}/", persistent=False)
    assert "certificate verify failed" in str(refused.value)
    with pytest.raises(ConnectionError):
        await WSClient.connect(ws, "/presence", tls=optionsForClientTLS("localhost"), url_host="localhost")
    # another certificate, even for the same names, is not this one
    other = tmp_path / "other"
    other.mkdir()
    _, other_cert = self_signed(other)
    stranger = Certificate.loadPEM(other_cert.read_bytes())
    with pytest.raises(Exception):
        await https_client(stranger).get(f"https://localhost:{web}/")
    with pytest.raises(ConnectionError):
        await WSClient.connect(ws, "/presence", tls=optionsForClientTLS("localhost", trustRoot=stranger),
                               url_host="localhost")
    # the right certificate for the wrong host name: the name is checked
    trust = secure.trust
    with pytest.raises(ConnectionError):
        await WSClient.connect(ws, "/presence", tls=optionsForClientTLS("presence.test", trustRoot=trust),
                               url_host="presence.test")
    # and the same client with the right name gets through
    client = await WSClient.connect(ws, "/presence", tls=optionsForClientTLS("localhost", trustRoot=trust),
                                    url_host="localhost")
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_tls_node_stops_as_fast_as_a_plain_one(idp, tmp_path):
    # The node closes each websocket with 1001 and waits for the close handshakes (up to 5 s each
    # round). Over TLS the connections used to linger until that 5 s timer aborted them: a graceful
    # TLS shutdown waits for the client's close_notify, which a client waiting for the server to
    # drop TCP never sends. Both rounds (devices, then applications) now end with the handshake.
    key, cert = self_signed(tmp_path)
    node = Node(config(idp, tmp_path, web=ssl_endpoint(key, cert), ws=ssl_endpoint(key, cert)))
    await node.start()
    secure = Secure(node, idp, Certificate.loadPEM(cert.read_bytes()))
    app, api_key = await secure.app("alice@example.com")
    stream = await secure.stream(app, api_key)
    phone = await secure.device("alice@example.com", "phone")
    await secure.status(phone, "online")
    started = reactor.seconds()
    await node.stop()
    took = reactor.seconds() - started
    assert await phone.wait_closed() == 1001 and await stream.wait_closed() == 1001
    # grace is 0.3 s in these nodes; one 5 s close timeout alone would exceed the bound
    assert took < 2.5, f"stopping took {took:.1f} s"
