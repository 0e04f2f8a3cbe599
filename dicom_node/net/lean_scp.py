"""A lean DICOM Upper Layer acceptor for storage only (PS3.8), the alternative to pynetdicom's server.

It owns the listening socket and one thread per association: it reads PDUs straight from the
socket, answers A-ASSOCIATE-RQ with AC or RJ, reassembles P-DATA fragments, parses the small
DIMSE command sets (implicit VR little endian, group 0000) by hand and encodes the replies by hand.
pydicom is used only for the data set, by the same `store_instance` that pynetdicom's handler
calls; pynetdicom's per-message pydicom encoding, its thread hand-offs and its sleep-polling are
what this module exists to avoid (see BENCHMARKS.md, Ingest).

Only C-STORE and C-ECHO are served. Whatever the peer does wrong ends its association (A-ABORT or
a closed socket) with a log line; it never stops the server.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from dicom_node.net import status, uids
from dicom_node.net.scp import IMPLEMENTATION_VERSION, echo_status, log_rejected, uid_ref
from dicom_node.settings import NodeSettings

LOGGER = logging.getLogger(__name__)

# (calling_ae, sop_class, sop_instance, transfer_syntax, raw data set) -> DIMSE status
StoreFunction = Callable[[str, str, str, UID, bytes], int]

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
MAX_ASSOCIATIONS = 32
ACSE_TIMEOUT = 30.0     # seconds to wait for the A-ASSOCIATE-RQ
NETWORK_TIMEOUT = 60.0  # seconds an established association may stay silent
# What we accept in one PDU whatever its header says: peers may exceed the max PDU we announced
# (some do, by a little), which is tolerated, but a length this large is garbage or an attack.
PDU_CAP = 64 * 1024 * 1024
# Before the association is accepted the peer is unknown: an A-ASSOCIATE-RQ is a few kB at most.
ASSOCIATE_RQ_CAP = 1024 * 1024

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_ACSE, RJ_SOURCE_PRESENTATION = 1, 2, 3
RJ_CALLING_AE_NOT_RECOGNIZED = 3
RJ_CALLED_AE_NOT_RECOGNIZED = 7
RJ_PROTOCOL_VERSION_NOT_SUPPORTED = 2
RJ_LOCAL_LIMIT_EXCEEDED = 2

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPTANCE = 0
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ABORT source 2 = service provider; reasons (PS3.8 9.3.8)
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 1, 2, 6

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101

SUPPORTED: dict[str, tuple[str, ...]] = {**uids.STORAGE_CONTEXTS, uids.VERIFICATION: uids.UNCOMPRESSED_SYNTAXES}


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


class PeerGone(Exception):
    """The peer closed the connection."""


# --- A-ASSOCIATE-RQ -----------------------------------------------------------------------------

@dataclass
class PresentationContext:
    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str] = field(default_factory=list)


@dataclass
class AssociateRequest:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[PresentationContext] = field(default_factory=list)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace")


def _items(body: bytes | memoryview, offset: int, end: int):
    """(type, value) of the items between offset and end: 1 byte type, 1 reserved, 2 bytes length."""
    while offset < end:
        if offset + 4 > end:
            raise ProtocolError("truncated item header", ABORT_INVALID_PARAMETER)
        item_type, length = body[offset], struct.unpack_from(">H", body, offset + 2)[0]
        start = offset + 4
        if start + length > end:
            raise ProtocolError(f"item 0x{item_type:02x} runs past its PDU", ABORT_INVALID_PARAMETER)
        yield item_type, bytes(body[start:start + length])
        offset = start + length


def parse_associate_rq(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields", ABORT_INVALID_PARAMETER)
    version = struct.unpack_from(">H", body, 0)[0]
    rq = AssociateRequest(version, body[4:20].decode("ascii", "replace").strip(),
                          body[20:36].decode("ascii", "replace").strip())
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x10:
            rq.application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ProtocolError("presentation context item too short", ABORT_INVALID_PARAMETER)
            pc = PresentationContext(value[0], "")
            for sub_type, sub in _items(value, 4, len(value)):
                if sub_type == 0x30:
                    pc.abstract_syntax = _uid(sub)
                elif sub_type == 0x40:
                    pc.transfer_syntaxes.append(_uid(sub))
            rq.contexts.append(pc)
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0, len(value)):
                if sub_type == 0x51 and len(sub) == 4:
                    rq.max_pdu = struct.unpack(">I", sub)[0]
                elif sub_type == 0x52:
                    rq.implementation_class_uid = _uid(sub)
                elif sub_type == 0x55:
                    rq.implementation_version = sub.decode("ascii", "replace").strip()
                # 0x53 asynchronous operations, 0x54 role selection and anything newer: the defaults
                # (one operation at a time, the requestor as SCU) are what we answer with.
    return rq


def negotiate(contexts: list[PresentationContext]) -> list[tuple[int, int, str]]:
    """(context id, result, transfer syntax) for each proposed context, in the order proposed."""
    out = []
    for pc in contexts:
        # a rejected context's transfer syntax "shall not be tested" (PS3.8 9.3.3.2): echo the first
        first = pc.transfer_syntaxes[0] if pc.transfer_syntaxes else ""
        ours = SUPPORTED.get(pc.abstract_syntax)
        if ours is None:
            out.append((pc.id, PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, first))
            continue
        # our order of preference decides, as in pynetdicom: explicit VR little endian first, so a
        # sender holding explicit VR files need not convert them (nor fail where it cannot)
        chosen = next((ts for ts in ours if ts in pc.transfer_syntaxes), None)
        if chosen is None:
            out.append((pc.id, PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, first))
        else:
            out.append((pc.id, PC_ACCEPTANCE, chosen))
    return out


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def encode_associate_ac(rq_fixed: bytes, results: list[tuple[int, int, str]], max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC; the called/calling AE fields repeat the request's (PS3.8 9.3.3)."""
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for pc_id, result, ts in results:
        items.append(_item(0x21, struct.pack(">BBBB", pc_id, 0, result, 0) + _item(0x40, ts.encode("ascii"))))
    user = (_item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, PYDICOM_IMPLEMENTATION_UID.encode("ascii"))
            + _item(0x55, IMPLEMENTATION_VERSION))
    items.append(_item(0x50, user))
    return _pdu(A_ASSOCIATE_AC, struct.pack(">HH", 1, 0) + rq_fixed[4:36] + bytes(32) + b"".join(items))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def encode_abort(reason: int) -> bytes:
    return _pdu(A_ABORT, bytes((0, 0, 2, reason)))


