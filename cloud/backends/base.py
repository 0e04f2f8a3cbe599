"""The Backend abstraction: run every shard task of a job, all at once, with retries and deadlines.

`Backend.run` is the one loop every backend shares: it starts shards while the backend has room,
polls them, stops a shard that passed its deadline (`cloud.shard_deadline_seconds`), runs a failed
shard again (elsewhere, where the backend has another place) up to `retries` times
(`cloud.shard_retries`), reports each finished shard to the progress callback, and stops everything
on `cancel()`. When a shard still fails, `run` raises DispatchError naming it, and the caller never
merges a partial set.

A backend only says how to start, poll and stop shards:

- `_open(tasks, key)`: once per run (connect hosts, stage the bundle, store the wrapped key);
- `_start(attempts, room, key)`: start up to `room` of the waiting attempts, in any order (a batch:
  an AWS array job carries several shards in one request; an ssh host avoids shards that failed on
  it), and return those started;
- `_poll(running)`: the attempts that ended, each with None (result collected to its task's
  result_uri) or the reason it failed;
- `_stop(attempts, reason)`: stop attempts that are still running;
- `_close()`: once per run, always (remove what the run left on the workers).

Starting, feeding and collecting happen concurrently on all workers: the cost of adding a node is
not paid one node after another (the flsshd proof of concept's beta).

When several jobs run at once, each job's backend has the same `share` (cloud.backends.share): `run`
then starts only as many shards as the job's fair share allows, by its `priority`.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloud.backends.share import FairShare
from cloud.errors import Cancelled, DispatchError
from cloud.worker import ShardTask

LOGGER = logging.getLogger(__name__)

ProgressCallback = Callable[[ShardTask], None]


@dataclass(eq=False)
class Attempt:
    """One try of one shard. The base fills in task, number and avoid; `_start` sets the rest."""

    task: ShardTask
    number: int = 0                                  # 0: the first try
    avoid: frozenset[str] = frozenset()              # places this shard already failed on
    place: str = ""                                  # where it runs (a host), for logs and `avoid`
    started: float = 0.0                             # time.monotonic() when it started
    handle: Any = field(default=None, repr=False)    # the backend's own (a process, a future, a Batch id)


class Backend(ABC):
    name = "abstract"
    poll_s = 0.05  # how often `run` polls running shards

    def __init__(self, retries: int = 2, deadline_s: float = 3600.0) -> None:
        self.retries = retries
        self.deadline_s = deadline_s
        self.cancelled = threading.Event()
        self.share: FairShare | None = None  # set by the caller when jobs share the workers
        self.priority = "normal"             # interactive | normal | batch, for the share
        self.shard_failures = 0  # failed shard attempts (each retried or ending the run), for the job's record

    def cancel(self) -> None:
        """Stop every worker of a running `run`, which then raises Cancelled."""
        self.cancelled.set()

    def workers(self) -> int:
        """How many shards can run at the same time."""
        return 1

    def release(self, job_id: str) -> None:  # noqa: B027 - a hook: most backends keep nothing between runs
        """The job's last run (wave) has ended: remove what the backend kept for its later runs."""

    # --- what a backend implements --------------------------------------------------------

    def _open(self, tasks: list[ShardTask], key: bytes) -> list[ShardTask]:
        """Prepare a run; return the tasks to run (a backend may fill in e.g. threads)."""
        return tasks

    @abstractmethod
    def _start(self, attempts: list[Attempt], room: int, key: bytes) -> list[Attempt]:
        """Start up to `room` of the waiting `attempts` (setting place, started, handle); return those."""

    @abstractmethod
    def _poll(self, running: list[Attempt]) -> list[tuple[Attempt, str | None]]:
        """The attempts of `running` that ended: None when its result is at its task's result_uri,
        else why it failed."""

    @abstractmethod
    def _stop(self, attempts: list[Attempt], reason: str) -> None:
        """Stop running attempts (their results are not wanted)."""

    def _close(self) -> None:  # noqa: B027 - a hook: most backends have nothing to remove
        """End a run (always called, also after an error, also when `_open` failed half-way)."""

    # --- the one loop ---------------------------------------------------------------------

    def at_once(self, tasks: list[ShardTask], small: bool) -> int:
        """How many of these shards to run at the same time: `workers()`; a backend may run `small`
        ones (a first wave that only measures the spread between shards) side by side beyond it."""
        return self.workers()

    def run(self, tasks: list[ShardTask], key: bytes, on_done: ProgressCallback | None = None, *,
            small: bool = False) -> None:
        """Run every task to completion (results land at each task's result_uri) or raise DispatchError.

        `small`: the tasks are a few short shards, there to measure the spread (`at_once`)."""
        if not tasks:
            return
        if self.cancelled.is_set():
            raise Cancelled("stopped: the node is shutting down")
        running: list[Attempt] = []
        job_id, share = tasks[0].job_id, self.share
        if share is not None:
            share.join(job_id, self.priority)
        limit = self.at_once(tasks, small)
        try:
            pending = [Attempt(t) for t in self._open(tasks, key)]
            while pending or running:
                room = limit - len(running)
                if share is not None:
                    room = share.room(job_id, len(running), len(pending), room)
                if pending and room > 0:
                    started = self._start(list(pending), room, key)
                    now = time.monotonic()
                    for a in started:
                        a.started = a.started or now
                        pending.remove(a)
                    running += started
                if self.cancelled.wait(self.poll_s):
                    raise Cancelled("stopped: the node is shutting down")
                failed: list[tuple[Attempt, str]] = []
                for a, why in self._poll(list(running)):
                    running.remove(a)
                    if why is None:
                        if on_done:
                            on_done(a.task)
                    else:
                        failed.append((a, why))
                now = time.monotonic()
                overdue = [a for a in running if now - a.started > self.deadline_s]
                if overdue:
                    self._stop(overdue, "shard deadline passed")
                    for a in overdue:
                        running.remove(a)
                        failed.append((a, f"passed its deadline of {self.deadline_s:g} s"))
                for a, why in failed:
                    if self.cancelled.is_set():
                        raise Cancelled("stopped: the node is shutting down")
                    where = f" on {a.place}" if a.place else ""
                    self.shard_failures += 1
                    LOGGER.warning("job %s shard %d (attempt %d)%s %s", a.task.job_id, a.task.index, a.number + 1,
                                   where, why)
                    if a.number >= self.retries:
                        raise DispatchError(f"shard {a.task.index} failed {a.number + 1} time(s); "
                                            f"last{where}: {why}")
                    pending.append(Attempt(a.task, a.number + 1, a.avoid | ({a.place} if a.place else set())))
        finally:
            try:
                if running:
                    self._stop(running, "mcnode is stopping" if self.cancelled.is_set() else "another shard failed")
            finally:
                if share is not None:
                    share.leave(job_id)
                self._close()
