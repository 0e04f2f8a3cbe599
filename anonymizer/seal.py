"""Sealing: AES-256-GCM in chunks, streaming, bound to a job and a part name; key wrapping.

Sealed stream format (version 1), all integers big-endian::

    header  "MCSEAL" | version u8 = 1 | chunk_size u32 | nonce_prefix 8 bytes
            | key_check 16 bytes | len u16 + job_id (UTF-8) | len u16 + part (UTF-8)
    chunks  AES-256-GCM(key, nonce = nonce_prefix | index u32, plaintext chunk,
                        aad = header | index u64 | final u8) -- each chunk_size + 16 bytes,
            the last one shorter or equal; an empty input is one empty final chunk.

- The whole header is authenticated by every chunk, so a changed job id, part or prefix fails.
- ``key_check`` = HMAC-SHA256(key, "mcnode seal key check" | nonce_prefix)[:16]: a wrong key is
  reported as such (and makes the scheme key-committing) instead of as generic tampering.
- The index in the nonce and AAD catches reordering; the final flag catches truncation at a chunk
  boundary and appended data.
- Only two chunks are in memory at a time; a bundle of hundreds of MB is never held whole.

``open_stream`` writes each chunk as soon as it is verified; if it raises, what was written is not
trustworthy and must be discarded (``open_file`` does that for you: it writes a temp file and
renames it only after the final chunk verified).

Data keys are fresh per job (``new_data_key``) and at rest only as ``wrap_key`` output: AES-256-GCM
under a key derived from the site key (HKDF-SHA256, info ``mcnode key wrap v1``), job id as AAD.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anonymizer.durable import write_atomically
from anonymizer.errors import IntegrityError, SealError
from anonymizer.keys import derive_key

MAGIC = b"MCSEAL"
VERSION = 1
CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 64 << 20
TAG_LEN = 16
_PREFIX_LEN = 8
_CHECK_LEN = 16
_FIXED = struct.Struct(">6sBI8s16s")
_WRAP_MAGIC = b"MCWRAP\x01"
_MAX_CHUNKS = 1 << 32


def new_data_key() -> bytes:
    """A fresh random 256-bit data key (one per job)."""
    return secrets.token_bytes(32)


def _check_key(key: bytes) -> AESGCM:
    if not isinstance(key, bytes | bytearray) or len(key) != 32:
        raise SealError("key must be 32 bytes (AES-256)")
    return AESGCM(bytes(key))


def _name(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if not raw or len(raw) > 0xFFFF:
        raise SealError(f"{what} must be 1-65535 bytes of UTF-8")
    return struct.pack(">H", len(raw)) + raw


def _key_check(key: bytes, prefix: bytes) -> bytes:
    return hmac.new(key, b"mcnode seal key check\x00" + prefix, hashlib.sha256).digest()[:_CHECK_LEN]


def _read_exact(src: BinaryIO, n: int) -> bytes:
    """Read up to n bytes, looping over short reads (pipes, sockets); fewer only at EOF."""
    first = src.read(n)
    if not first or len(first) == n:
        return first or b""
    parts = [first]
    got = len(first)
    while got < n:
        more = src.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def seal_stream(src: BinaryIO, dst: BinaryIO, key: bytes, job_id: str, part: str,
                chunk_size: int = CHUNK_SIZE) -> int:
    """Encrypt ``src`` to ``dst`` for (job_id, part); return the number of plaintext bytes."""
    aead = _check_key(key)
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise SealError(f"chunk size must be 1..{MAX_CHUNK_SIZE} bytes")
    prefix = secrets.token_bytes(_PREFIX_LEN)
    header = (_FIXED.pack(MAGIC, VERSION, chunk_size, prefix, _key_check(bytes(key), prefix))
              + _name(job_id, "job id") + _name(part, "part name"))
    dst.write(header)
    total = 0
    index = 0
    cur = _read_exact(src, chunk_size)
    while True:
        nxt = _read_exact(src, chunk_size) if len(cur) == chunk_size else b""
        final = not nxt
        if index >= _MAX_CHUNKS:
            raise SealError("input too large for one sealed stream")
        dst.write(aead.encrypt(_nonce(prefix, index), cur, _aad(header, index, final)))
        total += len(cur)
        index += 1
        if final:
            return total
        cur = nxt


def _read_header(src: BinaryIO) -> tuple[bytes, int, bytes, bytes, str, str]:
    fixed = _read_exact(src, _FIXED.size)
    if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
        raise SealError("not a sealed stream (bad magic or too short)")
    magic, version, chunk_size, prefix, check = _FIXED.unpack(fixed)
    if version != VERSION:
        raise SealError(f"sealed stream version {version} is not supported (expected {VERSION})")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise IntegrityError("sealed stream header is corrupt (chunk size out of range)")
    names = []
    raw_names = b""
    for _ in range(2):
        raw_len = _read_exact(src, 2)
        if len(raw_len) < 2:
            raise IntegrityError("sealed stream is truncated inside its header")
        (n,) = struct.unpack(">H", raw_len)
        raw = _read_exact(src, n)
        if len(raw) < n:
            raise IntegrityError("sealed stream is truncated inside its header")
        raw_names += raw_len + raw
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise IntegrityError("sealed stream header is corrupt (names are not UTF-8)") from exc
    return fixed + raw_names, chunk_size, prefix, check, names[0], names[1]


def open_stream(src: BinaryIO, dst: BinaryIO, key: bytes, job_id: str, part: str) -> int:
    """Verify and decrypt ``src`` to ``dst``; return plaintext bytes. Raises IntegrityError.

    Expects the stream to be sealed for exactly this job id and part name.
    """
    aead = _check_key(key)
    header, chunk_size, prefix, check, sealed_job, sealed_part = _read_header(src)
    if (sealed_job, sealed_part) != (job_id, part):
        raise IntegrityError(f"swapped part: this is part {sealed_part!r} of job {sealed_job!r}, "
                             f"expected part {part!r} of job {job_id!r}")
    if not hmac.compare_digest(check, _key_check(bytes(key), prefix)):
        raise IntegrityError(f"wrong key for part {part!r} of job {job_id!r}")
    block = chunk_size + TAG_LEN
    total = 0
    index = 0
    cur = _read_exact(src, block)
    while True:
        if len(cur) < TAG_LEN:
            raise IntegrityError(f"part {part!r} of job {job_id!r} is truncated: "
                                 f"chunk {index} is missing or cut short")
        nxt = _read_exact(src, block) if len(cur) == block else b""
        final = not nxt
        try:
            plain = aead.decrypt(_nonce(prefix, index), cur, _aad(header, index, final))
        except InvalidTag as exc:
            why = "truncated, or altered" if final else "altered, reordered or truncated"
            raise IntegrityError(f"part {part!r} of job {job_id!r} fails authentication at chunk {index}: "
                                 f"{why}") from exc
        dst.write(plain)
        total += len(plain)
        index += 1
        if final:
            return total
        cur = nxt


def seal_bytes(data: bytes, key: bytes, job_id: str, part: str) -> bytes:
    """``seal_stream`` for small parts held in memory anyway (manifests, tallies); bundles use streams."""
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, key, job_id, part)
    return out.getvalue()


def open_bytes(sealed: bytes, key: bytes, job_id: str, part: str) -> bytes:
    """``open_stream`` for small parts; raises IntegrityError exactly as the stream version does."""
    out = io.BytesIO()
    open_stream(io.BytesIO(sealed), out, key, job_id, part)
    return out.getvalue()


def _via_temp(dst: Path, write: Callable[[BinaryIO], int]) -> int:
    dst = Path(dst)
    try:
        return write_atomically(dst, write)
    except OSError as exc:
        raise SealError(f"cannot write {dst.name}: {exc.strerror}") from exc


def seal_file(src: Path, dst: Path, key: bytes, job_id: str, part: str) -> int:
    """Seal a file; ``dst`` appears (mode 0600) only when complete."""
    with open(src, "rb") as fin:
        return _via_temp(Path(dst), lambda out: seal_stream(fin, out, key, job_id, part))


def open_file(src: Path, dst: Path, key: bytes, job_id: str, part: str) -> int:
    """Open a sealed file; ``dst`` appears only when every chunk verified (nothing on failure)."""
    with open(src, "rb") as fin:
        return _via_temp(Path(dst), lambda out: open_stream(fin, out, key, job_id, part))


def _wrap_aead(site_key: bytes) -> AESGCM:
    return AESGCM(derive_key(site_key, b"mcnode key wrap v1", SealError))


def wrap_key(site_key: bytes, data_key: bytes, job_id: str) -> bytes:
    """The data key encrypted under the site key, bound to the job id; safe to store."""
    _check_key(data_key)
    nonce = secrets.token_bytes(12)
    sealed = _wrap_aead(site_key).encrypt(nonce, bytes(data_key), b"wrap\x00" + job_id.encode())
    return _WRAP_MAGIC + nonce + sealed


def unwrap_key(site_key: bytes, wrapped: bytes, job_id: str) -> bytes:
    """Inverse of ``wrap_key``; IntegrityError for a wrong site key, another job's key or tampering."""
    if not wrapped.startswith(_WRAP_MAGIC) or len(wrapped) != len(_WRAP_MAGIC) + 12 + 32 + TAG_LEN:
        raise SealError("not a wrapped data key")
    nonce = wrapped[len(_WRAP_MAGIC):len(_WRAP_MAGIC) + 12]
    try:
        return _wrap_aead(site_key).decrypt(nonce, wrapped[len(_WRAP_MAGIC) + 12:],
                                            b"wrap\x00" + job_id.encode())
    except InvalidTag as exc:
        raise IntegrityError(f"wrapped key of job {job_id!r} does not open: wrong site key, another job's "
                             "key, or altered") from exc
