"""Workers shared fairly by the jobs that run at the same time (`[cloud] max_concurrent_jobs` > 1).

Every job's `Backend.run` asks its `FairShare` how many shards it may start now (`room`). The
answer comes from max-min fair shares ("water-filling") of the backend's slots, computed afresh at
every ask from what each job has running and waiting:

- priority classes first: jobs of a more urgent class (interactive: a planner waits at the TPS)
  are served before those of a less urgent one (batch: automatic second checks), which get what is
  left;
- within a class, equal shares: a job is given at most `slots / jobs` (more when another job needs
  less than its share), the smaller job first when slots do not divide evenly.

Nothing is pre-empted: a job above its share keeps the shards it started but starts no new one
until it is below its share, so a small plan sent after a big one gets its share as the big job's
shards end (one shard duration at most) and finishes first. Round-robin shares rather than
shortest-remaining-first: shortest-first would let a steady stream of small plans starve a big one
indefinitely, while equal shares bound every job's wait and still let small jobs finish early.

Places (an ssh host's slots) are booked here too, so that two jobs' backends never put more shards
on one host than it has slots, whatever connections each job opened.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from itertools import count

PRIORITIES = {"interactive": 0, "normal": 1, "batch": 2}


@dataclass
class _Entry:
    priority: int
    seq: int
    running: int = 0
    pending: int = 0

    @property
    def demand(self) -> int:
        return self.running + self.pending


class FairShare:
    """The slots of one backend, shared by the jobs running on it (thread-safe)."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self._jobs: dict[str, _Entry] = {}
        self._places: dict[str, int] = {}
        self._seq = count()
        self._lock = threading.Lock()

    def join(self, job_id: str, priority: str | int = "normal") -> None:
        rank = PRIORITIES[priority] if isinstance(priority, str) else int(priority)
        with self._lock:
            self._jobs[job_id] = _Entry(rank, next(self._seq))

    def leave(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def targets(self) -> dict[str, int]:
        """Each job's fair share of the slots now (water-filling by class, smaller demand first)."""
        with self._lock:
            return self._targets()

    def _targets(self) -> dict[str, int]:
        budget = self.slots
        out: dict[str, int] = {}
        for rank in sorted({e.priority for e in self._jobs.values()}):
            group = sorted(((jid, e) for jid, e in self._jobs.items() if e.priority == rank),
                           key=lambda je: (je[1].demand, je[1].seq))
            for i, (jid, e) in enumerate(group):
                fair = -(-budget // (len(group) - i))  # an equal split of what is left, rounded up
                out[jid] = min(e.demand, fair)
                budget -= out[jid]
        return out

    def room(self, job_id: str, running: int, pending: int, limit: int) -> int:
        """How many of its `pending` shards the job may start now (at most `limit`); they count as
        running from here on, until the job's next call says how many really run."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return max(0, min(limit, pending))
            entry.running, entry.pending = running, pending
            free = self.slots - sum(e.running for e in self._jobs.values())
            grant = max(0, min(limit, pending, free, self._targets()[job_id] - running))
            entry.running += grant
            entry.pending -= grant
            return grant

    # --- places (an ssh host's slots), shared by every job's backend ----------------------

    def free_at(self, place: str, capacity: int) -> bool:
        with self._lock:
            return self._places.get(place, 0) < capacity

    def book(self, place: str, capacity: int) -> bool:
        """Take one of the `capacity` slots of `place` if one is free."""
        with self._lock:
            if self._places.get(place, 0) >= capacity:
                return False
            self._places[place] = self._places.get(place, 0) + 1
            return True

    def release(self, place: str) -> None:
        with self._lock:
            left = self._places.get(place, 0) - 1
            if left > 0:
                self._places[place] = left
            else:
                self._places.pop(place, None)
