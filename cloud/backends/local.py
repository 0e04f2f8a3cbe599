"""The local backend: worker processes on the clinic server itself (the default).

Each shard runs as `python -m cloud.worker` with the data key on its standard input — the same
command the ssh and AWS backends run remotely — so a shard can be killed at its deadline and a
crash in the engine cannot take the node down. Retries and deadlines: base.Backend.run.

By default one shard runs at a time with every core (`[cloud] local_workers = 1`), as bare MCsquare
would run: one engine process holds the CT (half the memory of two), and no core idles while a
shard that got less CPU than its sibling finishes. More workers run shards side by side, the cores
split between them. A first wave's few short shards, there only to measure the spread between shards
(`small`), run side by side whatever `local_workers` says, a core each: one after the other, each
would wait for the other's worker and engine start for a few seconds of compute.

The shards of one job open the sealed bundle once (the first one to start; `cloud.worker._opened_once`)
in the node's private work folder, which is removed when the job's last wave ends (`release`) or its
run fails; a worker's own scratch folder is removed after its process ends however it ended.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from cloud.backends.base import Attempt, Backend, ProgressCallback
from cloud.worker import ShardTask

LOGGER = logging.getLogger(__name__)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, retries: int = 2, deadline_s: float = 3600.0, max_workers: int = 1,
                 python: str | None = None, work_dir: Path | str | None = None) -> None:
        super().__init__(retries, deadline_s)
        self.max_workers = max(1, max_workers)  # shards at once; each gets cores / shards at once threads
        self._limit = self.max_workers  # this run's shards at once (at_once)
        self.python = python or sys.executable
        # Each worker opens the bundle in a folder of its own under work_dir, removed by us after the
        # process ends however it ended (a SIGKILLed worker cannot clean up after itself).
        self.work_dir = Path(work_dir) if work_dir is not None else None

    def _folder(self, a: Attempt) -> Path | None:
        if self.work_dir is None:
            return None
        return self.work_dir / f"{a.task.job_id}-shard{a.task.index}-try{a.number}"

    def _clean(self, a: Attempt) -> None:
        folder = self._folder(a)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _shared(self, job_id: str) -> Path | None:
        """Where the job's shards open its bundle once (cloud.worker._opened_once); None: each its own."""
        return None if self.work_dir is None else self.work_dir / f"{job_id}-bundle"

    def release(self, job_id: str) -> None:
        shared = self._shared(job_id)
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)

    def run(self, tasks: list[ShardTask], key: bytes, on_done: ProgressCallback | None = None, *,
            small: bool = False) -> None:
        try:
            super().run(tasks, key, on_done, small=small)
        except BaseException:
            if tasks:  # a failed or stopped run ends its job's compute: no later wave reads the opened bundle
                self.release(tasks[0].job_id)
            raise

    def workers(self) -> int:
        return self.max_workers

    def at_once(self, tasks: list[ShardTask], small: bool) -> int:
        # A first wave's few short shards side by side, a core each: one at a time, each would wait for
        # the other's worker and engine start (0.5-1 s each for a head CT), for a few seconds of compute.
        self._limit = max(self.max_workers, min(len(tasks), os.cpu_count() or 1)) if small else self.max_workers
        return self._limit

    def _open(self, tasks: list[ShardTask], key: bytes) -> list[ShardTask]:
        concurrent = min(self._limit, len(tasks)) or 1
        if concurrent == 1:  # one shard at a time: the engine's own "every core" (0), as bare MCsquare runs
            return tasks
        threads = max(1, (os.cpu_count() or 1) // concurrent)  # the cores shared by the shards at once
        return [replace(t, threads=t.threads or threads) for t in tasks]

    def _start(self, attempts: list[Attempt], room: int, key: bytes) -> list[Attempt]:
        for a in attempts[:room]:
            folder = self._folder(a)
            extra = ["--work-dir", str(folder)] if folder is not None else []
            shared = self._shared(a.task.job_id)
            extra += ["--shared-dir", str(shared)] if shared is not None else []
            proc = subprocess.Popen([self.python, "-m", "cloud.worker", *a.task.argv(), *extra], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            a.handle, a.started = proc, time.monotonic()
            assert proc.stdin is not None
            try:
                proc.stdin.write(key.hex().encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:  # it ended before reading the key; _poll reports its exit status
                pass
        return attempts[:room]

    def _poll(self, running: list[Attempt]) -> list[tuple[Attempt, str | None]]:
        ended: list[tuple[Attempt, str | None]] = []
        for a in running:
            proc: subprocess.Popen[bytes] = a.handle
            code = proc.poll()
            if code is None:
                continue
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr and code else ""
            if proc.stderr:
                proc.stderr.close()
            self._clean(a)
            ended.append((a, None if code == 0 else
                          f"exited with {code}: {err.splitlines()[-1] if err else 'no message'}"))
        return ended

    def _stop(self, attempts: list[Attempt], reason: str) -> None:
        for a in attempts:
            proc: subprocess.Popen[bytes] = a.handle
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
            self._clean(a)
