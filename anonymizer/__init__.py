"""De-identification, keyed UID remap, identity vault, re-identification and AES-GCM sealing.

Must not import dicom_node, cloud or any network library.
"""