# --- DIMSE command sets -------------------------------------------------------------------------

def parse_command(raw: bytes) -> dict[int, bytes]:
    """Element number -> value of a group 0000 command set (implicit VR little endian)."""
    out: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset + 8 <= end:
        group, elem, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ProtocolError("command set is not a valid group 0000", ABORT_INVALID_PARAMETER)
        out[elem] = raw[offset:offset + length]
        offset += length
    if offset != end:
        raise ProtocolError("command set ends inside an element", ABORT_INVALID_PARAMETER)
    return out


def _us(command: dict[int, bytes], elem: int) -> int | None:
    value = command.get(elem)
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_response(command_field: int, message_id: int, sop_class: str, code: int,
                    sop_instance: str | None = None) -> bytes:
    """A response command set: group length first, then the elements in tag order."""
    body = b"".join((
        _element(0x0002, _ui(sop_class)),
        _element(0x0100, struct.pack("<H", command_field)),
        _element(0x0120, struct.pack("<H", message_id)),
        _element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _element(0x0900, struct.pack("<H", code)),
        _element(0x1000, _ui(sop_instance)) if sop_instance is not None else b"",
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _p_data(pc_id: int, command: bytes) -> bytes:
    # one PDV, flagged command + last; responses are far smaller than any max PDU a peer can ask for
    return _pdu(P_DATA_TF, struct.pack(">IBB", len(command) + 2, pc_id, 0x03) + command)


# --- the association ----------------------------------------------------------------------------

class Association:
    """One accepted connection, from A-ASSOCIATE-RQ to release, abort or a closed socket."""

    def __init__(self, server: LeanServer, sock: socket.socket, address: str) -> None:
        self.server = server
        self.sock = sock
        self.address = address
        self.calling_ae = "?"
        self.contexts: dict[int, tuple[str, UID]] = {}  # accepted: id -> (abstract syntax, transfer syntax)
        self._command: list[memoryview] = []
        self._data: list[memoryview] = []
        self._pending: tuple[int, dict[int, bytes]] | None = None  # (context id, command) awaiting its data set
        self.admitted = False  # counted against MAX_ASSOCIATIONS

    def _read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            count = self.sock.recv_into(view[got:])
            if count == 0:
                raise PeerGone("connection closed by the peer")
            got += count
        return buf

    def _read_pdu(self, cap: int = PDU_CAP) -> tuple[int, bytearray]:
        pdu_type, _reserved, length = struct.unpack(">BBI", self._read_exact(6))
        if pdu_type not in (A_ASSOCIATE_RQ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT,
                            A_ASSOCIATE_AC, A_ASSOCIATE_RJ):
            raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02x}", ABORT_UNRECOGNIZED_PDU)
        if length > cap:
            raise ProtocolError(f"PDU of {length} bytes refused", ABORT_INVALID_PARAMETER)
        return pdu_type, self._read_exact(length)

    def run(self) -> None:
        try:
            self.sock.settimeout(ACSE_TIMEOUT)
            if self.server.ssl_context is not None:
                self.sock = self.server.ssl_context.wrap_socket(self.sock, server_side=True)
            if not self._associate():
                return
            self.sock.settimeout(NETWORK_TIMEOUT)
            self._serve()
        except ProtocolError as exc:
            LOGGER.warning("association from %s (%s) aborted: %s", self.calling_ae, self.address, exc)
            self._send_quietly(encode_abort(exc.reason))
        except PeerGone:
            LOGGER.info("association from %s (%s): connection closed by the peer", self.calling_ae, self.address)
        except TimeoutError:
            LOGGER.warning("association from %s (%s) aborted: the peer went silent", self.calling_ae, self.address)
            self._send_quietly(encode_abort(0))
        except (OSError, ssl.SSLError) as exc:
            if not self.server.stopping.is_set():
                LOGGER.warning("association from %s (%s) ended: %s", self.calling_ae, self.address, exc)
        finally:
            self.sock.close()

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _reject(self, result: int, source: int, reason: int) -> None:
        self.sock.sendall(encode_associate_rj(result, source, reason))
        # let the peer read the RJ and close first, so that our close does not reset it away
        try:
            self.sock.settimeout(2.0)
            self.sock.recv(1)
        except OSError:
            pass

    def _associate(self) -> bool:
        pdu_type, body = self._read_pdu(ASSOCIATE_RQ_CAP)
        if pdu_type != A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
        rq = parse_associate_rq(bytes(body))
        self.calling_ae = rq.calling_ae
        settings = self.server.settings
        if not rq.protocol_version & 0x0001:
            LOGGER.warning("association from %s (%s) rejected: protocol version 0x%04x not supported",
                           rq.calling_ae, self.address, rq.protocol_version)
            self._reject(RJ_PERMANENT, RJ_SOURCE_ACSE, RJ_PROTOCOL_VERSION_NOT_SUPPORTED)
            return False
        if settings.allowed_callers and rq.calling_ae not in settings.allowed_callers:
            log_rejected(rq.calling_ae, self.address)
            self._reject(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE_NOT_RECOGNIZED)
            return False
        if rq.called_ae != settings.ae_title:
            LOGGER.warning("association from %s (%s) rejected: called AE title %r is not ours", rq.calling_ae,
                           self.address, rq.called_ae)
            self._reject(RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLED_AE_NOT_RECOGNIZED)
            return False
        self.admitted = self.server.admit()
        if not self.admitted:
            LOGGER.warning("association from %s (%s) rejected: %d associations already open", rq.calling_ae,
                           self.address, MAX_ASSOCIATIONS)
            self._reject(RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT_EXCEEDED)
            return False
        results = negotiate(rq.contexts)
        proposed = {pc.id: pc.abstract_syntax for pc in rq.contexts}
        self.contexts = {pc_id: (proposed[pc_id], UID(ts)) for pc_id, result, ts in results if result == PC_ACCEPTANCE}
        self.sock.sendall(encode_associate_ac(bytes(body[:36]), results, settings.max_pdu))
        LOGGER.info("association from %s (%s) accepted: %d of %d presentation contexts", rq.calling_ae,
                    self.address, len(self.contexts), len(results))
        return True

    def _serve(self) -> None:
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == P_DATA_TF:
                self._p_data(body)
            elif pdu_type == A_RELEASE_RQ:
                self.sock.sendall(_pdu(A_RELEASE_RP, bytes(4)))
                LOGGER.info("association from %s (%s) released", self.calling_ae, self.address)
                return
            elif pdu_type == A_ABORT:
                LOGGER.info("association from %s (%s) aborted by the peer", self.calling_ae, self.address)
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} in an established association")

    def _p_data(self, body: bytearray) -> None:
        offset, end = 0, len(body)
        while offset < end:
            if offset + 6 > end:
                raise ProtocolError("truncated PDV item", ABORT_INVALID_PARAMETER)
            length, pc_id, header = struct.unpack_from(">IBB", body, offset)
            start, stop = offset + 6, offset + 4 + length
            if length < 2 or stop > end:
                raise ProtocolError("PDV item length does not fit its PDU", ABORT_INVALID_PARAMETER)
            if pc_id not in self.contexts:
                raise ProtocolError(f"P-DATA on presentation context {pc_id}, which was not accepted")
            # a view, not a copy: each PDU has its own buffer, and the data set is joined once below
            fragment = memoryview(body)[start:stop]
            offset = stop
            if header & 0x01:
                if self._pending is not None:
                    raise ProtocolError("a new command arrived before the data set of the previous one")
                self._command.append(fragment)
                if header & 0x02:
                    command = parse_command(b"".join(self._command))
                    self._command.clear()
                    if _us(command, 0x0800) == NO_DATA_SET:
                        self._dispatch(pc_id, command, None)
                    else:
                        self._pending = (pc_id, command)
            else:
                if self._pending is None or self._pending[0] != pc_id:
                    raise ProtocolError("data set fragment without its command")
                self._data.append(fragment)
                if header & 0x02:
                    pending_pc, command = self._pending
                    raw = b"".join(self._data)
                    self._data.clear()
                    self._pending = None
                    self._dispatch(pending_pc, command, raw)

    def _dispatch(self, pc_id: int, command: dict[int, bytes], raw: bytes | None) -> None:
        command_field = _us(command, 0x0100)
        message_id = _us(command, 0x0110)
        if message_id is None:
            raise ProtocolError("command set without MessageID", ABORT_INVALID_PARAMETER)
        abstract_syntax, transfer_syntax = self.contexts[pc_id]
        sop_class = _uid(command.get(0x0002, b"")) or abstract_syntax
        if command_field == C_ECHO_RQ:
            code = echo_status(self.calling_ae)
            self.sock.sendall(_p_data(pc_id, encode_response(C_ECHO_RSP, message_id, sop_class, code)))
        elif command_field == C_STORE_RQ:
            sop_uid = _uid(command.get(0x1000, b""))
            if raw is None:
                raise ProtocolError("C-STORE-RQ without a data set", ABORT_INVALID_PARAMETER)
            if abstract_syntax not in uids.STORAGE_CONTEXTS or sop_class != abstract_syntax:
                LOGGER.warning("C-STORE %s from %s refused: SOP class %s on a %s context", uid_ref(sop_uid),
                               self.calling_ae, sop_class, abstract_syntax)
                code = status.SOP_CLASS_NOT_SUPPORTED
            else:
                code = self.server.store(self.calling_ae, sop_class, sop_uid, transfer_syntax, raw)
            self.sock.sendall(_p_data(pc_id, encode_response(C_STORE_RSP, message_id, sop_class, code, sop_uid)))
        else:
            raise ProtocolError(f"DIMSE command 0x{command_field or 0:04x} is not served here")


