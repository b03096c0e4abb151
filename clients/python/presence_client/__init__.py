"""asyncio clients for Presence: `PresenceApp` for applications, `PresenceDevice` and `pair` for
devices, and the `presence-device` command (docs/clients.md)."""

from presence_client.app import PresenceApp
from presence_client.backoff import Backoff
from presence_client.credentials import Credentials
from presence_client.device import PresenceDevice
from presence_client.errors import PairingError, PresenceError, Replaced, RequestError, Revoked, Stopped
from presence_client.idle import Activity, IdleWatcher, command_hook
from presence_client.pairing import PairingCode, pair, renew
from presence_client.state import Change, Person

__version__ = "0.1.0"
__all__ = ["Activity", "Backoff", "Change", "Credentials", "IdleWatcher", "PairingCode", "PairingError", "Person",
           "PresenceApp", "PresenceDevice", "PresenceError", "Replaced", "RequestError", "Revoked", "Stopped",
           "command_hook", "pair", "renew"]
