"""The storage SCP: an AE that accepts exactly the storage classes we handle, and its handlers.

Handlers are small functions that return a named status. The C-STORE handler decodes only what it
needs to file the instance (UIDs, references), writes the encoded data set to the spool as received,
records it in the journal, hands it to the assembler's queue and returns; nothing slow happens here,
because the sender waits for our reply.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, RTDoseStorage, RTStructureSetStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.errors import JournalError, SpoolError
from dicom_node.intake.journal import Instance, Journal
from dicom_node.intake.spool import Spool
from dicom_node.net import status, uids
from dicom_node.net.guard import GuardLimits
from dicom_node.settings import NodeSettings

LOGGER = logging.getLogger(__name__)


class InvalidInstance(ValueError):
    """The data set cannot be filed: the message names the problem; `status` is the reply."""

    def __init__(self, message: str, code: int = status.MISSING_REQUIRED_ATTRIBUTE) -> None:
        super().__init__(message)
        self.status = code


@dataclass(frozen=True)
class Received:
    """What the assembler needs to know about a stored instance."""

    instance: Instance
    refs: list[tuple[str, str]]


def patient_key(patient_id: str) -> str:
    """A stable key that separates patients without storing their ID."""
    return hashlib.sha256(patient_id.encode("utf-8", "replace")).hexdigest()[:24]


def _required(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise InvalidInstance(f"missing required attribute {keyword}")
    return value


def _refs(ds: Dataset, sop_class: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if sop_class in uids.PLAN_CLASSES:
        for item in ds.get("ReferencedStructureSetSequence", []):
            out.append(("structure_set", str(_required(item, "ReferencedSOPInstanceUID"))))
    elif sop_class == RTStructureSetStorage:
        for for_item in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in for_item.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    for image in series.get("ContourImageSequence", []):
                        out.append(("image", str(_required(image, "ReferencedSOPInstanceUID"))))
    elif sop_class == RTDoseStorage:
        for item in ds.get("ReferencedRTPlanSequence", []):
            out.append(("plan", str(_required(item, "ReferencedSOPInstanceUID"))))
    return out


def describe_instance(ds: Dataset, sop_class: str, path: str, calling_ae: str | None) -> Received:
    """Pull the filing information out of a decoded data set, or raise InvalidInstance."""
    ds_class = str(_required(ds, "SOPClassUID"))
    if ds_class != sop_class:
        raise InvalidInstance(f"SOPClassUID {ds_class} does not match the presentation context ({sop_class})",
                              status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    for_uid = ds.get("FrameOfReferenceUID") or None
    if sop_class == CTImageStorage:
        for_uid = str(_required(ds, "FrameOfReferenceUID"))
        position = _required(ds, "ImagePositionPatient")
        if len(position) != 3:
            raise InvalidInstance("ImagePositionPatient must have 3 values")
        if "PixelData" not in ds:
            raise InvalidInstance("missing required attribute PixelData")
    elif sop_class == RTStructureSetStorage and for_uid is None:
        seq = ds.get("ReferencedFrameOfReferenceSequence") or []
        for_uid = str(seq[0].FrameOfReferenceUID) if seq and "FrameOfReferenceUID" in seq[0] else None
    inst = Instance(
        sop_instance_uid=str(_required(ds, "SOPInstanceUID")),
        sop_class_uid=sop_class,
        study_uid=str(_required(ds, "StudyInstanceUID")),
        series_uid=str(_required(ds, "SeriesInstanceUID")),
        for_uid=str(for_uid) if for_uid else None,
        patient_key=patient_key(str(ds.get("PatientID", ""))),
        path=path,
        calling_ae=calling_ae,
        received=time.time(),
    )
    return Received(inst, _refs(ds, sop_class))


# The only CT attributes filing needs; for CT (most of the traffic) nothing else is decoded.
_CT_TAGS = [Tag(k) for k in ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                             "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "ImagePositionPatient")]
_PIXEL_DATA = Tag("PixelData")
IMPLEMENTATION_VERSION = b"MCNODE_010"  # 16 chars at most (SH)


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, group_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, group_elem, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text_value(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_preamble(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, 'DICM' and the file meta group (PS3.10 7.1), encoded directly.

    pydicom's general writer builds and encodes a Dataset for these eight elements, which cost more
    than everything else the handler does; the encoding is fixed, so it is written out here.
    """
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _uid_value(sop_class)),
        _element(0x0003, b"UI", _uid_value(sop_instance)),
        _element(0x0010, b"UI", _uid_value(transfer_syntax)),
        _element(0x0012, b"UI", _uid_value(PYDICOM_IMPLEMENTATION_UID)),
        _element(0x0013, b"SH", _text_value(IMPLEMENTATION_VERSION.decode())),
        _element(0x0016, b"AE", _text_value(source_ae)),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def decode_for_filing(raw: bytes, transfer_syntax: UID, sop_class: str) -> Dataset:
    """Decode the received data set; for CT only the attributes filing needs."""
    if transfer_syntax.is_deflated:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    fp = BytesIO(raw)
    if sop_class == CTImageStorage:
        ds = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          specific_tags=[*_CT_TAGS, _PIXEL_DATA], defer_size=64)
    else:
        ds = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian)
    if fp.tell() != len(raw):
        raise ValueError(f"data set ends after {fp.tell()} of {len(raw)} bytes")
    return ds


