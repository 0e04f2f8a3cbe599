"""The Backend abstraction: run every shard task of a job, all at once, with retries and deadlines.

A backend starts, feeds and collects all of its workers concurrently: the cost of adding a node is
not paid one node after another (the flsshd proof of concept's beta). A failed shard (non-zero
exit, lost connection, deadline passed) is retried on another worker up to `retries` times; when a
shard still fails, `run` raises DispatchError naming it, and the caller never merges a partial set.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from cloud.worker import ShardTask

ProgressCallback = Callable[[ShardTask], None]


class Backend(ABC):
    name = "abstract"

    def __init__(self, retries: int = 2, deadline_s: float = 3600.0) -> None:
        self.retries = retries
        self.deadline_s = deadline_s
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop every worker of a running `run`, which then raises Cancelled."""
        self.cancelled.set()

    @abstractmethod
    def run(self, tasks: list[ShardTask], key: bytes, on_done: ProgressCallback | None = None) -> None:
        """Run every task to completion (results land at each task's result_uri) or raise DispatchError."""

    def workers(self) -> int:
        """How many shards can run at the same time."""
        return 1
