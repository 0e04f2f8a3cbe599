"""De-identification: nothing planted survives, references resolve, kept values are byte-identical."""

from __future__ import annotations

import ast
import copy
import datetime as dt
import hashlib
import hmac
import io
import re
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import RTIonPlanStorage, RTStructureSetStorage

import anonymizer
from anonymizer.deidentify import (
    Deidentifier,
    date_offset_days,
    deidentify_job,
    pseudonym_uid,
)
from anonymizer.errors import AnonymizationError
from anonymizer.profile import PROFILE, rule_for, vr_of
from anonymizer.seal import new_data_key, open_bytes, seal_bytes
from tests.anon_data import IDENTITY, PLANTED, leaks, new_key, planted_study, to_bytes


def _reread(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(to_bytes(ds)))


def _files(study) -> list[Dataset]:
    """The study as a receiver sees it: read back from bytes (raw elements, as the node spools them)."""
    return [_reread(ds) for ds in study.all()]


def test_factory_plants_every_string():
    # The leak check can fail: every planted string is found in the original bytes.
    data = b"".join(to_bytes(ds) for ds in planted_study().all())
    assert sorted(leaks(data)) == sorted(PLANTED)


def test_planted_identity_does_not_survive_deidentify_seal_open():
    key = new_key()
    originals = _files(planted_study())
    anonymized, record = deidentify_job(originals, key, "job-planted")
    data_key = new_data_key()
    opened = []
    for i, ds in enumerate(anonymized):
        raw = to_bytes(ds)
        assert leaks(raw) == [], f"file {i} leaks"
        sealed = seal_bytes(raw, data_key, "job-planted", f"file-{i}")
        assert leaks(sealed, min_bytes=6) == []
        back = open_bytes(sealed, data_key, "job-planted", f"file-{i}")
        assert back == raw
        opened.append(back)
    everything = b"".join(opened)
    assert leaks(everything) == []
    # No private tags anywhere, at any depth.
    for raw in opened:
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.walk(lambda d, e: pytest.fail(f"private tag {e.tag}") if e.tag.is_private else None)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.PatientName == ds.PatientID == record.pseudonyms["PatientID"]
        assert ds.PatientBirthDate == ""


def test_references_still_resolve():
    study = planted_study()
    out, _ = deidentify_job(_files(study), new_key(), "job-refs")
    ct, rs, plan = out[:-2], out[-2], out[-1]
    ct_uids = {c.SOPInstanceUID for c in ct}
    assert len(ct_uids) == len(study.ct)
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPClassUID == RTStructureSetStorage
    for_item = rs.ReferencedFrameOfReferenceSequence[0]
    assert for_item.FrameOfReferenceUID == ct[0].FrameOfReferenceUID == plan.FrameOfReferenceUID
    study_item = for_item.RTReferencedStudySequence[0]
    assert study_item.ReferencedSOPInstanceUID == ct[0].StudyInstanceUID == plan.StudyInstanceUID
    series_item = study_item.RTReferencedSeriesSequence[0]
    assert series_item.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series_item.ContourImageSequence} == ct_uids
    for roi in rs.ROIContourSequence:
        for contour in roi.ContourSequence:
            assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID in ct_uids
    for roi in rs.StructureSetROISequence:
        assert roi.ReferencedFrameOfReferenceUID == ct[0].FrameOfReferenceUID
    for c in ct:
        assert c.SourceImageSequence[0].ReferencedSOPInstanceUID in ct_uids
        assert c.file_meta.MediaStorageSOPInstanceUID == c.SOPInstanceUID
    # Class UIDs and transfer syntax are not remapped.
    assert plan.SOPClassUID == RTIonPlanStorage and rs.SOPClassUID == RTStructureSetStorage
    assert ct[0].file_meta.TransferSyntaxUID == study.ct[0].file_meta.TransferSyntaxUID
    assert study_item.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    # Every instance UID changed and has the keyed form.
    originals = {d.SOPInstanceUID for d in study.all()} | {study.plan.StudyInstanceUID,
                                                           study.plan.FrameOfReferenceUID}
    for ds in out:
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            assert uid not in originals
            assert re.fullmatch(r"2\.25\.\d{1,39}", uid) and len(uid) <= 64


