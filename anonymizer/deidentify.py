"""Apply the profile (``anonymizer.profile``) to datasets: one walker, small handlers per action.

The walker builds a new dataset element by element; it never edits its input. Kept elements that
were read from a file are carried over as the raw bytes they were read as, so pixel data, geometry,
rescale, beam, spot and contour values are byte-for-byte the same (and fast: nothing is decoded).

Keys and pseudonyms (all from the 32-byte site key, deterministic, unlinkable without it):

- UIDs: ``2.25.<int of the first 16 bytes of HMAC-SHA256(site_key, uid)>``.
- Patient ID and name: ``MC`` + 16 hex digits of HMAC-SHA256(site_key, "patient-id" | PatientID).
- Dates: one offset per patient, -365 to -4014 days, from HMAC-SHA256(site_key, "date-offset" |
  PatientID). Every date of that patient moves by the same number of days, so intervals (CT to
  plan) survive; birth date is emptied and times are removed or emptied (the profile says which).

A dataset without a PatientID, a date that is not ``YYYYMMDD``, burned-in annotation, or data
from two patients in one job raise ``AnonymizationError``: that job must not leave the clinic.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import NamedTuple

from pydicom import config
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from anonymizer.errors import AnonymizationError
from anonymizer.keys import check_site_key
from anonymizer.profile import DICOM_UID_ROOT, Rule, rule_for, vr_of
from anonymizer.vault import STUDY_KEYWORDS, IdentityRecord

LOGGER = logging.getLogger(__name__)

TAG_PATIENT_NAME = 0x00100010
TAG_PATIENT_ID = 0x00100020
TAG_BURNED_IN = 0x00280301

# LO: at most 64 characters.
DEID_METHOD = "mcnode: PS3.15 E basic, modified dates, keyed UIDs"
# (code value, meaning) of the PS3.16 CID 7050 options applied.
DEID_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
_MIN_OFFSET_DAYS = 365
_OFFSET_SPAN_DAYS = 3650
_DUMMY = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101", "IS": "0", "DS": "0"}


class Action(NamedTuple):
    """One line of a dry run: where, what, and why (never a value)."""

    tag: str
    keyword: str
    action: str
    detail: str


def _elem(tag: int, vr: str, value: object) -> DataElement:
    # Values built here are valid by construction (pseudonym UIDs, YYYYMMDD, fixed text); skip
    # pydicom's per-value validation, which costs more than the de-identification itself.
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


def _hmac(key: bytes, label: bytes, value: str) -> bytes:
    return hmac.new(key, label + b"\x00" + value.encode("utf-8"), hashlib.sha256).digest()


def pseudonym_uid(site_key: bytes, uid: str) -> str:
    """The keyed pseudonym of a UID: same key and UID give the same result, and it fits in 64 chars."""
    digest = hmac.new(site_key, uid.encode(), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def pseudonym_patient_id(site_key: bytes, patient_id: str) -> str:
    return "MC" + _hmac(site_key, b"patient-id", patient_id).hex()[:16].upper()


def date_offset_days(site_key: bytes, patient_id: str) -> int:
    """The patient's date shift in days, always negative (-365 ... -4014), never zero."""
    n = int.from_bytes(_hmac(site_key, b"date-offset", patient_id)[:8], "big")
    return -(_MIN_OFFSET_DAYS + n % _OFFSET_SPAN_DAYS)


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip(" \x00")
    return str(value)


def _patient_id_of(ds: Dataset) -> str:
    pid = str(ds.get("PatientID", "") or "").strip()
    if not pid:
        raise AnonymizationError("dataset has no PatientID: cannot derive the patient's pseudonym and "
                                 "date offset; refusing to de-identify")
    return pid


class _Context:
    """Per-dataset state handed to the handlers: the patient's pseudonyms and date offset."""

    __slots__ = ("log", "offset", "pseudo_id")

    def __init__(self, pseudo_id: str, offset: int, log: list[Action] | None):
        self.pseudo_id = pseudo_id
        self.offset = offset
        self.log = log


_Element = DataElement | RawDataElement
Handler = Callable[["Deidentifier", Dataset, Dataset, BaseTag, _Element, str | None, _Context, str], None]


