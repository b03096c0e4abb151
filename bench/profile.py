"""Hot spots of a py-spy profile recorded with `--format raw` (collapsed stacks: one line per stack,
frames separated by ';', then the sample count): where the node spends its time, by function,
both in the function itself (self) and under it (inclusive)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LOCATION = re.compile(r"\s*\((?P<file>[^:()]+)(?::\d+)?\)$")


def _name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`, lines folded together."""
    m = _LOCATION.search(frame)
    if not m:
        return frame.strip()
    parts = m["file"].split("/")
    where = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return f"{frame[:m.start()].strip()} ({where})"


def load(path: Path) -> tuple[Counter, Counter, int]:
    own, inclusive, total = Counter(), Counter(), 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    return own, inclusive, total


def top(path: Path, limit: int = 25) -> str:
    own, inclusive, total = load(path)
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples", "", f"{'self %':>7}  function (self time)"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in own.most_common(limit)]
    lines += ["", f"{'incl %':>7}  function (time under it)"]
    lines += [f"{100 * n / total:6.1f}%  {name}" for name, n in inclusive.most_common(limit)]
    return "\n".join(lines)
