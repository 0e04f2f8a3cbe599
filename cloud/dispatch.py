"""Split a job into shard tasks, run them on a backend, and collect every tally.

A shard is (job, index, primaries, seed); every shard simulates the whole plan with its own seed.
Shards whose sealed result already exists and opens are not run again, so a job interrupted while
RUNNING re-attaches to the work already done.

`dispatch_merged` adds each shard's tally to a StreamingMerge as the shard ends, on a few merger
threads, while the other shards still compute: what is left after the last shard is that tally's
opening and summing and the final division (issue 14; BENCHMARKS.md "Merge as n grows"). Opening
(decrypt, decompress) runs on up to MERGE_THREADS threads at once (zlib and numpy release the
GIL); the sums themselves take turns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from anonymizer.errors import AnonymizerError
from cloud.backends.base import Backend
from cloud.engines.base import Tally
from cloud.errors import CloudError, DispatchError
from cloud.merge import StreamingMerge
from cloud.stores.base import store_for
from cloud.worker import ShardTask, load_result

LOGGER = logging.getLogger(__name__)

BASE_SEED = 1000
MERGE_THREADS = max(1, min(4, os.cpu_count() or 1))  # tallies opened at once (each holds one tally's memory)


def split_primaries(primaries: int, shards: int) -> list[int]:
    """Primaries per shard: as even as possible, summing to the total, none empty."""
    if shards < 1 or primaries < shards:
        raise DispatchError(f"cannot split {primaries} primaries into {shards} shards")
    base, extra = divmod(primaries, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def plan_tasks(job_id: str, shards: int, primaries: int, bundle_uri: str, results_uri: str,
               first_index: int = 0) -> list[ShardTask]:
    """`shards` tasks whose primaries add up to `primaries`; results at `results_uri`/shard-I.tally.

    Shard indices (and so seeds and result names) start at `first_index`: a later wave of the same
    job continues the numbering, so every shard of a job has its own seed.
    """
    return [ShardTask(job_id, i, n, BASE_SEED + i, bundle_uri, f"{results_uri.rstrip('/')}/shard-{i}.tally")
            for i, n in enumerate(split_primaries(primaries, shards), start=first_index)]


def primaries_for_target(done: int, uncertainty_percent: float, target_percent: float, max_primaries: int,
                         shards: int, margin: float = 1.1) -> int:
    """Primaries for the next wave: the standard error falls as 1/sqrt(N), so reaching `target` from
    `uncertainty` after `done` primaries needs done * (u / target)^2 in all; `margin` allows for the
    estimate's own noise. At least one primary per shard and 10 % of what is done; never past
    `max_primaries` (0 when that is reached)."""
    room = max_primaries - done
    if room < shards:
        return 0
    needed = done * (uncertainty_percent / target_percent) ** 2 * margin - done
    return int(min(room, max(needed, 0.1 * done, shards)))


def finished(task: ShardTask, key: bytes) -> bool:
    """True when the shard's sealed result exists and verifies."""
    if not store_for(task.result_uri).exists(task.result_uri):
        return False
    try:
        load_result(task, key)
    except (CloudError, AnonymizerError) as exc:
        LOGGER.warning("job %s shard %d: stored result unusable (%s); running it again", task.job_id,
                       task.index, exc)
        return False
    return True


def dispatch(tasks: list[ShardTask], key: bytes, backend: Backend,
             on_progress: Callable[[int, int], None] | None = None) -> list[bytes]:
    """Run every task not yet finished; return all tallies (opened bytes) in shard order."""
    done = sum(1 for t in tasks if finished(t, key))
    todo = [t for t in tasks if not finished(t, key)] if done else list(tasks)
    if done:
        LOGGER.info("job %s: %d of %d shards already done; running %d", tasks[0].job_id, done, len(tasks),
                    len(todo))
    count = [done]
    if on_progress:
        on_progress(done, len(tasks))

    def _one_done(_task: ShardTask) -> None:
        count[0] += 1
        if on_progress:
            on_progress(count[0], len(tasks))

    if todo:
        backend.run(todo, key, _one_done)
    return [load_result(t, key) for t in tasks]


def dispatch_merged(tasks: list[ShardTask], key: bytes, backend: Backend, acc: StreamingMerge,
                    on_progress: Callable[[int, int], None] | None = None, *, small: bool = False) -> None:
    """Run every task not yet in `acc` (nor finished from an earlier run) and add each one's tally to
    `acc` as it arrives; returns when all of `tasks` are in `acc`. Opening and summing a tally happens
    on merger threads, so the backend's loop keeps starting and polling shards meanwhile; the first
    error of the merger (a result that does not open, a duplicate seed) is raised here. `small`: see
    `Backend.run`."""
    todo: list[ShardTask] = []
    merger = ThreadPoolExecutor(max_workers=MERGE_THREADS, thread_name_prefix="merge")
    adding: list[Future[None]] = []

    def add(task: ShardTask) -> None:
        acc.add(Tally.from_bytes(load_result(task, key)), index=task.index)

    try:
        for t in tasks:
            if t.index in acc:
                continue
            if store_for(t.result_uri).exists(t.result_uri):
                try:
                    add(t)  # re-attach: a shard an earlier run finished
                    continue
                except (CloudError, AnonymizerError) as exc:
                    LOGGER.warning("job %s shard %d: stored result unusable (%s); running it again", t.job_id,
                                   t.index, exc)
            todo.append(t)
        done = len(tasks) - len(todo)
        if done and todo:
            LOGGER.info("job %s: %d of %d shards already done; running %d", tasks[0].job_id, done, len(tasks),
                        len(todo))
        count = [done]
        if on_progress:
            on_progress(done, len(tasks))

        def _one_done(task: ShardTask) -> None:
            adding.append(merger.submit(add, task))
            count[0] += 1
            if on_progress:
                on_progress(count[0], len(tasks))

        if todo:
            backend.run(todo, key, _one_done, small=small)
        for fut in adding:
            fut.result()
    finally:
        merger.shutdown(wait=True, cancel_futures=True)
