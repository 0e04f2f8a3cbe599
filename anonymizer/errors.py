"""The one exception tree of dicom-mc-node, rooted here because every package may import anonymizer.

``anonymizer`` imports neither ``cloud`` nor ``dicom_node``, so the shared root lives in this module;
``cloud.errors`` and ``dicom_node.errors`` derive their package roots from it, and the command line
catches ``McNodeError`` alone. Errors from libraries (cryptography, pydicom, pynetdicom, boto3,
paramiko, sqlite3, OSError) are converted to one of these at the module that calls the library.

    McNodeError                      base of every error the product raises on purpose
    ├── AnonymizerError              (anonymizer.errors, this module)
    │   ├── AnonymizationError       a de-identification step cannot be applied (fail closed: the job
    │   │                            must not leave the clinic); also a refused re-identification
    │   ├── SealError                a sealed stream cannot be written or read (bad header, I/O)
    │   │   └── IntegrityError       authentication failed: tampered, truncated, reordered, swapped
    │   │                            part/job, or wrong key -- the data must not be used
    │   └── VaultError               the identity vault cannot store or load a record
    ├── CloudError                   (cloud.errors) engines, merge, stores, bundles, dispatch
    └── NodeError                    (dicom_node.errors) config, spool, journal, rejections, sending

Messages never contain patient data: they name tags, jobs, parts and chunk indexes only.
"""


class McNodeError(Exception):
    """Base of every error dicom-mc-node raises on purpose (the CLI's one except clause)."""


class AnonymizerError(McNodeError):
    """Base of every error the anonymizer raises on purpose."""


class AnonymizationError(AnonymizerError):
    """The profile cannot be applied to this data; nothing from this job may leave the clinic."""


class SealError(AnonymizerError):
    """A sealed stream is malformed or could not be written/read."""


class IntegrityError(SealError):
    """Authentication of sealed data failed: tampered, truncated, reordered, swapped or wrong key."""


class VaultError(AnonymizerError):
    """The identity vault could not store or load a record."""
