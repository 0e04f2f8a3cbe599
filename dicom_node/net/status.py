"""Named DIMSE status codes (PS3.4 / PS3.7). Handlers return these, never bare hex."""

SUCCESS = 0x0000
# C-STORE failures
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# 0xC2xx is the range we use for "could not decode/parse the data set"
CANNOT_DECODE = 0xC210
MISSING_REQUIRED_ATTRIBUTE = 0xC211
SOP_CLASS_NOT_SUPPORTED = 0x0122
