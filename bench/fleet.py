"""The controller's side of the generator and probe processes: start them, send commands, gather
answers (each within a timeout), and show progress while a command runs."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path

from bench import common
from bench.report import say

_ids = itertools.count(1)


class WorkerError(RuntimeError):
    pass


class Worker:
    """One child speaking JSON lines: commands on its stdin, answers and events on its stdout."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.progress: dict[str, int] = {}
        self._waiting: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._log = None

    async def start(self) -> None:
        self._log = open(self.log_path, "w")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=self._log, env=self.env, limit=1 << 28, preexec_fn=common.child_setup)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process and self.process.stdout
        while True:
            line = await self.process.stdout.readline()
            if not line:
                break
            message = json.loads(line)
            event = message.get("ev")
            if event == "ready":
                self.ready.set()
            elif event == "progress":
                self.progress[message["id"]] = message["done"]
            else:
                future = self._waiting.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        error = WorkerError(f"{self.name} exited ({self.process.returncode}); see {self.log_path}")
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self.ready.set()

    async def call(self, cmd: dict, timeout: float) -> dict:
        cmd = dict(cmd)
        cmd.setdefault("id", f"c{next(_ids)}")
        future = asyncio.get_running_loop().create_future()
        self._waiting[cmd["id"]] = future
        assert self.process and self.process.stdin
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.process.stdin.drain()
        try:
            answer = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise WorkerError(f"{self.name}: {cmd['cmd']} took longer than {timeout:g}s") from None
        if "error" in answer and answer["error"]:
            raise WorkerError(f"{self.name}: {cmd['cmd']} failed: {answer['error']}")
        return answer

    async def stop(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            try:
                self.process.stdin.close()
                await asyncio.wait_for(self.process.wait(), 10)
            except (asyncio.TimeoutError, BrokenPipeError, ConnectionResetError):
                self.process.kill()
                await self.process.wait()
        if self._log:
            self._log.close()


class Fleet:
    """The generators: one command to all of them at once (the same, or one each)."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers

    def __len__(self) -> int:
        return len(self.workers)

    async def start(self, what: str, total: int, timeout: float) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))
        await self._watch(asyncio.gather(*(w.ready.wait() for w in self.workers)), "init", what, total, timeout)
        for w in self.workers:
            if w.process.returncode is not None:
                raise WorkerError(f"{w.name} did not start; see {w.log_path}")

    async def all(self, cmds: dict | list[dict], timeout: float, what: str = "", total: int = 0) -> list[dict]:
        cmds = cmds if isinstance(cmds, list) else [cmds] * len(self.workers)
        cid = f"f{next(_ids)}"
        calls = asyncio.gather(*(w.call({**c, "id": cid}, timeout) for w, c in zip(self.workers, cmds)))
        return await self._watch(calls, cid, what, total, timeout + 5)

    async def _watch(self, awaitable, cid: str, what: str, total: int, timeout: float):
        """Await, printing `what: done/total` every second while it runs."""
        task = asyncio.ensure_future(awaitable)
        t0 = asyncio.get_running_loop().time()
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return task.result()
            elapsed = asyncio.get_running_loop().time() - t0
            if elapsed > timeout:
                task.cancel()
                raise WorkerError(f"{what or cid} took longer than {timeout:g}s")
            if what:
                count = sum(w.progress.get(cid, 0) for w in self.workers)
                say(f"    {what}: {count}/{total}" if total else f"    {what}: {count}", indent=False)

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
