"""One thread that handles queued items in order: the shape shared by assembler, pipeline and second check.

Producers (C-STORE handlers, timers, other stages) only `put`; the thread calls `handle(item)` for
each item, so no two items of one stage ever run at once. When nothing has arrived for
`idle_seconds`, `on_idle()` runs (used to take up jobs put back by `mcnode retry` from another
process). An exception from `handle` is passed to `on_error(item, exc)` and the thread carries on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

LOGGER = logging.getLogger(__name__)

_STOP = object()


class QueueWorker:
    def __init__(self, name: str, handle: Callable[[Any], object], *,
                 on_error: Callable[[Any, Exception], None] | None = None,
                 on_idle: Callable[[], None] | None = None, idle_seconds: float | None = None) -> None:
        self.name = name
        self._handle = handle
        self._on_error = on_error
        self._on_idle = on_idle
        self._idle_seconds = idle_seconds
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=timeout)

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """For tests and tools: wait until every queued item has been handled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                if self._on_idle is not None:
                    try:
                        self._on_idle()
                    except Exception:  # noqa: BLE001 - the thread must survive
                        LOGGER.exception("%s: idle check failed", self.name)
                continue
            try:
                if item is _STOP:
                    return
                self._handle(item)
            except Exception as exc:  # noqa: BLE001 - one item's bug must not stop the thread
                LOGGER.exception("%s failed on %s", self.name, item[0] if isinstance(item, tuple) else item)
                if self._on_error is not None:
                    self._on_error(item, exc)
            finally:
                self._queue.task_done()
