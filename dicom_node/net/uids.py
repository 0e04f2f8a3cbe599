"""SOP class UIDs the node handles and the transfer syntaxes it accepts."""

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"
RT_ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"
VERIFICATION = "1.2.840.10008.1.1"

PLAN_CLASSES = (RT_PLAN, RT_ION_PLAN)

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
    CT_IMAGE: UNCOMPRESSED_SYNTAXES + CT_COMPRESSED_SYNTAXES,
    RT_PLAN: UNCOMPRESSED_SYNTAXES,
    RT_ION_PLAN: UNCOMPRESSED_SYNTAXES,
    RT_STRUCTURE_SET: UNCOMPRESSED_SYNTAXES,
    RT_DOSE: UNCOMPRESSED_SYNTAXES,
}

SHORT_NAMES = {
    CT_IMAGE: "CT",
    RT_DOSE: "RTDOSE",
    RT_STRUCTURE_SET: "RTSTRUCT",
    RT_PLAN: "RTPLAN",
    RT_ION_PLAN: "RTIONPLAN",
}
