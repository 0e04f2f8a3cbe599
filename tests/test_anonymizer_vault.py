"""Identity vault (encrypted at rest, bound to the job) and re-identification of an RT Dose."""

from __future__ import annotations

import io
import os

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RTDoseStorage, RTIonPlanStorage, RTStructureSetStorage, generate_uid

from anonymizer.deidentify import deidentify_job
from anonymizer.errors import AnonymizationError, VaultError
from anonymizer.vault import IdentityRecord, Vault, reidentify
from tests.anon_data import IDENTITY, leaks, new_key, planted_study, to_bytes


def _job(key: bytes, job_id: str = "job-v"):
    study = planted_study()
    files = [pydicom.dcmread(io.BytesIO(to_bytes(ds))) for ds in study.all()]
    anonymized, record = deidentify_job(files, key, job_id)
    return study, anonymized, record


def _dose_from(anonymized: list[Dataset]) -> Dataset:
    """An RT Dose as the node's writer makes it: from anonymized data, with its own new UIDs."""
    ct, plan = anonymized[0], anonymized[-1]
    dose = Dataset()
    dose.SOPClassUID = RTDoseStorage
    dose.SOPInstanceUID = generate_uid()
    dose.SeriesInstanceUID = generate_uid()
    dose.Modality = "RTDOSE"
    dose.PatientName = plan.PatientName
    dose.PatientID = plan.PatientID
    dose.PatientBirthDate = ""
    dose.PatientSex = ""
    dose.StudyInstanceUID = plan.StudyInstanceUID
    dose.StudyDate = plan.StudyDate
    dose.StudyTime = ""
    dose.StudyID = ""
    dose.AccessionNumber = ""
    dose.ReferringPhysicianName = ""
    dose.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ref = Dataset()
    ref.ReferencedSOPClassUID = RTIonPlanStorage
    ref.ReferencedSOPInstanceUID = plan.SOPInstanceUID
    dose.ReferencedRTPlanSequence = Sequence([ref])
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RTStructureSetStorage
    ref_ss.ReferencedSOPInstanceUID = anonymized[-2].SOPInstanceUID
    dose.ReferencedStructureSetSequence = Sequence([ref_ss])
    dose.DoseUnits = "GY"
    dose.PatientIdentityRemoved = "YES"
    return dose


def test_reidentify_rt_dose_gives_back_original_links():
    key = new_key()
    study, anonymized, record = _job(key)
    dose = _dose_from(anonymized)
    back = reidentify(dose, record)
    assert str(back.PatientName) == IDENTITY.patient_name
    assert back.PatientID == IDENTITY.patient_id
    assert back.PatientBirthDate == IDENTITY.birth_date and back.PatientSex == IDENTITY.sex
    assert back.StudyInstanceUID == study.plan.StudyInstanceUID
    assert back.StudyDate == IDENTITY.study_date and back.StudyTime == IDENTITY.study_time
    assert back.AccessionNumber == IDENTITY.accession and back.StudyID == study.plan.StudyID
    assert back.FrameOfReferenceUID == study.ct[0].FrameOfReferenceUID
    assert back.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == study.plan.SOPInstanceUID
    assert back.ReferencedRTPlanSequence[0].ReferencedSOPClassUID == RTIonPlanStorage
    assert back.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == study.rtstruct.SOPInstanceUID
    # The dose's own new UIDs stay; the input is untouched; no de-identification flag remains.
    assert back.SOPInstanceUID == dose.SOPInstanceUID and back.SeriesInstanceUID == dose.SeriesInstanceUID
    assert dose.PatientID == record.pseudonyms["PatientID"]
    assert "PatientIdentityRemoved" not in back
    assert back.SpecificCharacterSet == "ISO_IR 100"
    # Writes and reads back with the non-ASCII name intact.
    back.file_meta = pydicom.dataset.FileMetaDataset()
    back.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    again = pydicom.dcmread(io.BytesIO(to_bytes(back)))
    assert str(again.PatientName) == IDENTITY.patient_name


def test_reidentify_refuses_another_patient_or_study():
    key = new_key()
    _, anonymized, record = _job(key)
    dose = _dose_from(anonymized)
    dose.PatientID = "MC0000000000000000"
    with pytest.raises(AnonymizationError, match="PatientID"):
        reidentify(dose, record)
    dose = _dose_from(anonymized)
    dose.StudyInstanceUID = generate_uid()
    with pytest.raises(AnonymizationError, match="StudyInstanceUID"):
        reidentify(dose, record)


def test_vault_round_trip_encrypted_and_private(tmp_path):
    key = new_key()
    study, _, record = _job(key, "job-42")
    vault = Vault(tmp_path / "vault", key)
    path = vault.store("job-42", record)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert vault.load("job-42") == record
    assert IdentityRecord.from_json(record.to_json()) == record
    blob = path.read_bytes()
    assert leaks(blob, min_bytes=6) == []
    for uid in (study.plan.SOPInstanceUID, study.plan.StudyInstanceUID, study.ct[0].FrameOfReferenceUID):
        assert uid.encode() not in blob
    assert b"PatientName" not in blob and b"job-42" not in blob


def test_vault_refuses_wrong_key_swapped_file_and_bad_ids(tmp_path):
    key = new_key()
    _, _, record = _job(key, "job-a")
    vault = Vault(tmp_path, key)
    vault.store("job-a", record)
    with pytest.raises(VaultError, match="does not decrypt"):
        Vault(tmp_path, new_key()).load("job-a")
    (tmp_path / "job-b.vault").write_bytes((tmp_path / "job-a.vault").read_bytes())
    with pytest.raises(VaultError, match="does not decrypt"):
        vault.load("job-b")
    with pytest.raises(VaultError, match="no vault record"):
        vault.load("job-c")
    for bad in ("../etc/passwd", "", "a/b", ".hidden"):
        with pytest.raises(VaultError, match="job id"):
            vault.store(bad, record)
    with pytest.raises(VaultError, match="belongs to job"):
        vault.store("job-z", record)
    blob = bytearray((tmp_path / "job-a.vault").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "job-a.vault").write_bytes(bytes(blob))
    with pytest.raises(VaultError):
        vault.load("job-a")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert os.listdir(tmp_path)
