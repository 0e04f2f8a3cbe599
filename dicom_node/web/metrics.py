"""`/metrics`: the node's numbers in Prometheus text format, read from the journal at each scrape.

A custom prometheus_client collector asks the journal database (a read-only SQLite connection of
its own, so a scrape never waits on the node's writer lock) for jobs by state, queue lengths,
failures by stage, instances received by kind and second-check verdicts, and measures the data
folder on disk (at most once a minute: a large spool takes a while to walk). No UIDs, no patient data.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from dicom_node.intake.jobrecord import JobData, JobState
from dicom_node.intake.journal import Journal
from dicom_node.net import uids

DISK_CACHE_SECONDS = 60.0
DISK_PARTS = ("spool", "jobs", "reports", "vault")
STATES = tuple(s.value for s in JobState)


def _size(path: Path) -> int:
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


class NodeCollector(Collector):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._disk: tuple[float, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def _rows(self, sql: str) -> list[tuple[object, ...]]:
        path = self.data_dir / Journal.FILENAME
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def _disk_use(self) -> dict[str, int]:
        with self._lock:
            if self._disk is None or time.monotonic() - self._disk[0] > DISK_CACHE_SECONDS:
                parts = {p: _size(self.data_dir / p) for p in DISK_PARTS}
                parts["total"] = _size(self.data_dir)
                self._disk = (time.monotonic(), parts)
            return dict(self._disk[1])

    def collect(self) -> Iterator[Metric]:
        by_state = dict.fromkeys(STATES, 0)
        verdicts = {"pass": 0, "fail": 0, "inconclusive": 0}
        shard_failures = 0
        for state, data in self._rows("SELECT state, data FROM jobs"):
            by_state[str(state)] = by_state.get(str(state), 0) + 1
            public = JobData.from_json(json.loads(str(data))).public
            if public.verdict in verdicts:
                verdicts[public.verdict] += 1
            shard_failures += public.shard_failures or 0
        jobs = GaugeMetricFamily("mcnode_jobs", "Jobs in each state", labels=["state"])
        for state, n in by_state.items():
            jobs.add_metric([state], n)
        yield jobs
        queue = GaugeMetricFamily("mcnode_queue_length", "Jobs waiting: for the pipeline (READY, SEALED) "
                                  "and for the outbox (MERGED, dose not yet accepted by the TPS)", labels=["queue"])
        queue.add_metric(["pipeline"], by_state[JobState.READY] + by_state[JobState.SEALED])
        queue.add_metric(["outbox"], by_state[JobState.MERGED])
        yield queue
        failures = CounterMetricFamily("mcnode_failures", "FAILED transitions recorded, by the state the job "
                                       "failed in (RUNNING: shards that failed beyond their retries)",
                                       labels=["stage"])
        counts: dict[str, int] = {}
        for (reason,) in self._rows(f"SELECT reason FROM transitions WHERE state = '{JobState.FAILED.value}'"):
            stage = str(reason or "").split(":", 1)[0]
            stage = stage if stage in STATES else "other"
            counts[stage] = counts.get(stage, 0) + 1
        for stage, n in sorted(counts.items()):
            failures.add_metric([stage], n)
        yield failures
        shard = CounterMetricFamily("mcnode_shard_failures", "Failed shard attempts (each one retried on another "
                                    "worker, or failing its job once the retries were used up)")
        shard.add_metric([], shard_failures)
        yield shard
        ingest = CounterMetricFamily("mcnode_instances_received", "DICOM instances received and journaled, by kind",
                                     labels=["kind"])
        kinds: dict[str, int] = {}
        for sop_class, count in self._rows("SELECT sop_class_uid, COUNT(*) FROM instances GROUP BY sop_class_uid"):
            kind = uids.SHORT_NAMES.get(str(sop_class), "other")
            kinds[kind] = kinds.get(kind, 0) + int(str(count))
        for kind, n in sorted(kinds.items()):
            ingest.add_metric([kind], n)
        yield ingest
        second = GaugeMetricFamily("mcnode_secondcheck_verdicts", "Jobs whose latest second check gave this verdict",
                                   labels=["verdict"])
        for verdict, n in verdicts.items():
            second.add_metric([verdict], n)
        yield second
        disk = GaugeMetricFamily("mcnode_data_dir_bytes", "Disk use of node.data_dir by part (total = all)",
                                 labels=["part"])
        for part, n in self._disk_use().items():
            disk.add_metric([part], n)
        yield disk


def registry_for(data_dir: Path) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(data_dir))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
