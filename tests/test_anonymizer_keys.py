"""One site-key check and one key derivation for every user of the site key."""

from __future__ import annotations

import pytest

from anonymizer.deidentify import Deidentifier
from anonymizer.errors import AnonymizationError, SealError, VaultError
from anonymizer.keys import derive_key
from anonymizer.seal import new_data_key, unwrap_key, wrap_key
from anonymizer.vault import Vault


@pytest.mark.parametrize(("make", "error"), [
    (lambda key, tmp: Deidentifier(key), AnonymizationError),
    (lambda key, tmp: Vault(tmp, key), VaultError),
    (lambda key, tmp: wrap_key(key, new_data_key(), "job-1"), SealError),
])
def test_every_user_refuses_a_short_site_key_the_same_way(tmp_path, make, error):
    with pytest.raises(error, match="site key must be 32 bytes, got 31"):
        make(b"k" * 31, tmp_path)
    with pytest.raises(error, match="site key must be 32 bytes, got str"):
        make("k" * 32, tmp_path)


def test_subkeys_differ_by_use_and_wrapping_uses_its_own():
    site = bytes(range(32))
    assert derive_key(site, b"mcnode vault v1") != derive_key(site, b"mcnode key wrap v1")
    assert derive_key(site, b"mcnode vault v1") == derive_key(bytes(range(32)), b"mcnode vault v1")
    data_key = new_data_key()
    assert unwrap_key(site, wrap_key(site, data_key, "job-1"), "job-1") == data_key
