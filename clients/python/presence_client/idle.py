"""Idle detection: the host program says how long its user has been idle; the device turns that into
`unavailable` after a while and `online` again at the next activity.

The client cannot see keyboards and mice; the host fills the hook `idle_seconds() -> float | None`
(None: unknown, counted as active). `Activity` is a ready-made hook for hosts that see input events,
`command_hook` one for a command that prints the idle seconds.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from typing import Callable

IdleHook = Callable[[], "float | None"]


class IdleWatcher:
    """Decides the status from the hook: `unavailable` once idle for `idle_after` seconds."""

    def __init__(self, idle_seconds: IdleHook, idle_after: float = 300.0, check_every: float = 5.0):
        if idle_after <= 0 or check_every <= 0:
            raise ValueError("idle_after and check_every must be positive")
        self.idle_seconds = idle_seconds
        self.idle_after = idle_after
        self.check_every = check_every

    def decide(self) -> tuple[str, float]:
        """(status, seconds until it is worth asking again): at most `check_every`, sooner when the
        user is about to cross `idle_after`, so that `unavailable` comes on time."""
        try:
            idle = self.idle_seconds()
        except Exception:
            idle = None
        if idle is None:
            return "online", self.check_every
        if idle >= self.idle_after:
            return "unavailable", self.check_every
        return "online", max(0.01, min(self.check_every, self.idle_after - idle))


class Activity:
    """A hook for hosts that see their user's input: call `touch()` at each input."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._last = clock()

    def touch(self) -> None:
        self._last = self._clock()

    def __call__(self) -> float:
        return self._clock() - self._last


def command_hook(command: str, timeout: float = 5.0) -> IdleHook:
    """A hook running `command`, which prints the user's idle time in seconds (for instance
    `sh -c 'echo $(($(xprintidle) / 1000))'` on X11). A failing command means "unknown"."""
    args = shlex.split(command)

    def idle_seconds() -> float | None:
        try:
            out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout
            return float(out.strip().split()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    return idle_seconds
