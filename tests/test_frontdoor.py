"""The DICOM port against hostile or broken clients: raw sockets, pynetdicom and storescu on 127.0.0.x.

Other loopback addresses (127.0.0.2, ...) stand in for other hosts: Linux routes all of 127/8 to
the loopback interface, so a client bound to 127.0.0.2 is a different peer address for the node.
Every test is bounded in time and in the number of connections it opens.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom.uid import JPEG2000, CTImageStorage, ExplicitVRLittleEndian, JPEGBaseline8Bit, MRImageStorage
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation, SCP_SCU_RoleSelectionNegotiation

from dicom_node.net import status, uids
from dicom_node.net.scu import send_paths
from tests.conftest import free_port, run_dcmtk, settings_for, storescu, wait_for


def _associate_rq(called: str = "MCNODE", calling: str = "TPS") -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing Verification (as a slow client would send it)."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    ctx = item(0x20, b"\x01\x00\x00\x00" + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\0" * 32
            + app + ctx + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the node closes (or resets) the connection within timeout seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def _echo(port: int) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("echoscu", "-to", "10", "-aet", "TPS", "-aec", "MCNODE", "127.0.0.1", str(port), timeout=30)


def test_slow_client_is_dropped_at_the_setup_deadline(config_dir, node_factory, caplog):
    """One byte every 0.1 s: each read succeeds, but the association is never set up in time."""
    node = node_factory(settings_for(config_dir, node={"association_setup_seconds": 1.0}))
    request = _associate_rq()
    sent = 0
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.guard"), _connect(node.port) as sock:
        sock.settimeout(0.1)
        started = time.monotonic()
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                sent += 1
                try:
                    if sock.recv(1) == b"":
                        break
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - started
    # the request needed len(request) * 0.1 s (about 11 s); the node closed it long before
    assert sent < len(request) / 2, (sent, len(request), elapsed)
    assert "no association after 1 s" in caplog.text
    assert _echo(node.port).returncode == 0


def test_silent_clients_from_one_address_cannot_lock_out_the_tps(config_dir, node_factory, phantom_dir, caplog):
    node = node_factory(settings_for(config_dir, node={"max_associations": 6, "max_associations_per_peer": 3,
                                                       "association_setup_seconds": 30}))
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.guard"):
        silent = [_connect(node.port, "127.0.0.2") for _ in range(10)]
        try:
            closed = [s for s in silent if _closed_by_peer(s, 0.5)]
            assert len(closed) == 7  # over the per-address cap: closed at once, the first 3 wait
            result = storescu(node.port, [phantom_dir / "CT_0001.dcm"])
            assert result.returncode == 0, result.stderr
        finally:
            for s in silent:
                s.close()
    assert "connection from 127.0.0.2 closed: 3 connections open from this address" in caplog.text
    assert node.journal.count_instances() == 1


def test_idle_established_associations_are_closed(config_dir, node_factory, caplog):
    """Associations from an allowed AE title that then say nothing do not hold their slots."""
    node = node_factory(settings_for(config_dir, node={"idle_timeout_seconds": 1.0, "max_associations": 4,
                                                       "max_associations_per_peer": 3}))
    ae = AE(ae_title="TPS")
    ae.add_requested_context(uids.VERIFICATION)
    ae.network_timeout = 30  # our side would wait; the node must not
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.guard"):
        idle = [ae.associate("127.0.0.1", node.port, ae_title="MCNODE", bind_address=("127.0.0.2", 0))
                for _ in range(3)]
        try:
            assert all(a.is_established for a in idle)
            wait_for(lambda: not any(a.is_established for a in idle), timeout=10)
        finally:
            for a in idle:
                if a.is_established:
                    a.abort()
    assert "idle for 1 s" in caplog.text
    assert _echo(node.port).returncode == 0


def test_p_data_larger_than_advertised_is_aborted_before_its_body(config_dir, node_factory, caplog):
    node = node_factory(settings_for(config_dir, node={"max_pdu": 262144}))
    with caplog.at_level(logging.WARNING, logger="dicom_node.net.guard"), _connect(node.port) as sock:
        sock.sendall(_associate_rq())
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        sock.settimeout(0.5)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            pass
        # claim 64 MiB and send 16 bytes of it: the node must answer without waiting for the rest
        sock.sendall(struct.pack(">BBI", 0x04, 0, 64 << 20) + b"\0" * 16)
        sock.settimeout(10)
        reply = sock.recv(64)
        assert reply[:1] == b"\x07", reply  # A-ABORT
        assert _closed_by_peer(sock, 10)
    assert "PDU type 0x04 of 67108864 bytes is larger than the 262144 bytes we accept" in caplog.text
    assert _echo(node.port).returncode == 0


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: node\r\n\r\n",                 # not a PDU type at all
    struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\0" * 64,   # an A-ASSOCIATE-RQ claiming 4 GB
    struct.pack(">BBI", 0x01, 0, 80) + b"\x00\x01" + b"\xff" * 78,  # items that run past the PDU
    struct.pack(">BBI", 0x04, 0, 6) + b"\0\0\0\x02\x01\x03",  # P-DATA before any association
], ids=["http", "huge-length", "items-overrun", "p-data-first"])
def test_garbage_instead_of_associate_rq_is_dropped_and_node_keeps_serving(config_dir, node_factory, garbage):
    node = node_factory(settings_for(config_dir, node={"association_setup_seconds": 2}))
    with _connect(node.port) as sock:
        sock.sendall(garbage)
        assert _closed_by_peer(sock, 10)
    assert _echo(node.port).returncode == 0


def test_unsupported_contexts_rejected_others_work(node_factory, phantom_dir):
    node = node_factory()
    ae = AE(ae_title="TPS")
    ae.requested_contexts = [
        build_context(MRImageStorage),                          # not a class we store
        build_context(CTImageStorage, JPEGBaseline8Bit),   # a class we store, lossy: refused
        build_context(CTImageStorage, JPEG2000),           # lossy (or lossless) JPEG 2000: refused
        build_context(CTImageStorage, ExplicitVRLittleEndian),
        build_context(uids.VERIFICATION),
    ]
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, False
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 1
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MCNODE", ext_neg=[role, window])
    assert assoc.is_established
    results = {(cx.abstract_syntax, tuple(cx.transfer_syntax)): cx.result for cx in assoc.rejected_contexts}
    assert results[(MRImageStorage, tuple(build_context(MRImageStorage).transfer_syntax[:1]))] == 3  # abstract syntax
    assert results[(CTImageStorage, (JPEGBaseline8Bit,))] == 4  # transfer syntax not supported
    assert results[(CTImageStorage, (JPEG2000,))] == 4
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts][-2:] == [CTImageStorage, uids.VERIFICATION]
    assert assoc.send_c_echo().Status == status.SUCCESS
    rsp = assoc.send_c_store(phantom_dir / "CT_0001.dcm")
    assoc.release()
    assert rsp.Status == status.SUCCESS


@contextmanager
def _many_descriptors(count: int) -> Iterator[None]:
    """Hold `count` extra open descriptors in this process, so new sockets get numbers above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_receiving_and_sending_work_with_more_than_1024_descriptors(node_factory, phantom_dir, storescp):
    tps_port, received = storescp(aet="PEER")
    node = node_factory()
    with _many_descriptors(1100):
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        assert probe > 1024
        result = storescu(node.port, [phantom_dir / "CT_0001.dcm"])
        assert result.returncode == 0, result.stderr
        assert send_paths([phantom_dir / "RP.dcm"], "127.0.0.1", tps_port, "PEER", "MCNODE") == []
    assert node.journal.count_instances() == 1
    assert len(list(received.iterdir())) == 1


