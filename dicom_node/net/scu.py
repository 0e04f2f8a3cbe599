"""Sending DICOM files to a peer by C-STORE (used by `mcnode send` and the outbox)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import evt

from dicom_node.errors import SendError
from dicom_node.net import status
from dicom_node.net.guard import PollingAE
from dicom_node.net.scp import set_nodelay

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 128


def collect_files(paths: list[Path]) -> list[Path]:
    """Every file under the given files and folders, in a stable order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            for root, _dirs, files in os.walk(p):
                out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
        elif p.exists():
            out.append(p)
        else:
            raise SendError(f"{p}: no such file or folder")
    return sorted(out)


def _context_of(path: Path) -> tuple[str, str]:
    meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def _check_reachable(host: str, port: int, called_ae: str, timeout: float) -> None:
    """Fail with a plain reason when nothing listens (pynetdicom would log an error and leak a socket)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SendError(f"{called_ae} at {host}:{port} is not reachable: {exc.strerror or exc}") from exc


def send_paths(paths: list[Path], host: str, port: int, called_ae: str, calling_ae: str,
               timeout: float = 30) -> list[tuple[Path, str]]:
    """C-STORE every DICOM file; return (path, why) for each one that did not succeed.

    Files are sent as stored (no re-encoding). A file that is not DICOM is reported, not sent.
    """
    files = collect_files(paths)
    failures: list[tuple[Path, str]] = []
    contexts: dict[Path, tuple[str, str]] = {}
    for f in files:
        try:
            contexts[f] = _context_of(f)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            failures.append((f, f"not a DICOM file: {exc}"))
    if not contexts:
        return failures
    # Send files as stored, streamed from disk: no decode/re-encode, so what arrives is what was
    # written. pynetdicom has this switch for the whole process only; it is set here, when the node
    # sends, rather than as a side effect of importing this module.
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = PollingAE(ae_title=calling_ae)  # poll(), not select(): works with descriptors >= 1024
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    wanted: dict[str, set[str]] = {}
    for sop_class, syntax in contexts.values():
        wanted.setdefault(sop_class, set()).add(syntax)
    for sop_class, syntaxes in wanted.items():
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, syntax)
    if len(ae.requested_contexts) > MAX_CONTEXTS:  # pragma: no cover - would need >128 classes
        raise SendError("too many different SOP classes/transfer syntaxes for one association")
    _check_reachable(host, port, called_ae, timeout)
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        raise SendError(f"association with {called_ae} at {host}:{port} was not accepted")
    try:
        to_send = list(contexts)
        for i, f in enumerate(to_send):
            try:
                rsp = assoc.send_c_store(f)
            except (ValueError, RuntimeError) as exc:
                failures.append((f, str(exc)))
                continue
            code = rsp.get("Status") if rsp else None
            if code is None:
                failures.append((f, "no response (connection lost or timed out)"))
                if not assoc.is_established:
                    failures.extend((g, "not sent: association ended") for g in to_send[i + 1:])
                    break
            elif code != status.SUCCESS:
                failures.append((f, f"status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    LOGGER.info("sent %d of %d files to %s@%s:%d", len(files) - len(failures), len(files), called_ae, host, port)
    return failures
