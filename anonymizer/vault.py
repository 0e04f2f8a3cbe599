"""The identity vault: who a job really is, kept on the clinic node only, and re-identification.

An ``IdentityRecord`` holds a job's original patient module, its studies' attributes and every UID
the job remapped (pseudonym -> original). ``Vault`` stores one record per job as
``<directory>/<job_id>.vault`` (mode 0600): AES-256-GCM under a key derived from the site key by
HKDF-SHA256 (info ``mcnode vault v1``), random 96-bit nonce, job id as associated data -- so a
record copied onto another job's file name does not open. Nothing in the file is readable without
the site key.

``reidentify`` puts the identity back on an object made from anonymized data (the RT Dose).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.dataset import Dataset

from anonymizer.durable import fsync_dir, write_atomically
from anonymizer.errors import AnonymizationError, VaultError
from anonymizer.keys import derive_key

# Study-module attributes the vault keeps per original study and reidentify restores.
STUDY_KEYWORDS = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
                  "ReferringPhysicianName")
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")

_MAGIC = b"MCVAULT\x01"
_NONCE_LEN = 12
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_job_id(job_id: str) -> str:
    """Job ids name files and bind ciphertexts; allow only a safe, short character set."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise VaultError("job id must be 1-128 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)")
    return job_id


@dataclass
class IdentityRecord:
    """Originals <-> pseudonyms for one job. JSON-serializable (``to_json``/``from_json``)."""

    job_id: str
    # Original Patient module values (PatientName as its DICOM string, e.g. "Family^Given").
    patient: dict[str, str]
    # What the job's datasets carry instead (PatientName, PatientID).
    pseudonyms: dict[str, str]
    # Original StudyInstanceUID -> original values of STUDY_KEYWORDS.
    studies: dict[str, dict[str, str]]
    # Pseudonym UID -> original UID, for every UID the job remapped (study, series, FoR, SOP instances, ...).
    uids: dict[str, str]
    date_offset_days: int
    # Original SpecificCharacterSet (str, list for several, "" when absent) for the restored names.
    character_set: str | list[str] = ""
    version: int = field(default=1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> IdentityRecord:
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise VaultError("identity record is not valid JSON of the expected shape") from exc

    def original_uid(self, uid: str) -> str | None:
        return self.uids.get(uid)


class Vault:
    """Encrypted identity records, one file per job, in a local directory (created mode 0700)."""

    def __init__(self, directory: Path, site_key: bytes):
        self.directory = Path(directory)
        self._aead = AESGCM(derive_key(site_key, b"mcnode vault v1", VaultError))

    def path_for(self, job_id: str) -> Path:
        return self.directory / f"{check_job_id(job_id)}.vault"

    def store(self, job_id: str, record: IdentityRecord) -> Path:
        """Encrypt and write the record atomically (temp file, fsync, rename); return its path."""
        path = self.path_for(job_id)
        if record.job_id != job_id:
            raise VaultError(f"record belongs to job {record.job_id}, not {job_id}")
        nonce = secrets.token_bytes(_NONCE_LEN)
        blob = _MAGIC + nonce + self._aead.encrypt(nonce, record.to_json().encode("utf-8"), _aad(job_id))
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(path, lambda fh: fh.write(blob))
        except OSError as exc:
            raise VaultError(f"cannot write the vault record of job {job_id}: {exc.strerror}") from exc
        return path

    def destroy(self, job_id: str) -> bool:
        """Remove a job's record for good: overwritten with random bytes and flushed, then unlinked.

        Returns False when there was none. (The record is encrypted; overwriting it means that not
        even a copy of the site key recovers it from the disk blocks it used.)
        """
        path = self.path_for(job_id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, secrets.token_bytes(size))
                os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()
            fsync_dir(self.directory)
        except OSError as exc:
            raise VaultError(f"cannot remove the vault record of job {job_id}: {exc.strerror}") from exc
        return True

    def load(self, job_id: str) -> IdentityRecord:
        path = self.path_for(job_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError as exc:
            raise VaultError(f"no vault record for job {job_id}") from exc
        except OSError as exc:
            raise VaultError(f"cannot read the vault record of job {job_id}: {exc.strerror}") from exc
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE_LEN + 16:
            raise VaultError(f"vault record of job {job_id} is not a vault file")
        nonce = blob[len(_MAGIC):len(_MAGIC) + _NONCE_LEN]
        try:
            plain = self._aead.decrypt(nonce, blob[len(_MAGIC) + _NONCE_LEN:], _aad(job_id))
        except InvalidTag as exc:
            raise VaultError(f"vault record of job {job_id} does not decrypt: wrong site key, altered, "
                             "or another job's record") from exc
        record = IdentityRecord.from_json(plain)
        if record.job_id != job_id:
            raise VaultError(f"vault record names job {record.job_id}, expected {job_id}")
        return record


def _aad(job_id: str) -> bytes:
    return b"mcnode vault v1\x00" + job_id.encode("utf-8")


def reidentify(ds: Dataset, record: IdentityRecord) -> Dataset:
    """A copy of ``ds`` (made from this job's anonymized data) with the original identity back.

    Restores the Patient module, StudyInstanceUID and the study's date/time/ID/accession/
    description/referring physician, FrameOfReferenceUID, and every UID anywhere in the dataset
    that the record knows (e.g. ReferencedRTPlanSequence -> ReferencedSOPInstanceUID). UIDs it
    does not know (the new object's own SOP Instance and Series UIDs) stay. Refuses a dataset whose
    patient or study is not this record's: the result would be linked to the wrong patient.
    """
    pid = str(ds.get("PatientID", "") or "")
    if pid and pid != record.pseudonyms.get("PatientID"):
        raise AnonymizationError(f"job {record.job_id}: dataset's PatientID is not this job's pseudonym; "
                                 "refusing to re-identify")
    study_pseudo = str(ds.get("StudyInstanceUID", "") or "")
    study_orig = record.uids.get(study_pseudo)
    if study_orig is None or study_orig not in record.studies:
        raise AnonymizationError(f"job {record.job_id}: dataset's StudyInstanceUID is not one of this job's "
                                 "studies; refusing to re-identify")
    out = copy.deepcopy(ds)
    if record.character_set:
        out.SpecificCharacterSet = record.character_set
    _restore_uids(out, record.uids)
    for keyword in PATIENT_KEYWORDS:
        setattr(out, keyword, record.patient.get(keyword, ""))
    for keyword, value in record.studies[study_orig].items():
        setattr(out, keyword, value)
    for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                    "LongitudinalTemporalInformationModified"):
        if keyword in out:
            delattr(out, keyword)
    if getattr(out, "file_meta", None) is not None and "MediaStorageSOPInstanceUID" in out.file_meta:
        sop = out.get("SOPInstanceUID")
        if sop:
            out.file_meta.MediaStorageSOPInstanceUID = sop
    return out


def _restore_uids(ds: Dataset, uids: dict[str, str]) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _restore_uids(item, uids)
        elif elem.VR == "UI" and elem.value:
            if isinstance(elem.value, str):
                elem.value = uids.get(elem.value, elem.value)
            else:
                elem.value = [uids.get(v, v) for v in elem.value]
