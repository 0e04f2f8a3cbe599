"""The site key: its size, its check, and the keys derived from it.

Every user of the site key (de-identification, the vault, data-key wrapping, the configuration
loader) refuses a bad one here, and every subkey comes from the one derivation below:
HKDF-SHA256, no salt, 32 bytes, with an ``info`` string that names its use (``mcnode vault v1``,
``mcnode key wrap v1``), so no two uses ever share a key.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from anonymizer.errors import AnonymizerError, McNodeError

SITE_KEY_BYTES = 32


def check_site_key(key: object, error: type[McNodeError] = AnonymizerError, what: str = "site key") -> bytes:
    """`key` if it is a site key (32 bytes); else `error` ("<what> must be 32 bytes, got N")."""
    if not isinstance(key, bytes) or len(key) != SITE_KEY_BYTES:
        got = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise error(f"{what} must be {SITE_KEY_BYTES} bytes, got {got}")
    return key


def derive_key(site_key: bytes, info: bytes, error: type[McNodeError] = AnonymizerError) -> bytes:
    """The 32-byte subkey of the site key for the use `info` names (HKDF-SHA256)."""
    check_site_key(site_key, error)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(site_key)
