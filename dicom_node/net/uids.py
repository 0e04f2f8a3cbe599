"""The SOP classes the node handles and the transfer syntaxes it accepts.

The UIDs themselves are pydicom's constants (pydicom.uid.CTImageStorage, RTIonPlanStorage, ...);
modules import them from there. This module holds only the node's choices among them.
"""

from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    RTDoseStorage,
    RTIonPlanStorage,
    RTPlanStorage,
    RTStructureSetStorage,
)

# pydicom exports no constant for the Verification SOP Class (C-ECHO); pynetdicom.sop_class does, but
# this module is imported where pynetdicom is not needed (assembler, pipeline, phantom).
VERIFICATION = UID("1.2.840.10008.1.1")

PLAN_CLASSES = (RTPlanStorage, RTIonPlanStorage)

# Storage classes we accept, each with the transfer syntaxes we store as received.
UNCOMPRESSED_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
# Compressed CT we can decode (pydicom with pylibjpeg and its plugins), lossless only: lossy
# compression changes HU values, and a dose computed on them is not one we can stand behind.
# Any other syntax is refused at association negotiation, so it is never accepted and then stuck.
CT_COMPRESSED_SYNTAXES = (JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless)
STORAGE_CONTEXTS: dict[str, tuple[str, ...]] = {
    CTImageStorage: UNCOMPRESSED_SYNTAXES + CT_COMPRESSED_SYNTAXES,
    RTPlanStorage: UNCOMPRESSED_SYNTAXES,
    RTIonPlanStorage: UNCOMPRESSED_SYNTAXES,
    RTStructureSetStorage: UNCOMPRESSED_SYNTAXES,
    RTDoseStorage: UNCOMPRESSED_SYNTAXES,
}

SHORT_NAMES: dict[str, str] = {
    CTImageStorage: "CT",
    RTDoseStorage: "RTDOSE",
    RTStructureSetStorage: "RTSTRUCT",
    RTPlanStorage: "RTPLAN",
    RTIonPlanStorage: "RTIONPLAN",
}
