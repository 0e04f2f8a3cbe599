"""The running node: SCP, spool, journal and assembler wired together, started and stopped as one.

`Node.start()` binds the port and returns; `serve_forever()` is the `mcnode serve` foreground loop
that stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable

from dicom_node.intake.assembler import Assembler
from dicom_node.intake.checks import InputCheck
from dicom_node.intake.journal import Job, Journal
from dicom_node.intake.spool import Spool
from dicom_node.jobs.outbox import Outbox
from dicom_node.jobs.pipeline import Pipeline
from dicom_node.jobs.retention import RetentionWorker
from dicom_node.net.guard import GuardedServer, start_guarded_server
from dicom_node.net.scp import Received, build_ae, guard_limits, server_ssl_context, store_handlers
from dicom_node.qa.secondcheck import SecondCheck
from dicom_node.settings import Settings

LOGGER = logging.getLogger(__name__)


class Node:
    """The node. With `compute=False` it only receives and assembles (jobs stop at READY)."""

    def __init__(self, settings: Settings, on_ready: Callable[[Job], None] | None = None,
                 compute: bool = True) -> None:
        self.settings = settings
        data_dir = settings.node.data_dir
        self.journal = Journal.open(data_dir)
        self.spool = Spool(data_dir / "spool", fsync=settings.node.fsync)
        # Plans are checked against the engine (and its beam models) on arrival, CT when assembled.
        # With compute, a plan from a sender the dose cannot go back to is refused on arrival too.
        check = InputCheck(settings.engine, returns_to=settings.destination_for if compute else None)
        self.assembler = Assembler(self.journal, settings.trigger, on_ready, check=check)
        self.pipeline: Pipeline | None = None
        self.outbox: Outbox | None = None
        self.secondcheck: SecondCheck | None = None
        self.retention: RetentionWorker | None = None
        if compute:
            # The second check runs after the MC dose is delivered (SENT), or when a TPS dose arrives later.
            if settings.secondcheck.enabled:
                self.secondcheck = SecondCheck(settings, self.journal)
            self.outbox = Outbox(settings, self.journal,
                                 on_sent=self.secondcheck.submit if self.secondcheck is not None else None)
            self.pipeline = Pipeline(settings, self.journal, on_merged=self.outbox.submit)
            self.assembler.add_ready_listener(self.pipeline.submit)
            self.retention = RetentionWorker(settings, self.journal)
        self._server: GuardedServer | None = None
        self.port: int | None = None

    def start(self) -> int:
        """Start receiving; return the bound port (useful when the config says port 0)."""
        node = self.settings.node
        if not node.allowed_callers:
            LOGGER.warning("node.allowed_callers is empty: any calling AE title may send data")
        LOGGER.info("settings: %s", self.settings.masked())
        if self.outbox is not None and self.pipeline is not None:
            self.outbox.start()
            self.pipeline.start()
        if self.secondcheck is not None:
            self.secondcheck.start()
        self.assembler.start()
        if self.retention is not None:
            self.retention.start()
        self._server = start_guarded_server(
            build_ae(node), (node.host, node.port), guard_limits(node), server_ssl_context(node),
            store_handlers(self.spool, self.journal, self._notify))
        self.port = int(self._server.server_address[1])
        LOGGER.info("%s listening on %s:%d%s", node.ae_title, node.host, self.port,
                    " (TLS)" if node.tls.enabled else "")
        # What exists once the node runs (modules, settings, servers: ~140 000 objects) lives as long
        # as the process: later full collections skip it. pynetdicom's server runs one every 30 s,
        # busy or idle (0.1 s of CPU each on this node before; BENCHMARKS.md, head plan).
        gc.collect()
        gc.freeze()
        return self.port

    def _notify(self, received: Received) -> None:
        self.assembler.notify(received)
        if self.secondcheck is not None:
            self.secondcheck.notify(received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.assembler.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.pipeline is not None and self.outbox is not None:
            self.pipeline.stop()
            self.outbox.stop()
        if self.secondcheck is not None:
            self.secondcheck.stop()
        self.journal.close()
        LOGGER.info("node stopped")

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(settings: Settings) -> None:
    stop = threading.Event()

    def _handle(signum: int, _frame: object) -> None:
        LOGGER.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    node = Node(settings)
    node.start()
    web = None
    try:
        if settings.web.port:
            from dicom_node.web.server import WebServer  # the web stack loads only when the page is on

            web = WebServer.for_node(node).start()
        stop.wait()
    finally:
        if web is not None:
            web.stop()
        node.stop()
