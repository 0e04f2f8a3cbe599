"""What only the lean receiver does itself: PDU reassembly, context negotiation, hostile peers."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation, SCP_SCU_RoleSelectionNegotiation

from dicom_node.net import status, uids
from dicom_node.net.lean_scp import parse_command
from dicom_node.phantom import write_study
from tests.conftest import run_dcmtk, settings_for, storescu

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def receiver() -> str:
    return "lean"


def _data_set(path: Path) -> bytes:
    """The bytes after the file meta group, i.e. the data set as sent over the network."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    (meta_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return raw[132 + 12 + meta_length:]


def test_data_set_split_over_many_small_pdus_arrives_byte_identical(config_dir, node_factory, make_study, tmp_path):
    node = node_factory(settings_for(config_dir, node={"max_pdu": 4096}))
    study = make_study(spacing_mm=(2.0, 2.0, 5.0))  # 100x100 slices: about 20 PDUs each
    folder = tmp_path / "big"
    write_study(study, folder)
    files = sorted(folder.iterdir())
    result = storescu(node.port, files, "TPS", "MCNODE", "--max-send-pdu", "4096")
    assert result.returncode == 0, result.stderr
    for path in files:
        sop_uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        inst = node.journal.instance(sop_uid)
        assert inst is not None, path.name
        assert _data_set(Path(inst.path)) == _data_set(path), path.name


def test_unsupported_contexts_rejected_others_work(node_factory, phantom_dir):
    node = node_factory()
    ae = AE(ae_title="TPS")
    ae.requested_contexts = [
        build_context(MR_IMAGE),                       # not a class we store
        build_context(uids.CT_IMAGE, JPEG2000Lossless),  # a class we store, a syntax we do not
        build_context(uids.CT_IMAGE, ExplicitVRLittleEndian),
        build_context(uids.VERIFICATION),
    ]
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = uids.CT_IMAGE, True, False
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 1
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MCNODE", ext_neg=[role, window])
    assert assoc.is_established
    results = {(cx.abstract_syntax, tuple(cx.transfer_syntax)): cx.result for cx in assoc.rejected_contexts}
    assert results[(MR_IMAGE, tuple(build_context(MR_IMAGE).transfer_syntax[:1]))] == 3
    assert results[(uids.CT_IMAGE, (JPEG2000Lossless,))] == 4
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [uids.CT_IMAGE, uids.VERIFICATION]
    assert assoc.send_c_echo().Status == status.SUCCESS
    rsp = assoc.send_c_store(phantom_dir / "CT_0001.dcm")
    assoc.release()
    assert rsp.Status == status.SUCCESS
    assert node.journal.count_instances() == 1


def _exchange(port: int, payload: bytes) -> bytes:
    """Send payload on a raw connection; return whatever comes back before the node closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # closed with our garbage unread: the kernel resets
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: node\r\n\r\n",                 # not a PDU type at all
    struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\0" * 64,   # an A-ASSOCIATE-RQ claiming 4 GB
    struct.pack(">BBI", 0x01, 0, 80) + b"\x00\x01" + b"\xff" * 78,  # items that run past the PDU
    struct.pack(">BBI", 0x04, 0, 6) + b"\0\0\0\x02\x01\x03",  # P-DATA before any association
], ids=["http", "huge-length", "items-overrun", "p-data-first"])
def test_garbage_instead_of_associate_rq_is_dropped_and_node_keeps_serving(node_factory, garbage):
    node = node_factory()
    reply = _exchange(node.port, garbage)
    assert reply == b"" or reply[0] == 0x07  # closed, or A-ABORT then closed
    assert run_dcmtk("echoscu", "-aet", "TPS", "-aec", "MCNODE", "127.0.0.1", str(node.port)).returncode == 0


def test_wrong_called_ae_title_rejected(node_factory):
    node = node_factory()
    result = run_dcmtk("echoscu", "-aet", "TPS", "-aec", "SOMEONE", "127.0.0.1", str(node.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr


def test_command_parser_reads_group_0000():
    cmd = (struct.pack("<HHIH", 0, 0x0100, 2, 0x0001) + struct.pack("<HHI", 0, 0x0002, 26)
           + b"1.2.840.10008.5.1.4.1.1.2\0" + struct.pack("<HHIH", 0, 0x0800, 2, 0x0000))
    parsed = parse_command(cmd)
    assert parsed[0x0100] == b"\x01\x00" and parsed[0x0002].rstrip(b"\0") == uids.CT_IMAGE.encode()
