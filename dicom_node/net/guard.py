"""pynetdicom's association server, hardened against hostile or broken clients.

pynetdicom gives each connection a thread and a state machine with timers, but its timers are
checked between PDUs and each socket read has its own timeout: a client sending one byte per second
never trips them, and nothing limits how many connections exist. Around it, this module adds:

- **Caps**: at most `max_associations` connections at once and `max_associations_per_peer` from one
  address; a connection over a cap is closed at once, with a log line (throttled).
- **Set-up deadline (ARTIM)**: a connection whose association is not established within
  `association_setup_seconds` of the TCP accept is closed, however slowly the bytes trickle in.
- **Idle deadline**: an established association with no complete PDU for `idle_timeout_seconds` is
  closed (also a PDU dripped in byte by byte).
- **PDU size**: a P-DATA-TF longer than the maximum we advertised, or any other PDU over 1 MiB, is
  answered with A-ABORT and the connection closed before the body is read.
- **Descriptors**: sockets are polled with poll(), not select() (which fails on descriptors >= 1024);
  the accept loop backs off when the process is out of descriptors and logs that once per interval.
- **TLS**: the handshake runs in the connection's own thread under the set-up deadline, not in the
  accept loop (where one silent client would stop every other connection).

Closing is done by shutting the socket down: the blocked read returns, pynetdicom sees the
connection closed and ends the association the usual way.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import AddressInformation, AssociationSocket, RequestHandler, ThreadedAssociationServer

LOGGER = logging.getLogger(__name__)

# Non-P-DATA PDUs (association request with 128 contexts is ~20 kB) are never larger than this.
MAX_CONTROL_PDU = 1 << 20
P_DATA_TF = 0x04
# A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value)
A_ABORT_INVALID_PARAMETER = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 2, 6)
# How long the accept loop rests when the process has no descriptor left, and how often it says so.
ACCEPT_BACKOFF_SECONDS = 0.5
LOG_INTERVAL_SECONDS = 10.0
WATCH_INTERVAL_SECONDS = 0.2


class _Throttled:
    """One log line per key and interval; the lines held back are counted in the next one."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < self.interval:
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._last[key] = now
        LOGGER.log(level, msg + (f" ({held} more like this in the last {self.interval:g} s)" if held else ""),
                   *args)


class PollingSocket(AssociationSocket):
    """pynetdicom's socket with poll() instead of select(), which fails on descriptors >= 1024."""

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            events = poller.poll(0)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if isinstance(sock, ssl.SSLSocket):
            return bool(events) or bool(sock.pending())
        return bool(events)


