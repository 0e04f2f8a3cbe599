"""Split a job into shard tasks, run them on a backend, and collect every tally.

A shard is (job, index, primaries, seed); every shard simulates the whole plan with its own seed.
Shards whose sealed result already exists and opens are not run again, so a job interrupted while
RUNNING re-attaches to the work already done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from anonymizer.errors import AnonymizerError
from cloud.backends.base import Backend
from cloud.errors import CloudError, DispatchError
from cloud.stores.base import store_for
from cloud.worker import ShardTask, load_result

LOGGER = logging.getLogger(__name__)

BASE_SEED = 1000


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