# --- the server ---------------------------------------------------------------------------------

class LeanServer:
    """Listens on (host, port) and runs one `Association` thread per connection.

    `server_address` and `shutdown()` match what `Node` uses of pynetdicom's server.
    """

    def __init__(self, settings: NodeSettings, store: StoreFunction,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.store = store
        self.ssl_context = ssl_context
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._associations: set[Association] = set()
        self._admitted = 0
        self._listener = socket.create_server((settings.host, settings.port), backlog=64, reuse_port=False)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"lean-scp-{self.server_address[1]}",
                                          daemon=True)

    def start(self) -> LeanServer:
        self._acceptor.start()
        return self

    def admit(self) -> bool:
        with self._lock:
            if self._admitted >= MAX_ASSOCIATIONS:
                return False
            self._admitted += 1
            return True

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                LOGGER.exception("accepting a connection failed")
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assoc = Association(self, conn, f"{addr[0]}:{addr[1]}")
            thread = threading.Thread(target=self._run, args=(assoc,), daemon=True, name=f"lean-assoc-{addr[1]}")
            with self._lock:
                self._threads.add(thread)
                self._associations.add(assoc)
            thread.start()

    def _run(self, assoc: Association) -> None:
        try:
            assoc.run()
        except Exception:  # noqa: BLE001 - a bug in one association must not take the server down
            LOGGER.exception("association from %s (%s) failed", assoc.calling_ae, assoc.address)
        finally:
            with self._lock:
                self._associations.discard(assoc)
                self._threads.discard(threading.current_thread())
                if assoc.admitted:
                    self._admitted -= 1

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the listening socket, end open associations and join their threads."""
        self.stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout)
        with self._lock:
            associations, threads = list(self._associations), list(self._threads)
        for assoc in associations:
            try:
                assoc.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout)
