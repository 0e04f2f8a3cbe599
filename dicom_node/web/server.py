"""The web page's server: uvicorn on a thread of the node process, HTTPS with the node's certificate.

The listening socket is bound here, before the thread starts, so a port already in use stops
`mcnode serve` at start with a clear message instead of failing later inside the thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from dicom_node.errors import NodeError
from dicom_node.intake.journal import Journal
from dicom_node.settings import Settings
from dicom_node.web.app import build_context, create_app

LOGGER = logging.getLogger(__name__)


class WebServer:
    def __init__(self, settings: Settings, journal: Journal, pipeline: Any = None, outbox: Any = None) -> None:
        self.settings = settings
        web, tls = settings.web, settings.node.tls
        self.https = bool(web.tls and tls.enabled)
        self.context = build_context(settings, journal, pipeline, outbox, https=self.https)
        self.app = create_app(self.context)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port: int | None = None

    @classmethod
    def for_node(cls, node: Any) -> WebServer:
        return cls(node.settings, node.journal, node.pipeline, node.outbox)

    @property
    def url(self) -> str:
        host = self.settings.web.host
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.https else 'http'}://{shown}:{self.port}/"

    def start(self) -> WebServer:
        web, tls = self.settings.web, self.settings.node.tls
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((web.host, web.port))
        except OSError as exc:
            sock.close()
            raise NodeError(f"web.port: cannot listen on {web.host}:{web.port}: {exc.strerror}") from exc
        sock.listen(64)
        sock.set_inheritable(True)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app, log_config=None, lifespan="off", server_header=False, date_header=True,
            ssl_certfile=str(tls.cert_file) if self.https else None,
            ssl_keyfile=str(tls.key_file) if self.https else None,
            timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise NodeError("the web server did not start (see the log above)")
            time.sleep(0.02)
        LOGGER.info("web page on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
