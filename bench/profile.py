"""Hot spots of a py-spy profile recorded with `--format raw` (collapsed stacks: one line per stack,
frames separated by ';', then the sample count): where the node spends its time, by function,
both in the function itself (self) and under it (inclusive).

Stacks are split into the reactor thread and the other threads (the store's database thread),
and samples waiting for work (epoll, a thread pool's condition) are counted apart as idle, so
the percentages are of busy time.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LOCATION = re.compile(r"\s*\((?P<file>[^:()]+)(?::\d+)?\)$")
_IDLE = ("EPollReactor.doPoll", "Condition.wait", "Queue.get", "select (", "poll (", "Event.wait")


def _name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (dir/file.py)`, lines folded together."""
    m = _LOCATION.search(frame)
    if not m:
        return frame.strip()
    parts = m["file"].split("/")
    where = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return f"{frame[:m.start()].strip()} ({where})"


class Profile:
    def __init__(self) -> None:
        self.own: Counter = Counter()
        self.inclusive: Counter = Counter()
        self.busy = 0
        self.idle = 0


def load(path: Path) -> dict[str, Profile]:
    """'reactor thread' and 'other threads' profiles."""
    threads = {"reactor thread": Profile(), "other threads": Profile()}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        worker = any(f.startswith("Thread._bootstrap") for f in frames[:3])
        p = threads["other threads" if worker else "reactor thread"]
        if frames[-1].startswith(_IDLE):
            p.idle += n
            continue
        p.busy += n
        p.own[frames[-1]] += n
        for name in set(frames):
            p.inclusive[name] += n
    return threads


def top(path: Path, limit: int = 25) -> str:
    lines = [str(path)]
    for thread, p in load(path).items():
        total = p.busy + p.idle
        if not total:
            continue
        lines += ["", f"== {thread}: {total} samples, busy {100 * p.busy / total:.0f}% "
                      f"(percentages below are of busy samples)", f"{'self %':>7}  function (self time)"]
        lines += [f"{100 * n / p.busy:6.1f}%  {name}" for name, n in p.own.most_common(limit)]
        lines += ["", f"{'incl %':>7}  function (time under it)"]
        lines += [f"{100 * n / p.busy:6.1f}%  {name}" for name, n in p.inclusive.most_common(limit)]
    return "\n".join(lines)
