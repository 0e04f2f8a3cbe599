"""De-identification, keyed UID remap, identity vault, re-identification and AES-GCM sealing.

Must not import dicom_node, cloud or any network library.

    profile      the PS3.15 Annex E basic profile as a table of actions by tag, and the fail-closed
                 rules for tags it does not list
    deidentify   Deidentifier (apply/describe the profile), deidentify_job, pseudonym_uid
    vault        IdentityRecord, Vault (encrypted at rest), reidentify
    seal         streaming AES-256-GCM seal/open bound to job and part; data-key wrapping
    keys         the site key's check and the subkeys derived from it (HKDF-SHA256)
    errors       the exception tree
"""
