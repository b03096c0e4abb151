"""twistd plugin: ``twistd presence``. Kept light: presence.tap is imported only when used."""

from twisted.application.service import ServiceMaker

presence = ServiceMaker(
    "Presence",
    "presence.tap",
    "A presence node: devices report status, granted applications receive it live",
    "presence",
)
