"""The de-identification profile as data: one action per tag, plus the defaults for unlisted tags.

Source: DICOM PS3.15 Annex E, Table E.1-1, "Basic Application Level Confidentiality Profile",
with the "Retain Longitudinal Temporal Information with Modified Dates" option (dates are shifted,
not removed, so intervals inside one patient's data stay true). Where the standard allows a choice
(X/Z, X/Z/D, X/Z/U*) the table below states the one we make.

Actions (the letters of Annex E, plus ``S`` for the modified-dates option):

    X  remove the element
    Z  keep the element, empty its value (type 2: must be present)
    D  replace with a dummy value (patient name/ID: a key-derived pseudonym)
    K  keep the value byte for byte (sequences: kept, their items de-identified the same way)
    U  replace each UID by its keyed pseudonym 2.25.<HMAC> (class UIDs are never remapped)
    S  shift the date by the patient's offset (derived from the site key and the patient ID)

Rules for tags that are not in the table, checked in this order (fail closed):

1. Private tags (odd group), group lengths, overlay (60xx) and curve (50xx) groups: removed.
2. UI: remapped (U), unless the tag holds a class UID (``CLASS_UID_TAGS``) or the value lies
   under the DICOM root 1.2.840.10008 (well-known UIDs identify nothing).
3. DA, DT: shifted (S). TM: removed (times add nothing to a dose calculation).
4. SQ: kept, items processed recursively.
5. Anything that can carry text or opaque bytes -- AE AS LO LT PN SH ST UC UR UT, OB OD OF OL OV
   OW UN -- and any public tag this pydicom does not know: **removed**, unless the tag is on the
   short ``KEEP`` list of values the dose calculation needs (geometry, beam and spot data, ROI
   names, pixel data). Removing rather than raising means an unusual TPS export still works,
   while nothing free-form leaves the clinic; a rule that cannot be applied (a malformed date,
   burned-in annotation) raises instead.
6. Everything else (CS, IS, DS, numbers, AT): kept byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import dictionary_VR, tag_for_keyword

ACTIONS: dict[str, str] = {
    "X": "remove",
    "Z": "empty the value",
    "D": "replace with a dummy value",
    "K": "keep unchanged",
    "U": "replace UID with keyed pseudonym 2.25.<HMAC-SHA256(site key, uid)>",
    "S": "shift date by the patient's key-derived offset",
}

TEXT_VRS = frozenset({"AE", "AS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
OPAQUE_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"})
DATE_VRS = frozenset({"DA", "DT"})

# Annex E Table E.1-1 (basic profile column), by keyword. Keywords are resolved against pydicom's
# dictionary at import, so a typo fails loudly rather than silently not matching.
_ANNEX_E: tuple[tuple[str, str], ...] = (
    # Patient
    ("PatientName", "D"), ("PatientID", "D"), ("PatientBirthDate", "Z"), ("PatientSex", "Z"),
    ("PatientAge", "X"), ("PatientSize", "X"), ("PatientWeight", "X"), ("PatientAddress", "X"),
    ("PatientBirthName", "X"), ("PatientBirthTime", "X"), ("PatientComments", "X"),
    ("PatientMotherBirthName", "X"), ("PatientTelephoneNumbers", "X"), ("PatientReligiousPreference", "X"),
    ("PatientSexNeutered", "X"), ("PatientState", "X"), ("PatientTransportArrangements", "X"),
    ("PatientInsurancePlanCodeSequence", "X"), ("PatientPrimaryLanguageCodeSequence", "X"),
    ("PatientPrimaryLanguageModifierCodeSequence", "X"), ("OtherPatientIDs", "X"),
    ("OtherPatientIDsSequence", "X"), ("OtherPatientNames", "X"), ("IssuerOfPatientID", "X"),
    ("ReferencedPatientSequence", "X"), ("ReferencedPatientAliasSequence", "X"),
    ("ReferencedPatientPhotoSequence", "X"), ("EthnicGroup", "X"), ("Occupation", "X"),
    ("AdditionalPatientHistory", "X"), ("Allergies", "X"), ("MedicalAlerts", "X"),
    ("MedicalRecordLocator", "X"), ("MilitaryRank", "X"), ("BranchOfService", "X"),
    ("CountryOfResidence", "X"), ("RegionOfResidence", "X"), ("SmokingStatus", "X"),
    ("PregnancyStatus", "X"), ("LastMenstrualDate", "X"), ("SpecialNeeds", "X"),
    ("PatientBirthDateInAlternativeCalendar", "X"), ("PatientDeathDateInAlternativeCalendar", "X"),
    ("ResponsiblePerson", "X"), ("ResponsibleOrganization", "X"), ("InsurancePlanIdentification", "X"),
    ("PersonAddress", "X"), ("PersonTelephoneNumbers", "X"), ("PersonName", "X"),
    ("PersonIdentificationCodeSequence", "X"),
    # Study, visit, request
    ("StudyInstanceUID", "U"), ("StudyDate", "S"), ("StudyTime", "Z"), ("StudyID", "Z"),
    ("AccessionNumber", "Z"), ("StudyDescription", "X"), ("StudyComments", "X"), ("StudyIDIssuer", "X"),
    ("ReferringPhysicianName", "Z"), ("ReferringPhysicianAddress", "X"),
    ("ReferringPhysicianTelephoneNumbers", "X"), ("ReferringPhysicianIdentificationSequence", "X"),
    ("PhysiciansOfRecord", "X"), ("PhysiciansOfRecordIdentificationSequence", "X"),
    ("NameOfPhysiciansReadingStudy", "X"), ("PhysiciansReadingStudyIdentificationSequence", "X"),
    ("RequestingPhysician", "X"), ("RequestingService", "X"), ("ReasonForStudy", "X"),
    ("ReasonForTheRequestedProcedure", "X"), ("RequestedProcedureDescription", "X"),
    ("RequestedProcedureComments", "X"), ("RequestedProcedureID", "X"), ("RequestedProcedureLocation", "X"),
    ("RequestedContrastAgent", "X"), ("RequestAttributesSequence", "X"),
    ("ImagingServiceRequestComments", "X"), ("PlacerOrderNumberImagingServiceRequest", "Z"),
    ("FillerOrderNumberImagingServiceRequest", "Z"), ("OrderEnteredBy", "X"), ("OrderEntererLocation", "X"),
    ("OrderCallbackPhoneNumber", "X"), ("AdmissionID", "X"), ("IssuerOfAdmissionID", "X"),
    ("AdmittingDate", "X"), ("AdmittingTime", "X"), ("AdmittingDiagnosesDescription", "X"),
    ("AdmittingDiagnosesCodeSequence", "X"), ("DischargeDiagnosisDescription", "X"),
    ("CurrentPatientLocation", "X"), ("ScheduledPatientInstitutionResidence", "X"), ("VisitComments", "X"),
    ("ServiceEpisodeID", "X"), ("ServiceEpisodeDescription", "X"), ("IssuerOfServiceEpisodeID", "X"),
    ("ReferencedStudySequence", "X"), ("ReferencedPerformedProcedureStepSequence", "X"),
    # Series, equipment, operators, institution
    ("SeriesInstanceUID", "U"), ("SeriesDate", "S"), ("SeriesTime", "X"), ("SeriesDescription", "X"),
    ("ProtocolName", "X"), ("OperatorsName", "X"), ("OperatorIdentificationSequence", "X"),
    ("PerformingPhysicianName", "X"), ("PerformingPhysicianIdentificationSequence", "X"),
    ("InstitutionName", "X"), ("InstitutionAddress", "X"), ("InstitutionCodeSequence", "X"),
    ("InstitutionalDepartmentName", "X"), ("StationName", "X"), ("DeviceSerialNumber", "X"),
    ("DeviceUID", "U"), ("DetectorID", "X"), ("GantryID", "X"), ("GeneratorID", "X"), ("CassetteID", "X"),
    ("PerformedProcedureStepID", "X"), ("PerformedProcedureStepDescription", "X"),
    ("PerformedProcedureStepStartDate", "X"), ("PerformedProcedureStepStartTime", "X"),
    ("PerformedProcedureStepEndDate", "X"), ("PerformedProcedureStepEndTime", "X"),
    ("PerformedLocation", "X"), ("PerformedStationAETitle", "X"), ("PerformedStationName", "X"),
    ("PerformedStationNameCodeSequence", "X"), ("PerformedStationGeographicLocationCodeSequence", "X"),
    ("CommentsOnThePerformedProcedureStep", "X"), ("ScheduledProcedureStepDescription", "X"),
    ("ScheduledProcedureStepLocation", "X"), ("ScheduledStationAETitle", "X"), ("ScheduledStationName", "X"),
    ("ScheduledStationNameCodeSequence", "X"), ("ScheduledStationGeographicLocationCodeSequence", "X"),
    ("ScheduledPerformingPhysicianName", "X"), ("ScheduledPerformingPhysicianIdentificationSequence", "X"),
    ("ScheduledHumanPerformersSequence", "X"), ("ScheduledStudyLocation", "X"),
    ("ScheduledStudyLocationAETitle", "X"), ("ActualHumanPerformersSequence", "X"),
    ("HumanPerformerName", "X"), ("HumanPerformerOrganization", "X"),
    # Instance, acquisition, content
    ("SOPInstanceUID", "U"), ("MediaStorageSOPInstanceUID", "U"), ("InstanceCreatorUID", "U"),
    ("InstanceCreationDate", "S"), ("InstanceCreationTime", "X"), ("InstanceCoercionDateTime", "X"),
    ("TimezoneOffsetFromUTC", "X"), ("AcquisitionDate", "S"), ("AcquisitionTime", "X"),
    ("AcquisitionDateTime", "S"), ("ContentDate", "S"), ("ContentTime", "Z"),
    ("AcquisitionComments", "X"), ("AcquisitionContextSequence", "X"),
    ("AcquisitionDeviceProcessingDescription", "X"), ("AcquisitionProtocolDescription", "X"),
    ("ContrastBolusAgent", "Z"), ("DerivationDescription", "X"), ("ImageComments", "X"),
    ("FrameComments", "X"), ("ImagePresentationComments", "X"), ("IconImageSequence", "X"),
    ("IdentifyingComments", "X"), ("ContentCreatorName", "Z"),
    ("ContentCreatorIdentificationCodeSequence", "X"),
    ("ContentSequence", "X"), ("TextString", "X"), ("TextComments", "X"), ("GraphicAnnotationSequence", "X"),
    ("ModifiedImageDescription", "X"), ("ContributionDescription", "X"), ("DataSetTrailingPadding", "X"),
    ("DigitalSignaturesSequence", "X"), ("DigitalSignatureUID", "X"), ("MAC", "X"),
    ("ReferencedDigitalSignatureSequence", "X"), ("ReferencedSOPInstanceMACSequence", "X"),
    ("OriginalAttributesSequence", "X"), ("ModifiedAttributesSequence", "X"),
    ("AuthorObserverSequence", "X"), ("ParticipantSequence", "X"), ("CustodialOrganizationSequence", "X"),
    ("VerifyingObserverSequence", "X"), ("VerifyingObserverName", "X"), ("VerifyingOrganization", "X"),
    ("VerifyingObserverIdentificationCodeSequence", "X"), ("DistributionName", "X"),
    ("DistributionAddress", "X"), ("NamesOfIntendedRecipientsOfResults", "X"),
    ("IntendedRecipientsOfResultsIdentificationSequence", "X"), ("ResultsDistributionListSequence", "X"),
    ("InterpretationAuthor", "X"), ("InterpretationRecorder", "X"), ("InterpretationTranscriber", "X"),
    ("InterpretationText", "X"), ("InterpretationDiagnosisDescription", "X"), ("InterpretationIDIssuer", "X"),
    ("InterpretationApproverSequence", "X"), ("PhysicianApprovingInterpretation", "X"), ("Impressions", "X"),
    ("ResultsComments", "X"), ("ResultsIDIssuer", "X"), ("TopicTitle", "X"), ("TopicSubject", "X"),
    ("TopicAuthor", "X"), ("TopicKeywords", "X"), ("Arbitrary", "X"), ("AddressTrial", "X"),
    ("ConfidentialityConstraintOnPatientDataDescription", "X"), ("PreMedication", "X"),
    # Referenced UIDs (U*: remapped, sequences kept so references still resolve)
    ("ReferencedSOPInstanceUID", "U"), ("ReferencedSOPInstanceUIDInFile", "U"),
    ("ReferencedFrameOfReferenceUID", "U"), ("RelatedFrameOfReferenceUID", "U"),
    ("FrameOfReferenceUID", "U"), ("SynchronizationFrameOfReferenceUID", "U"), ("ConcatenationUID", "U"),
    ("DimensionOrganizationUID", "U"), ("DoseReferenceUID", "U"), ("FiducialUID", "U"),
    ("IrradiationEventUID", "U"), ("StorageMediaFileSetUID", "U"), ("TransactionUID", "U"),
    ("TemplateExtensionOrganizationUID", "U"), ("TemplateExtensionCreatorUID", "U"),
    ("ContextGroupExtensionCreatorUID", "U"), ("CreatorVersionUID", "U"), ("FailedSOPInstanceUIDList", "U"),
    ("LargePaletteColorLookupTableUID", "U"), ("PaletteColorLookupTableUID", "U"), ("UID", "U"),
    ("ReferencedImageSequence", "K"), ("SourceImageSequence", "K"),
    # Radiotherapy
    ("RTPlanLabel", "D"), ("RTPlanName", "X"), ("RTPlanDescription", "X"), ("RTPlanDate", "S"),
    ("RTPlanTime", "X"), ("StructureSetLabel", "D"), ("StructureSetName", "X"),
    ("StructureSetDescription", "X"), ("StructureSetDate", "S"), ("StructureSetTime", "X"),
    ("ROIDescription", "X"), ("ROIGenerationDescription", "X"), ("ROIInterpreter", "Z"),
    ("ROIObservationLabel", "X"), ("FractionGroupDescription", "X"), ("DoseReferenceDescription", "X"),
    ("PrescriptionDescription", "X"), ("TreatmentSite", "X"), ("SetupTechniqueDescription", "X"),
    ("RespiratoryMotionCompensationTechniqueDescription", "X"), ("ReviewerName", "X"),
    ("ReviewDate", "S"), ("ReviewTime", "X"),
)

# Text-capable tags the dose calculation needs, kept although rule 5 would remove them. Each is a
# machine/device identifier, a coded value or a geometry/label the engine reads -- not free text.
_KEEP: tuple[str, ...] = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "RescaleType", "PositionReferenceIndicator",
    "ROIName", "BeamName", "TreatmentMachineName", "ScanSpotTuneID", "RangeShifterID",
    "LateralSpreadingDeviceID", "RangeModulatorID", "SnoutID", "MaterialID", "BlockName",
    # Device identifiers and settings a beam model is looked up by (range shifter in/out, etc.).
    "RangeShifterSetting", "LateralSpreadingDeviceSetting", "ApplicatorID", "BlockTrayID", "CompensatorID",
    "WedgeID", "BolusID", "AccessoryCode", "TrayAccessoryCode",
    "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
    "URNCodeValue",
)

# UI tags whose values are class UIDs or transfer syntaxes: kept, never remapped.
_CLASS_UIDS: tuple[str, ...] = (
    "SOPClassUID", "ReferencedSOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID",
    "ImplementationClassUID", "ReferencedSOPClassUIDInFile", "ReferencedTransferSyntaxUIDInFile",
    "RelatedGeneralSOPClassUID", "OriginalSpecializedSOPClassUID", "SOPClassesInStudy", "CodingSchemeUID",
    "PrivateInformationCreatorUID", "MappingResourceUID", "ContextUID", "ReferencedColorPaletteInstanceUID",
)

DICOM_UID_ROOT = "1.2.840.10008."


@dataclass(frozen=True)
class Rule:
    """What happens to one element, and a one-line reason a reviewer can read."""

    action: str
    detail: str


def _resolve(keywords: tuple[str, ...]) -> list[int]:
    tags = []
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise RuntimeError(f"profile names unknown DICOM keyword {keyword!r}")  # caught by the tests
        tags.append(int(tag))
    return tags


PROFILE: dict[int, str] = dict(zip(_resolve(tuple(k for k, _ in _ANNEX_E)), (a for _, a in _ANNEX_E),
                                   strict=True))
KEEP: frozenset[int] = frozenset(_resolve(_KEEP))
CLASS_UID_TAGS: frozenset[int] = frozenset(_resolve(_CLASS_UIDS))

_DETAIL = {
    "X": "removed (PS3.15 E.1-1)",
    "Z": "emptied (PS3.15 E.1-1)",
    "D": "dummy value (PS3.15 E.1-1)",
    "K": "kept (PS3.15 E.1-1)",
    "U": "UID replaced by keyed pseudonym (PS3.15 E.1-1)",
    "S": "date shifted by patient offset (modified dates option)",
}
PSEUDONYM_DETAIL = "replaced by key-derived pseudonym"


@lru_cache(maxsize=8192)
def vr_of(tag: int, explicit_vr: str | None) -> str | None:
    """The VR that decides the rule: as encoded when explicit, else from the dictionary.

    A public tag encoded as UN (a sender that did not know the VR) is judged by its dictionary VR,
    so a UN-encoded sequence is walked and a UN-encoded date shifted rather than kept as opaque
    bytes. None means a tag this pydicom does not know (removed by rule 5).
    """
    if explicit_vr and (explicit_vr != "UN" or tag >> 16 & 1):
        return str(explicit_vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return str(explicit_vr) if explicit_vr else None


@lru_cache(maxsize=4096)
def rule_for(tag: int, vr: str | None) -> Rule:
    """The rule for one element (see the module docstring for the order)."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2:
        return Rule("X", "private tag removed")
    if element == 0:
        return Rule("X", "group length removed")
    if group & 0xFF00 in (0x5000, 0x6000):
        return Rule("X", "curve/overlay group removed (may hold burned-in text)")
    action = PROFILE.get(tag)
    if action is not None:
        if tag in (0x00100010, 0x00100020):
            return Rule(action, PSEUDONYM_DETAIL)
        if action == "K" and vr == "SQ":
            return Rule("K", "kept, items de-identified (PS3.15 E.1-1 U*)")
        return Rule(action, _DETAIL[action])
    if tag in KEEP:
        return Rule("K", "kept: needed by the dose calculation")
    if vr == "UI":
        if tag in CLASS_UID_TAGS:
            return Rule("K", "class UID kept")
        return Rule("U", "UID replaced by keyed pseudonym (all UIDs except class UIDs)")
    if vr in DATE_VRS:
        return Rule("S", "date shifted by patient offset (unlisted date)")
    if vr == "TM":
        return Rule("X", "time removed (unlisted time)")
    if vr == "SQ":
        return Rule("K", "sequence kept, items de-identified")
    if vr is None:
        return Rule("X", "unknown public tag removed (fail closed)")
    if vr in TEXT_VRS or vr in OPAQUE_VRS:
        return Rule("X", f"{vr} can carry text: removed (fail closed)")
    return Rule("K", f"{vr} value kept")
