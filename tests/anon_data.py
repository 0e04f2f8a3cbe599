"""Factory for anonymizer tests: a small phantom study with identity planted everywhere a TPS can.

``planted_study()`` returns the study and the list of strings that must not survive
de-identification. Tests state only what differs from this.
"""

from __future__ import annotations

import io
import re
import secrets

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.phantom import FakeIdentity, PhantomSpec, Study, build_study

# A name with a non-ASCII letter, so Latin-1 and UTF-8 encodings of it are both checked.
IDENTITY = FakeIdentity(
    patient_name="Lindqvist^Åsa^Mariabella",
    patient_id="PAT-4471920",
    birth_date="19580412",
    physician="Okonkwo^Chidi^^Dr.",
    operator="Brennan^Siobhan",
    institution="St. Elsewhere Proton Centre",
    accession="A261123-0042",
    study_date="20261123",
    study_time="101517.4242",
)
SMALL = PhantomSpec(size_mm=(60.0, 60.0, 25.0), spacing_mm=(5.0, 5.0, 5.0), identity=IDENTITY)

# Every string below is planted somewhere in planted_study(); none may survive.
PLANTED: tuple[str, ...] = (
    "Lindqvist", "Åsa", "Mariabella", "PAT-4471920", "19580412", "Okonkwo", "Chidi", "Brennan", "Siobhan",
    "St. Elsewhere", "Proton Centre", "A261123-0042", "20261123", "101517.4242",
    "OTHERID-99817", "SEQID-55123", "Mercy Registry", "Svensson", "Karin", "Harbour Lane",
    "latex", "Ingridsdottir", "Castellanos", "Beatriz", "Nakamura", "Hiroshi", "Petrov", "Dmitri",
    "Haddad", "Yusuf", "Moreau", "Claire", "Fjord Street", "West Wing", "PROTONWS07",
    "moved during scan", "follow-up", "LINDQ_PELVIS", "LQ_SS_0412", "Structures by hand",
    "drawn for", "ACME TPS", "secret private", "PRIVATE-BYTES", "063045", "20261124",
    "Standard fx", "Vega^Lucia", "Okafor", "19991231", "20261123101517.4242",
)


def _private(ds: Dataset, text: str) -> None:
    block = ds.private_block(0x0009, "ACME TPS 1.0", create=True)
    block.add_new(0x01, "LO", text)
    block.add_new(0x02, "OB", b"PRIVATE-BYTES PAT-4471920 ")


def plant(study: Study) -> Study:
    """Put identifying text into every place a TPS can (mutates and returns the study)."""
    for ds in study.all():
        ds.OtherPatientIDs = "OTHERID-99817"
        other = Dataset()
        other.PatientID = "SEQID-55123"
        other.IssuerOfPatientID = "Mercy Registry"
        ds.OtherPatientIDsSequence = Sequence([other])
        ds.OtherPatientNames = "Svensson^Karin"
        ds.PatientAddress = "12 Harbour Lane, Gothenburg"
        ds.PatientComments = "Allergic to latex; call daughter Ingridsdottir"
        ds.PatientBirthTime = "063045"
        ds.PhysiciansOfRecord = "Haddad^Yusuf"
        ds.PerformingPhysicianName = "Moreau^Claire"
        ds.InstitutionAddress = "99 Fjord Street"
        ds.InstitutionalDepartmentName = "Radiation Oncology West Wing"
        ds.StationName = "PROTONWS07"
        ds.StudyDescription = "Pelvis follow-up"
        ds.SeriesDate = "20261124"
        ds.SeriesTime = "101517.4242"
        ds.AcquisitionDateTime = "20261123101517.4242"
        _private(ds, "secret private Lindqvist")
    for ct in study.ct:
        ct.ImageComments = "Patient Lindqvist moved during scan"
        ct.AcquisitionDate = "20261123"
        # A vendor item holding a name, nested in a sequence the profile keeps.
        src = Dataset()
        src.ReferencedSOPClassUID = ct.SOPClassUID
        src.ReferencedSOPInstanceUID = ct.SOPInstanceUID
        src.OperatorsName = "Vega^Lucia"
        _private(src, "secret private nested")
        ct.SourceImageSequence = Sequence([src])
    rs = study.rtstruct
    rs.StructureSetLabel = "LQ_SS_0412"
    rs.StructureSetName = "Lindqvist structures"
    rs.StructureSetDescription = "Structures by hand, Dr Okonkwo"
    for roi in rs.StructureSetROISequence:
        roi.ROIDescription = "drawn for Mariabella"
        roi.ROIGenerationDescription = "by Okafor"
    for obs in rs.RTROIObservationsSequence:
        obs.ROIInterpreter = "Petrov^Dmitri"
        obs.ROIObservationLabel = "Petrov check"
    plan = study.plan
    plan.RTPlanLabel = "LINDQ_PELVIS"
    plan.RTPlanName = "Lindqvist pelvis v2"
    plan.ReviewerName = "Castellanos^Beatriz"
    plan.ReviewDate = "19991231"
    plan.ReviewTime = "063045"
    plan.FractionGroupSequence[0].FractionGroupDescription = "Standard fx for PAT-4471920"
    for beam in plan.IonBeamSequence:
        beam.OperatorsName = "Nakamura^Hiroshi"  # a name where no TPS should put one, nested
        _private(beam.IonControlPointSequence[0], "secret private spot Lindqvist")
    return study


def planted_study(spec: PhantomSpec = SMALL) -> Study:
    return plant(build_study(spec))


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encodings(text: str) -> set[bytes]:
    out = {text.encode("utf-8")}
    try:
        out.add(text.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return out


def leaks(data: bytes, strings: tuple[str, ...] = PLANTED, min_bytes: int = 0) -> list[str]:
    """The planted strings found in data, in any encoding, any case (digits: as a whole number).

    For ciphertext pass ``min_bytes=6``: a 3-byte string turns up in 100 kB of random bytes by chance.
    """
    found = []
    for text in strings:
        if min(len(e) for e in encodings(text)) < min_bytes:
            continue
        for enc in encodings(text):
            if enc.isdigit() or re.fullmatch(rb"[0-9.]+", enc):
                # Digits alone could occur inside a 39-digit pseudonym UID; a planted date/time
                # stands alone, between non-digits.
                pattern = rb"(?<![0-9])" + re.escape(enc) + rb"(?![0-9])"
                if re.search(pattern, data):
                    found.append(text)
            elif re.search(re.escape(enc), data, re.IGNORECASE):
                found.append(text)
    return found


def new_key() -> bytes:
    return secrets.token_bytes(32)