class Deidentifier:
    """Applies the profile with one site key. Reusable across datasets and patients.

    ``uid_map`` collects every UID it remapped (original -> pseudonym) for the identity record.
    """

    def __init__(self, site_key: bytes):
        self._key = check_site_key(site_key, AnonymizationError)
        self.uid_map: dict[str, str] = {}
        self._patients: dict[str, tuple[str, int]] = {}
        self._handlers: dict[str, Handler] = {
            "X": Deidentifier._remove,
            "Z": Deidentifier._empty,
            "D": Deidentifier._dummy,
            "K": Deidentifier._keep,
            "U": Deidentifier._uid,
            "S": Deidentifier._shift,
        }

    # --- public API ---------------------------------------------------------------------------

    def uid(self, uid: str) -> str:
        """Pseudonym for one UID; well-known DICOM UIDs (under 1.2.840.10008) are not instances."""
        if not uid or uid.startswith(DICOM_UID_ROOT):
            return uid
        pseudo = self.uid_map.get(uid)
        if pseudo is None:
            pseudo = self.uid_map[uid] = pseudonym_uid(self._key, uid)
        return pseudo

    def patient(self, patient_id: str) -> tuple[str, int]:
        """(pseudonymous patient ID, date offset in days) for an original patient ID."""
        known = self._patients.get(patient_id)
        if known is None:
            known = self._patients[patient_id] = (pseudonym_patient_id(self._key, patient_id),
                                                  date_offset_days(self._key, patient_id))
        return known

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (with file meta when ``ds`` has one). ``ds`` is unchanged."""
        return self._run(ds, None)

    def describe(self, ds: Dataset) -> list[Action]:
        """What ``deidentify`` does to each element of ``ds``, nested ones included; values never shown."""
        log: list[Action] = []
        self._run(ds, log)
        return log

    # --- walker ---------------------------------------------------------------------------------

    def _run(self, ds: Dataset, log: list[Action] | None) -> Dataset:
        pseudo_id, offset = self.patient(_patient_id_of(ds))
        burned = ds.get_item(TAG_BURNED_IN)
        if burned is not None and _text(burned.value).upper() == "YES":
            raise AnonymizationError("BurnedInAnnotation is YES: pixel data may show identity; refusing")
        ctx = _Context(pseudo_id, offset, log)
        out = self._dataset(ds, ctx, "")
        for tag, vr, value in _deid_marks():
            out[tag] = _elem(tag, vr, value)
            if log is not None:
                log.append(Action(_tag_str(tag), _keyword(BaseTag(tag)), "D", "set: records the method"))
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            out.file_meta = self._file_meta(meta, out)
        return out

    def _file_meta(self, meta: FileMetaDataset, out: Dataset) -> FileMetaDataset:
        # Only what a file needs; SourceApplicationEntityTitle & co. would name the sender.
        sop_class = meta.get("MediaStorageSOPClassUID") or out.get("SOPClassUID")
        sop_instance = out.get("SOPInstanceUID") or self.uid(str(meta.get("MediaStorageSOPInstanceUID", "")))
        new = FileMetaDataset()
        new[0x00020002] = _elem(0x00020002, "UI", sop_class)
        new[0x00020003] = _elem(0x00020003, "UI", sop_instance)
        new[0x00020010] = _elem(0x00020010, "UI", meta.TransferSyntaxUID)
        return new

    def _dataset(self, src: Dataset, ctx: _Context, path: str) -> Dataset:
        out = Dataset()
        implicit, little = src.original_encoding
        out.set_original_encoding(implicit, little, src.original_character_set)
        handlers = self._handlers
        for tag in list(src.keys()):
            elem = src.get_item(tag)
            vr = vr_of(int(tag), elem.VR)
            rule = rule_for(int(tag), vr)
            if ctx.log is not None:
                ctx.log.append(Action(path + _tag_str(int(tag)), _keyword(tag), rule.action, rule.detail))
            handlers[rule.action](self, src, out, tag, elem, vr, ctx, path)
        return out

    # --- handlers, one per action (same signature so the table can pick them) -----------------

    def _remove(self, src: Dataset, out: Dataset, tag: BaseTag, elem: _Element, vr: str | None,
                ctx: _Context, path: str) -> None:
        return None

    def _keep(self, src: Dataset, out: Dataset, tag: BaseTag, elem: _Element, vr: str | None,
                ctx: _Context, path: str) -> None:
        if vr == "SQ":
            seq = src[tag].value
            items = Sequence()
            for i, item in enumerate(seq):
                items.append(self._dataset(item, ctx, f"{path}{_tag_str(int(tag))}[{i}]>"))
            out[tag] = _elem(tag, "SQ", items)
        elif isinstance(elem, RawDataElement):
            out[tag] = elem  # immutable bytes as read: byte-for-byte, no decode
        else:
            out[tag] = copy.deepcopy(elem)

    def _empty(self, src: Dataset, out: Dataset, tag: BaseTag, elem: _Element, vr: str | None,
                ctx: _Context, path: str) -> None:
        out[tag] = _elem(tag, vr or "UN", Sequence() if vr == "SQ" else None)

    def _dummy(self, src: Dataset, out: Dataset, tag: BaseTag, elem: _Element, vr: str | None,
                ctx: _Context, path: str) -> None:
        if tag in (TAG_PATIENT_ID, TAG_PATIENT_NAME):
            out[tag] = _elem(tag, vr or "LO", ctx.pseudo_id)
        elif vr == "SQ":
            out[tag] = _elem(tag, "SQ", Sequence())
        else:
            out[tag] = _elem(tag, vr or "UN", _DUMMY.get(vr or "", "ANONYMIZED"))

    def _uid(self, src: Dataset, out: Dataset, tag: BaseTag, elem: _Element, vr: str | None,
                ctx: _Context, path: str) -> None:
        if vr != "UI":
            raise AnonymizationError(f"{_tag_str(int(tag))}: UID rule on VR {vr}; cannot apply")
        new = [self.uid(v) for v in _values(elem)]
        out[tag] = _elem(tag, "UI", new[0] if len(new) == 1 else (new or None))

    def _shift(self, src: Dataset, out: Dataset, tag: BaseTag, elem: _Element, vr: str | None,
                ctx: _Context, path: str) -> None:
        if vr not in ("DA", "DT"):
            raise AnonymizationError(f"{_tag_str(int(tag))}: date rule on VR {vr}; cannot apply")
        values = _values(elem)
        shifted = [_shift_date(v, ctx.offset, int(tag)) for v in values]
        out[tag] = _elem(tag, vr, shifted[0] if len(shifted) == 1 else (shifted or None))


def _deid_marks() -> list[tuple[int, str, object]]:
    """The elements that record the de-identification (fresh objects for every dataset)."""
    codes = Sequence()
    for value, meaning in DEID_CODES:
        item = Dataset()
        item[0x00080100] = _elem(0x00080100, "SH", value)
        item[0x00080102] = _elem(0x00080102, "SH", "DCM")
        item[0x00080104] = _elem(0x00080104, "LO", meaning)
        codes.append(item)
    return [
        (0x00120062, "CS", "YES"),  # PatientIdentityRemoved
        (0x00120063, "LO", DEID_METHOD),  # DeidentificationMethod
        (0x00120064, "SQ", codes),  # DeidentificationMethodCodeSequence
        (0x00280303, "CS", "MODIFIED"),  # LongitudinalTemporalInformationModified
    ]


@lru_cache(maxsize=4096)
def _keyword(tag: BaseTag) -> str:
    return keyword_for_tag(tag) or ("private" if tag.is_private else "unknown")


def _values(elem: DataElement | RawDataElement) -> list[str]:
    """The string values of a UI/DA/DT element, raw or decoded (all ASCII VRs)."""
    value = elem.value
    if value is None:
        return []
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii").rstrip(" \x00")
        except UnicodeDecodeError as exc:
            raise AnonymizationError(f"{_tag_str(int(elem.tag))}: value is not ASCII; cannot apply") from exc
        return [v.strip() for v in text.split("\\")] if text else []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def _shift_date(value: str, offset: int, tag: int) -> str:
    """Shift a DA (YYYYMMDD) or the date part of a DT; the DT's time part is dropped."""
    if not value:
        return value
    if len(value) < 8 or not value[:8].isdigit():
        raise AnonymizationError(f"{_tag_str(tag)}: date is not YYYYMMDD; cannot shift it")
    if len(value) > 8 and not (value[8:].replace(".", "").replace("+", "").replace("-", "").isdigit()):
        raise AnonymizationError(f"{_tag_str(tag)}: date-time is malformed; cannot shift it")
    try:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except ValueError as exc:
        raise AnonymizationError(f"{_tag_str(tag)}: not a valid date; cannot shift it") from exc
    return (day + dt.timedelta(days=offset)).strftime("%Y%m%d")