def uid_ref(uid: str) -> str:
    """How logs name an original UID: a short hash (UIDs of the clinic's data never appear in logs).

    To find the log lines of a file: python -c "import hashlib;print(hashlib.sha256(b'UID').hexdigest()[:12])"
    """
    return "uid#" + hashlib.sha256(uid.encode()).hexdigest()[:12]


def store_instance(spool: Spool, journal: Journal, notify: Callable[[Received], None], calling_ae: str,
                   sop_class: str, sop_uid: str, transfer_syntax: UID, raw: bytes) -> int:
    """The whole C-STORE: decode what filing needs, spool, journal, notify; return the reply's status.

    Called by pynetdicom's handler (`handle_store`) with plain values, so it can be used without it.
    """
    kind = uids.SHORT_NAMES.get(sop_class, sop_class)
    ref = uid_ref(sop_uid)
    try:
        ds = decode_for_filing(raw, transfer_syntax, sop_class)
        received = describe_instance(ds, sop_class, "", calling_ae)
    except InvalidInstance as exc:
        LOGGER.warning("C-STORE %s %s from %s refused: %s", kind, ref, calling_ae, exc)
        return exc.status
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's data, not our bug
        LOGGER.warning("C-STORE %s %s from %s refused: cannot decode data set: %s: %s",
                       kind, ref, calling_ae, type(exc).__name__, exc)
        return status.CANNOT_DECODE
    if received.instance.sop_instance_uid != sop_uid:
        LOGGER.warning("C-STORE %s from %s refused: SOPInstanceUID differs from the request's %s",
                       kind, calling_ae, ref)
        return status.CANNOT_UNDERSTAND
    try:
        meta = file_preamble(sop_class, sop_uid, transfer_syntax, calling_ae)
        path = spool.store(received.instance.series_uid, sop_uid, meta, raw)
    except SpoolError as exc:
        LOGGER.error("C-STORE %s %s from %s: out of resources: %s", kind, ref, calling_ae, exc)
        return status.OUT_OF_RESOURCES
    inst = Instance(**{**received.instance.__dict__, "path": str(path)})
    try:
        journal.add_instance(inst, received.refs)
    except JournalError as exc:
        LOGGER.error("C-STORE %s %s from %s: cannot record it: %s", kind, ref, calling_ae, exc)
        return status.OUT_OF_RESOURCES
    notify(Received(inst, received.refs))
    LOGGER.debug("stored %s %s from %s", kind, ref, calling_ae)
    return status.SUCCESS


def handle_store(event: Event, spool: Spool, journal: Journal, notify: Callable[[Received], None]) -> int:
    request = event.request
    assert isinstance(request, C_STORE) and request.DataSet is not None  # bound to EVT_C_STORE only
    return store_instance(spool, journal, notify, event.assoc.requestor.ae_title,
                          str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                          event.context.transfer_syntax, request.DataSet.getvalue())


def set_nodelay(event: Event) -> None:
    """Turn off Nagle's algorithm on each connection.

    DIMSE replies are small and the peer waits for each one; with Nagle on they meet delayed ACKs
    and every C-STORE costs tens of milliseconds on a fast network.
    """
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo_status(calling_ae: str) -> int:
    LOGGER.info("C-ECHO from %s", calling_ae)
    return status.SUCCESS


def handle_echo(event: Event) -> int:
    return echo_status(event.assoc.requestor.ae_title)


def log_rejected(calling_ae: str, address: str) -> None:
    LOGGER.warning("association from %s (%s) rejected: calling AE title not in node.allowed_callers",
                   calling_ae, address)


def handle_rejected(event: Event) -> None:
    req = event.assoc.requestor
    log_rejected(req.ae_title, req.address)


def build_ae(settings: NodeSettings) -> AE:
    """The AE with exactly the contexts we support, caller filtering and our PDU size."""
    ae = AE(ae_title=settings.ae_title)
    for sop_class, syntaxes in uids.STORAGE_CONTEXTS.items():
        ae.add_supported_context(sop_class, list(syntaxes))
    ae.add_supported_context(uids.VERIFICATION)
    ae.maximum_pdu_size = settings.max_pdu
    # The guard (dicom_node.net.guard) closes connections over the caps before pynetdicom sees them and
    # enforces both deadlines with a log line naming the setting; pynetdicom's own limit and timers
    # are a second line behind it (its idle timer a little later, so the guard's line comes first).
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = 2 * settings.idle_timeout_seconds
    ae.dimse_timeout = 2 * settings.idle_timeout_seconds
    ae.acse_timeout = settings.association_setup_seconds
    if settings.allowed_callers:
        ae.require_calling_aet = list(settings.allowed_callers)
    return ae


def guard_limits(settings: NodeSettings) -> GuardLimits:
    return GuardLimits(max_associations=settings.max_associations, max_per_peer=settings.max_associations_per_peer,
                       setup_seconds=settings.association_setup_seconds, idle_seconds=settings.idle_timeout_seconds,
                       max_pdu=settings.max_pdu)


def server_ssl_context(settings: NodeSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def store_handlers(spool: Spool, journal: Journal, notify: Callable[[Received], None]) -> list[Any]:
    return [
        (evt.EVT_C_STORE, handle_store, [spool, journal, notify]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_CONN_OPEN, set_nodelay),
    ]
