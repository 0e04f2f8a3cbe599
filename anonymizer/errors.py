"""The anonymizer's exception tree. Library errors (cryptography, pydicom) are converted here.

    AnonymizerError            base of every error this package raises on purpose
    ├── AnonymizationError     a de-identification step cannot be applied (fail closed: the job
    │                          must not leave the clinic); also a refused re-identification
    ├── SealError              a sealed stream cannot be written or read (bad header, I/O)
    │   └── IntegrityError     authentication failed: tampered, truncated, reordered, swapped
    │                          part/job, or wrong key -- the data must not be used
    └── VaultError             the identity vault cannot store or load a record (including a
                               record that does not decrypt with this site key)

Messages never contain patient data: they name tags, jobs, parts and chunk indexes only.
"""


class AnonymizerError(Exception):
    """Base of every error the anonymizer raises on purpose."""


class AnonymizationError(AnonymizerError):
    """The profile cannot be applied to this data; nothing from this job may leave the clinic."""


class SealError(AnonymizerError):
    """A sealed stream is malformed or could not be written/read."""


class IntegrityError(SealError):
    """Authentication of sealed data failed: tampered, truncated, reordered, swapped or wrong key."""


class VaultError(AnonymizerError):
    """The identity vault could not store or load a record."""