def _study_values(ds: Dataset) -> dict[str, str]:
    return {kw: str(ds.get(kw, "") or "") for kw in STUDY_KEYWORDS}


def deidentify_job(datasets: Iterable[Dataset], site_key: bytes,
                   job_id: str) -> tuple[list[Dataset], IdentityRecord]:
    """De-identify every dataset of one job; return the copies and the record the vault keeps.

    All datasets must belong to one patient (one PatientID); otherwise nothing is returned.
    """
    deid = Deidentifier(site_key)
    out: list[Dataset] = []
    patient_id: str | None = None
    first: Dataset | None = None
    studies: dict[str, dict[str, str]] = {}
    for ds in datasets:
        pid = _patient_id_of(ds)
        if patient_id is None:
            patient_id, first = pid, ds
        elif pid != patient_id:
            raise AnonymizationError(f"job {job_id}: datasets from more than one patient; refusing")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
        if study_uid and study_uid not in studies:
            studies[study_uid] = _study_values(ds)
        out.append(deid.deidentify(ds))
    if first is None or patient_id is None:
        raise AnonymizationError(f"job {job_id}: no datasets to de-identify")
    pseudo_id, offset = deid.patient(patient_id)
    charset = first.get("SpecificCharacterSet")
    record = IdentityRecord(
        job_id=job_id,
        patient={
            "PatientName": str(first.get("PatientName", "") or ""),
            "PatientID": patient_id,
            "PatientBirthDate": str(first.get("PatientBirthDate", "") or ""),
            "PatientSex": str(first.get("PatientSex", "") or ""),
        },
        pseudonyms={"PatientName": pseudo_id, "PatientID": pseudo_id},
        studies=studies,
        uids={pseudo: orig for orig, pseudo in deid.uid_map.items()},
        date_offset_days=offset,
        character_set=list(charset) if isinstance(charset, list | tuple) else str(charset or ""),
    )
    LOGGER.info("job %s: de-identified %d datasets, %d UIDs remapped", job_id, len(out), len(record.uids))
    return out, record


__all__ = ["Action", "Deidentifier", "Rule", "date_offset_days", "deidentify_job", "pseudonym_patient_id",
           "pseudonym_uid"]
