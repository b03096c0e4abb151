"""Pairing a device that has no browser (docs/protocol.md, in the manner of RFC 8628), and renewing
its certificate.

    credentials = await pair("http://node:8080", name="kitchen laptop")
    credentials.save("device.json")

The device asks for a code, shows it with the URL where the person approves it, and polls no more
often than the node allows (`interval`, plus 5 seconds at each `slow_down`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from cryptography.hazmat.primitives.asymmetric import rsa

from presence_client import jws
from presence_client.credentials import Credentials, derive_ws_url
from presence_client.errors import PairingError, RequestError, Revoked
from presence_client.http import request_json

log = logging.getLogger("presence_client.pairing")

SLOW_DOWN_STEP = 5.0


@dataclass(frozen=True)
class PairingCode:
    """What the node answered to `POST /pair`: the user code to show and the secret device code."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def show_code(code: PairingCode) -> None:
    """The default way of showing the code: on standard output."""
    print(f"To pair this device, open {code.verification_uri} and enter the code {code.user_code}", flush=True)
    if code.verification_uri_complete:
        print(f"(or open {code.verification_uri_complete})", flush=True)


def websocket_base(url: str | None) -> str | None:
    """The websocket URL the node's answer gives (``.../presence``), as the base the client adds
    ``/presence`` to."""
    return url.removesuffix("/presence") if url else None


def audience_of(code: PairingCode) -> str:
    """The node's public URL, which assertions must name, for a node whose answer does not say it:
    the verification URI without `/me/pair`."""
    return code.verification_uri.split("?", 1)[0].removesuffix("/me/pair")


async def request_code(http_url: str, key: rsa.RSAPrivateKey, name: str | None = None) -> PairingCode:
    """`POST /pair`; waits and asks again when the node says 429 with `retry_after`."""
    body: dict[str, Any] = {"publicKey": jws.public_key_json(key)}
    if name:
        body["name"] = name
    for _ in range(5):
        status, answer, headers = await request_json("POST", http_url.rstrip("/") + "/pair", body)
        if status == 200:
            return PairingCode(answer["device_code"], answer["user_code"], answer["verification_uri"],
                               answer.get("verification_uri_complete"), float(answer.get("expires_in", 600)),
                               float(answer.get("interval", 5)))
        answer = answer if isinstance(answer, dict) else {}
        if status == 429:
            await asyncio.sleep(float(answer.get("retry_after", headers.get("retry-after", 5))))
            continue
        raise RequestError(f"POST /pair: {status} {answer.get('error', '')}".strip(), status, answer.get("errno"))
    raise RequestError("POST /pair: still rate-limited, try again later", 429)


async def wait_for_approval(http_url: str, code: PairingCode, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                            clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Poll `POST /pair/token` until the person decides: the approval's answer, or PairingError."""
    interval = code.interval
    deadline = clock() + code.expires_in
    while True:
        await sleep(interval)
        try:
            status, answer, _ = await request_json("POST", http_url.rstrip("/") + "/pair/token",
                                                   {"device_code": code.device_code})
        except OSError as e:   # the node restarts, or the network blinks: poll again until the code expires
            log.info("polling for the approval failed (%s); trying again", e)
            if clock() > deadline:
                raise PairingError("expired_token", "the code expired before the node could be reached: pair again") from e
            continue
        if status == 200:
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        if error == "authorization_pending":
            pass
        elif error == "slow_down":
            interval += SLOW_DOWN_STEP
        elif status == 400 and error in ("access_denied", "expired_token"):
            raise PairingError(error, "the person denied the pairing" if error == "access_denied"
                               else "the code expired (or was already used): pair again")
        elif status >= 500 or status == 429:
            pass   # the node is busy or restarting: keep polling until the code expires
        else:
            raise PairingError(str(error or status), f"POST /pair/token: {status} {error}")
        if clock() > deadline:
            raise PairingError("expired_token", "the code expired before the person approved it: pair again")


async def pair(http_url: str, name: str | None = None, ws_url: str | None = None, key: rsa.RSAPrivateKey | None = None,
               show: Callable[[PairingCode], Any] = show_code,
               sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> Credentials:
    """The whole pairing: a key (made here unless given), the code shown by `show`, the person's
    approval waited for; returns credentials ready to save and connect with."""
    key = key or await asyncio.to_thread(jws.new_key)
    code = await request_code(http_url, key, name)
    shown = show(code)
    if asyncio.iscoroutine(shown):
        await shown
    approved = await wait_for_approval(http_url, code, sleep)
    return Credentials(email=approved["email"], device=approved.get("device") or name or "device",
                       certificate=approved["certificate"], key_pem=jws.key_to_pem(key),
                       audience=approved.get("audience") or audience_of(code), http_url=http_url.rstrip("/"),
                       ws_url=(ws_url or websocket_base(approved.get("websocket")) or derive_ws_url(http_url)).rstrip("/"),
                       pairing=approved.get("pairing"), expires=approved.get("expires"))


async def renew(credentials: Credentials) -> Credentials:
    """`POST /pair/renew` with an assertion: the same credentials with a fresh certificate.
    Raises Revoked when the person revoked the device, RequestError otherwise."""
    status, answer, _ = await request_json("POST", credentials.http_url + "/pair/renew",
                                           {"assertion": credentials.assertion()})
    answer = answer if isinstance(answer, dict) else {}
    if status == 200:
        return Credentials(email=answer.get("email", credentials.email), device=answer.get("device") or credentials.device,
                           certificate=answer["certificate"], key_pem=credentials.key_pem,
                           audience=credentials.audience, http_url=credentials.http_url, ws_url=credentials.ws_url,
                           pairing=answer.get("pairing", credentials.pairing), expires=answer.get("expires"))
    if status == 403 and answer.get("error") == "revoked":
        raise Revoked("the person revoked this device: pair again", errno=16)
    raise RequestError(f"POST /pair/renew: {status} {answer.get('error', '')}".strip(), status, answer.get("errno"))
