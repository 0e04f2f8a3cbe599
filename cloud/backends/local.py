"""The local backend: worker processes on the clinic server itself (the default).

Each shard runs as `python -m cloud.worker` with the data key on its standard input — the same
command the ssh and AWS backends run remotely — so a shard can be killed at its deadline and a
crash in the engine cannot take the node down.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace

from cloud.backends.base import Backend, ProgressCallback
from cloud.errors import Cancelled, DispatchError
from cloud.worker import ShardTask

LOGGER = logging.getLogger(__name__)


@dataclass
class _Running:
    task: ShardTask
    proc: subprocess.Popen[bytes]
    started: float
    attempt: int


class LocalBackend(Backend):
    name = "local"

    def __init__(self, retries: int = 2, deadline_s: float = 3600.0, max_workers: int | None = None,
                 python: str | None = None) -> None:
        super().__init__(retries, deadline_s)
        self.max_workers = max_workers or os.cpu_count() or 1
        self.python = python or sys.executable

    def workers(self) -> int:
        return self.max_workers

    def _start(self, task: ShardTask, key: bytes, attempt: int) -> _Running:
        proc = subprocess.Popen([self.python, "-m", "cloud.worker", *task.argv()], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(key.hex().encode() + b"\n")
        proc.stdin.close()
        return _Running(task, proc, time.monotonic(), attempt)

    def run(self, tasks: list[ShardTask], key: bytes, on_done: ProgressCallback | None = None) -> None:
        concurrent = min(self.max_workers, len(tasks)) or 1
        threads = max(1, (os.cpu_count() or 1) // concurrent)
        waiting = [(replace(t, threads=t.threads or threads), 0) for t in tasks]
        running: list[_Running] = []
        try:
            while waiting or running:
                while waiting and len(running) < concurrent:
                    task, attempt = waiting.pop(0)
                    running.append(self._start(task, key, attempt))
                if self.cancelled.wait(0.05):
                    raise Cancelled("stopped: the node is shutting down")
                for r in list(running):
                    code = r.proc.poll()
                    overdue = time.monotonic() - r.started > self.deadline_s
                    if code is None and not overdue:
                        continue
                    running.remove(r)
                    if code == 0:
                        r.proc.stderr.close() if r.proc.stderr else None
                        if on_done:
                            on_done(r.task)
                        continue
                    if overdue:
                        r.proc.kill()
                        r.proc.wait()
                        why = f"passed its deadline of {self.deadline_s:g} s"
                    else:
                        err = r.proc.stderr.read().decode(errors="replace").strip() if r.proc.stderr else ""
                        why = f"exited with {code}: {err.splitlines()[-1] if err else 'no message'}"
                    if r.proc.stderr:
                        r.proc.stderr.close()
                    LOGGER.warning("job %s shard %d (attempt %d) %s", r.task.job_id, r.task.index, r.attempt + 1, why)
                    if r.attempt >= self.retries:
                        raise DispatchError(f"shard {r.task.index} failed {r.attempt + 1} time(s); last: {why}")
                    waiting.append((r.task, r.attempt + 1))
        finally:
            for r in running:
                r.proc.kill()
                r.proc.wait()
                if r.proc.stderr:
                    r.proc.stderr.close()
