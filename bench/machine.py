"""How busy the machine was with other work while the bench ran: every half second, the CPU time
of user processes that are not the bench or its children. On a small shared machine another
program's load changes the figures, so each phase reports it."""

from __future__ import annotations

import asyncio
import os
import time



def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every user-space process (kernel threads left out)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid = int(fields[1])
        flags = int(fields[6])
        if flags & 0x00200000 or ppid == 2 or int(name) == 2:  # PF_KTHREAD
            continue
        out[int(name)] = (ppid, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


class LoadMonitor:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.root = os.getpid()
        self.samples: list[tuple[float, float]] = []   # (monotonic time, other processes' CPU share of one core)
        self.exclude: set[int] = set()  # not "other" either: e.g. the PostgreSQL backends of the bench's database
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def _ours(self, procs: dict[int, tuple[int, float]]) -> set[int]:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        ours, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            ours.add(pid)
            todo.extend(children.get(pid, []))
        return ours

    async def _run(self) -> None:
        before = await asyncio.to_thread(_processes)
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = await asyncio.to_thread(_processes)
            t1 = time.monotonic()
            ours = self._ours(now)
            other = 0.0
            for pid, (_, cpu) in now.items():
                if pid in ours or pid in self.exclude:
                    continue
                other += cpu - before[pid][1] if pid in before else cpu if cpu < self.interval * 4 else 0.0
            self.samples.append((t1, max(other, 0.0) / (t1 - t0)))
            before, t0 = now, t1

    async def wait_quiet(self, limit: float, say) -> float | None:
        """Wait (up to `limit` seconds) until other processes have used under 10% of a core for 5 s;
        returns how long that took, or None if the machine never got quiet."""
        say(f"waiting up to {limit:g}s for the machine to be quiet")
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            await asyncio.sleep(1)
            recent = [share for when, share in self.samples if when > time.monotonic() - 5]
            if len(recent) >= 8 and max(recent) < 0.10:
                say(f"quiet after {time.monotonic() - t0:.0f}s")
                return time.monotonic() - t0
        return None

    def since(self, t: float) -> tuple[float, float]:
        """Mean and max share of a core other processes used since monotonic time `t` (in %)."""
        values = [share for when, share in self.samples if when >= t]
        if not values:
            return 0.0, 0.0
        return round(100 * sum(values) / len(values)), round(100 * max(values))