def _compare_kept(orig: Dataset, anon: Dataset, path: str = "") -> int:
    """Assert every element the profile keeps has the same raw bytes; return how many were compared."""
    n = 0
    for tag in orig.keys():
        raw = orig.get_item(tag)
        vr = vr_of(int(tag), raw.VR)
        rule = rule_for(int(tag), vr)
        if rule.action != "K":
            continue
        where = f"{path}{tag}"
        assert tag in anon, f"kept element {where} missing"
        if vr == "SQ":
            for a, b in zip(orig[tag].value, anon[tag].value, strict=True):
                n += _compare_kept(a, b, where + ">")
        else:
            assert anon.get_item(tag).value == raw.value, f"{where} changed"
            n += 1
    return n


def test_kept_values_are_byte_for_byte_identical():
    study = planted_study()
    originals = _files(study)
    anonymized = [_reread(d) for d in deidentify_job(_files(study), new_key(), "job-bytes")[0]]
    for orig, anon in zip(originals, anonymized, strict=True):
        assert _compare_kept(orig, anon) > 5
    ct_o, ct_a = originals[0], anonymized[0]
    for kw in ("PixelData", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
               "SliceThickness", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        assert ct_a.get_item(kw).value == ct_o.get_item(kw).value, kw
    plan_o, plan_a = originals[-1], anonymized[-1]
    for beam_o, beam_a in zip(plan_o.IonBeamSequence, plan_a.IonBeamSequence, strict=True):
        assert beam_a.TreatmentMachineName == beam_o.TreatmentMachineName
        for cp_o, cp_a in zip(beam_o.IonControlPointSequence, beam_a.IonControlPointSequence, strict=True):
            for kw in ("ScanSpotPositionMap", "ScanSpotMetersetWeights", "NominalBeamEnergy",
                       "CumulativeMetersetWeight", "ScanSpotTuneID"):
                assert cp_a.get_item(kw).value == cp_o.get_item(kw).value, kw
    rs_o, rs_a = originals[-2], anonymized[-2]
    for roi_o, roi_a in zip(rs_o.ROIContourSequence, rs_a.ROIContourSequence, strict=True):
        for c_o, c_a in zip(roi_o.ContourSequence, roi_a.ContourSequence, strict=True):
            assert c_a.get_item("ContourData").value == c_o.get_item("ContourData").value
    assert [r.ROIName for r in rs_a.StructureSetROISequence] == ["BODY", "PTV"]


def test_in_memory_datasets_work_and_input_is_not_changed():
    study = planted_study()
    before = [copy.deepcopy(d) for d in study.all()]
    out, _ = deidentify_job(study.all(), new_key(), "job-mem")
    assert [d == b for d, b in zip(study.all(), before, strict=True)] == [True] * len(before)
    assert str(study.plan.PatientName) == IDENTITY.patient_name
    assert leaks(b"".join(to_bytes(d) for d in out)) == []
    assert out[0].PixelData == study.ct[0].PixelData


def test_same_key_same_uids_other_key_different():
    files = _files(planted_study())
    key = new_key()
    a = Deidentifier(key).deidentify(files[-1])
    b = Deidentifier(key).deidentify(files[-1])
    c = Deidentifier(new_key()).deidentify(files[-1])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyInstanceUID == b.StudyInstanceUID
    assert a.PatientID == b.PatientID and a.StudyDate == b.StudyDate
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert getattr(a, kw) != getattr(c, kw), kw


def test_pseudonym_uid_is_the_documented_hmac():
    key = bytes(range(32))
    uid = "1.2.3.4.5"
    digest = hmac.new(key, uid.encode(), hashlib.sha256).digest()
    assert pseudonym_uid(key, uid) == "2.25." + str(int.from_bytes(digest[:16], "big"))


def test_dates_shift_by_one_offset_per_patient():
    key = new_key()
    files = _files(planted_study())
    out, record = deidentify_job(files, key, "job-dates")
    offset = date_offset_days(key, IDENTITY.patient_id)
    assert record.date_offset_days == offset and -4015 < offset <= -365
    plan = out[-1]

    def shifted(value: str) -> str:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
        return (day + dt.timedelta(days=offset)).strftime("%Y%m%d")

    assert plan.StudyDate == shifted(IDENTITY.study_date)
    assert plan.ReviewDate == shifted("19991231")
    assert out[0].SeriesDate == shifted("20261124")
    assert out[0].AcquisitionDateTime == shifted("20261123")
    assert "StudyTime" in plan and not plan.StudyTime and "SeriesTime" not in out[0]


@pytest.mark.parametrize("mutate, message", [
    (lambda ds: setattr(ds, "StudyDate", "2026-11-23"), "YYYYMMDD"),
    (lambda ds: setattr(ds, "StudyDate", "20261331"), "valid date"),
    (lambda ds: delattr(ds, "PatientID"), "PatientID"),
    (lambda ds: setattr(ds, "BurnedInAnnotation", "YES"), "BurnedInAnnotation"),
])
def test_fail_closed(mutate, message):
    ds = planted_study().ct[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we plant
        mutate(ds)
    with pytest.raises(AnonymizationError, match=message):
        Deidentifier(new_key()).deidentify(ds)


def test_fail_closed_messages_carry_no_identity():
    ds = planted_study().ct[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyDate = "20261399"
    with pytest.raises(AnonymizationError) as info:
        Deidentifier(new_key()).deidentify(ds)
    assert leaks(str(info.value).encode()) == []


def test_two_patients_in_one_job_refused():
    a = planted_study()
    b = planted_study()
    b.plan.PatientID = "OTHER-1"
    with pytest.raises(AnonymizationError, match="more than one patient"):
        deidentify_job([*a.all(), b.plan], new_key(), "job-mixed")


def test_describe_lists_actions_without_values():
    ds = _files(planted_study())[-1]
    actions = Deidentifier(new_key()).describe(ds)
    by_kw = {a.keyword: a for a in actions}
    assert by_kw["PatientName"].action == "D" and by_kw["PatientID"].action == "D"
    assert by_kw["OtherPatientIDs"].action == "X"
    assert by_kw["StudyInstanceUID"].action == "U"
    assert by_kw["SOPClassUID"].action == "K"
    assert by_kw["StudyDate"].action == "S"
    assert by_kw["ScanSpotPositionMap"].action == "K"
    assert any(a.tag.startswith("(300A,03A2)[0]>") and a.keyword == "OperatorsName" and a.action == "X"
               for a in actions)
    assert any(a.keyword == "private" and a.action == "X" for a in actions)
    assert leaks("\n".join(" ".join(a) for a in actions).encode()) == []


def test_unlisted_text_is_removed_and_profile_table_is_sound():
    # Fail-closed default: a text element the table does not list is removed, a number kept.
    assert "Manufacturer" not in Deidentifier(new_key()).deidentify(planted_study().plan)
    assert rule_for(0x00080070, "LO").action == "X"
    assert rule_for(0x00180060, "DS").action == "K"
    assert rule_for(0x7FE00010, "OW").action == "K"
    assert rule_for(0x300A0362, "LO").action == "K"  # RangeShifterSetting: the engine needs it
    assert rule_for(0x300A0322, "LO").action == "X"  # RangeShifterDescription: free text
    assert rule_for(0x00090010, "LO").action == "X"
    assert rule_for(0x00231234, None).action == "X"
    assert rule_for(0x60003000, "OW").action == "X"
    assert all(a in "XZDKUS" for a in PROFILE.values())


def test_anonymizer_imports_no_node_cloud_or_network_code():
    # pydicom itself pulls in requests, so check what our own modules import, not sys.modules.
    forbidden = {"dicom_node", "cloud", "pynetdicom", "boto3", "botocore", "paramiko", "socket", "ssl",
                 "requests", "urllib", "urllib3", "http", "httpx", "ftplib", "smtplib"}
    package = Path(anonymizer.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{source.name} imports {name}"


def _implicit_item(item: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = True
    write_dataset(buf, item)
    body = buf.getvalue()
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body


def _un(tag: int, value: bytes) -> bytes:
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value


def test_public_tags_encoded_as_un_are_judged_by_their_real_vr():
    # A sender that did not know these VRs wrote them as UN: a sequence with a name inside, a date.
    study = planted_study()
    ct = study.ct[0]
    ref = Dataset()
    ref.ReferencedSOPClassUID = ct.SOPClassUID
    ref.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    ref.OperatorsName = "Vega^Lucia"
    del ct.SourceImageSequence
    del ct.SeriesDate
    del ct.StationName
    # pydicom will not build these on purpose, so append them as an explicit-VR LE writer would.
    extra = b"".join(_un(tag, value) for tag, value in (
        (0x00081140, _implicit_item(ref)),  # ReferencedImageSequence
        (0x00080021, b"20261124"),  # SeriesDate
        (0x00081010, b"PROTONWS07"),  # StationName
    ))
    original = pydicom.dcmread(io.BytesIO(to_bytes(ct) + extra))
    assert original.get_item(0x00081140).VR == "UN"
    key = new_key()
    out = _reread(Deidentifier(key).deidentify(original))
    assert leaks(to_bytes(out)) == []
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == pseudonym_uid(key, ct.SOPInstanceUID)
    assert "OperatorsName" not in out.ReferencedImageSequence[0]
    assert out.SeriesDate != "20261124" and len(out.SeriesDate) == 8
    assert "StationName" not in out