def test_out_of_descriptors_the_accept_loop_backs_off_and_recovers(config_dir, tmp_path):
    """A node with few descriptors, flooded: a few log lines (not one per loop), then it serves again."""
    port = free_port()
    cfg = config_dir / "mcnode.toml"
    cfg.write_text(cfg.read_text().replace("port = 0", f"port = {port}").replace(
        "[node]", "[node]\nmax_associations = 500\nmax_associations_per_peer = 400\nassociation_setup_seconds = 30"))
    log = tmp_path / "serve.log"

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "-c", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=low_limit)
    flood: list[socket.socket] = []
    try:
        wait_for(lambda: _echo(port).returncode == 0, timeout=30)
        for _ in range(70):  # past the 64 descriptors; the rest wait in (or overflow) the listen backlog
            sock = socket.socket()
            sock.bind(("127.0.0.3", 0))
            sock.settimeout(0.2)
            flood.append(sock)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                pass
        time.sleep(3)
        text = log.read_text()
        assert "cannot accept connections: Too many open files" in text
        assert text.count("cannot accept connections") <= 2
        assert proc.poll() is None
        for s in flood:
            s.close()
        flood.clear()
        wait_for(lambda: _echo(port).returncode == 0, timeout=30)
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        proc.wait(timeout=20)
    assert log.read_text().count("Too many open files") <= 3