class GuardedSocket(PollingSocket):
    """An acceptor's socket that refuses PDUs larger than we accept before reading their body.

    pynetdicom reads each PDU as recv(6) for type and length, then recv(length): the header is kept
    here, and a body read for a PDU over the limit answers A-ABORT, closes the connection and
    returns nothing (pynetdicom then sees the connection closed).
    """

    max_p_data: int = 0  # 0 = no limit (node.max_pdu = 0)
    _header: bytes = b""

    def recv(self, nr_bytes: int) -> bytearray:
        if self._header:
            pdu_type, length = self._header[0], struct.unpack(">I", self._header[2:6])[0]
            self._header = b""
            limit = self.max_p_data if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
            if limit and length > limit:
                peer = _peer_of(self)
                LOGGER.warning("connection from %s aborted: PDU type 0x%02X of %d bytes is larger than the "
                               "%d bytes we accept", peer, pdu_type, length, limit)
                self._refuse()
                return bytearray()
            return super().recv(nr_bytes)
        data = super().recv(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            self._header = bytes(data)
        return data

    def _refuse(self) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.sendall(A_ABORT_INVALID_PARAMETER)
        except OSError:
            pass
        _shutdown(sock)


def _peer_of(sock: AssociationSocket) -> str:
    try:
        return str(sock.assoc.requestor.address)
    except Exception:  # noqa: BLE001 - only for a log line
        return "?"


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class PollingAE(AE):
    """An AE whose requestor (SCU) sockets poll instead of select: the outbox keeps working while
    the node holds 1024 descriptors or more."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = PollingSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


@dataclass(frozen=True)
class GuardLimits:
    max_associations: int = 32
    max_per_peer: int = 8
    setup_seconds: float = 10.0
    idle_seconds: float = 60.0
    max_pdu: int = 262144


@dataclass
class _Conn:
    sock: socket.socket
    peer: str
    opened: float
    last_activity: float
    assoc: Association | None = None
    established: bool = False
    closing: bool = False


class ConnectionGuard:
    """Counts connections per peer, enforces the caps and both deadlines (one watchdog thread)."""

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="association-watchdog", daemon=True)
        self.log = _Throttled()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def admit(self, sock: socket.socket, peer: str) -> bool:
        """True when the connection may proceed; False: the caller closes it."""
        now = time.monotonic()
        with self._lock:
            total = len(self._conns)
            mine = sum(1 for c in self._conns.values() if c.peer == peer)
            if total >= self.limits.max_associations:
                why = f"{total} connections open (node.max_associations)"
            elif mine >= self.limits.max_per_peer:
                why = f"{mine} connections open from this address (node.max_associations_per_peer)"
            else:
                self._conns[id(sock)] = _Conn(sock, peer, now, now)
                return True
        self.log.log(f"cap:{peer}", logging.WARNING, "connection from %s closed: %s", peer, why)
        return False

    def attach(self, sock: socket.socket, assoc: Association) -> None:
        with self._lock:
            conn = self._conns.get(id(sock))
            if conn is not None:
                conn.assoc = assoc

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.pop(id(sock), None)

    def _find(self, assoc: Association) -> _Conn | None:
        for conn in self._conns.values():
            if conn.assoc is assoc:
                return conn
        return None

    def on_activity(self, event: Event) -> None:
        with self._lock:
            conn = self._find(event.assoc)
            if conn is not None:
                conn.last_activity = time.monotonic()

    def on_established(self, event: Event) -> None:
        with self._lock:
            conn = self._find(event.assoc)
            if conn is not None:
                conn.established = True
                conn.last_activity = time.monotonic()

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_PDU_RECV, self.on_activity), (evt.EVT_PDU_SENT, self.on_activity),
                (evt.EVT_ACCEPTED, self.on_established)]

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_SECONDS):
            now = time.monotonic()
            to_close: list[tuple[_Conn, str]] = []
            with self._lock:
                for key, conn in list(self._conns.items()):
                    if conn.assoc is not None and conn.assoc.ident is not None and not conn.assoc.is_alive():
                        del self._conns[key]  # the association ended: its thread is gone
                        continue
                    if conn.closing:
                        continue
                    if not conn.established and now - conn.opened > self.limits.setup_seconds:
                        why = (f"no association after {self.limits.setup_seconds:g} s "
                               "(node.association_setup_seconds)")
                    elif conn.established and now - conn.last_activity > self.limits.idle_seconds:
                        why = f"idle for {self.limits.idle_seconds:g} s (node.idle_timeout_seconds)"
                    else:
                        continue
                    conn.closing = True
                    to_close.append((conn, why))
            for conn, why in to_close:
                self.log.log(f"deadline:{conn.peer}", logging.WARNING, "connection from %s closed: %s",
                             conn.peer, why)
                _shutdown(conn.sock)
                if conn.assoc is None:
                    # never handed to pynetdicom (e.g. stuck in the TLS handshake): nobody else closes it
                    try:
                        conn.sock.close()
                    except OSError:
                        pass
            with self._lock:  # a connection whose socket was closed and never got an association
                for key, conn in list(self._conns.items()):
                    if conn.closing and conn.assoc is None and now - conn.opened > 2 * self.limits.setup_seconds:
                        del self._conns[key]


class GuardedHandler(RequestHandler):
    """pynetdicom's request handler, with our socket class and the guard told about the association."""

    server: GuardedServer

    def handle(self) -> None:
        guard = self.server.guard
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(guard.limits.setup_seconds)
            try:
                sock.do_handshake()
            except (OSError, ValueError) as exc:
                guard.log.log(f"tls:{self.client_address[0]}", logging.WARNING,
                              "connection from %s closed: TLS handshake failed: %s", self.client_address[0], exc)
                guard.forget(sock)
                _shutdown(sock)
                sock.close()
                return
            sock.settimeout(None)
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Same object, our subclass: poll() instead of select(), and the PDU size check. The subclass
        # adds no state of its own beyond class-level defaults, so switching the class is safe.
        sock = assoc.dul.socket
        assert sock is not None  # the association was made for this request's socket
        sock.__class__ = GuardedSocket
        sock.max_p_data = self.server.guard.limits.max_pdu  # type: ignore[attr-defined]  # GuardedSocket's
        self.server.guard.attach(self.request, assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """The threaded association server with the connection guard in front of it."""

    daemon_threads = True

    def __init__(self, ae: AE, address: tuple[str, int], guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None, evt_handlers: list[Any]) -> None:
        self.guard = guard
        self._accept_log = _Throttled()
        super().__init__(ae, address, ae.ae_title, ae.supported_contexts, ssl_context,
                         [*evt_handlers, *guard.handlers()], request_handler=GuardedHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        try:
            client, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays in the kernel's backlog; trying again at once would spin.
                self._accept_log.log("accept", logging.ERROR, "cannot accept connections: %s; retrying every "
                                     "%g s", exc.strerror or exc, ACCEPT_BACKOFF_SECONDS)
                time.sleep(ACCEPT_BACKOFF_SECONDS)
            raise
        client.settimeout(None)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(request, str(client_address[0]))

    def shutdown_request(self, request: Any) -> None:
        self.guard.forget(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self.guard.stop()


def start_guarded_server(ae: AE, address: tuple[str, int], limits: GuardLimits,
                         ssl_context: ssl.SSLContext | None, evt_handlers: list[Any]) -> GuardedServer:
    """Bind, start the accept loop and the watchdog in background threads; return the server."""
    guard = ConnectionGuard(limits)
    server = GuardedServer(ae, address, guard, ssl_context, evt_handlers)
    guard.start()
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes itself from this list
    return server
