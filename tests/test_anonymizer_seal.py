"""Sealing: round trips, and every kind of tampering, truncation, swap or wrong key is refused."""

from __future__ import annotations

import io
import os
import tracemalloc

import pytest

from anonymizer.errors import IntegrityError, SealError
from anonymizer.seal import (
    TAG_LEN,
    new_data_key,
    open_bytes,
    open_file,
    open_stream,
    seal_bytes,
    seal_file,
    seal_stream,
    unwrap_key,
    wrap_key,
)

CHUNK = 64  # small chunks so a few hundred bytes give many of them


def _seal(data: bytes, key: bytes, job: str = "job-1", part: str = "bundle") -> bytes:
    out = io.BytesIO()
    seal_stream(io.BytesIO(data), out, key, job, part, chunk_size=CHUNK)
    return out.getvalue()


def _open(sealed: bytes, key: bytes, job: str = "job-1", part: str = "bundle") -> bytes:
    out = io.BytesIO()
    open_stream(io.BytesIO(sealed), out, key, job, part)
    return out.getvalue()


def _header_len(job: str = "job-1", part: str = "bundle") -> int:
    return 6 + 1 + 4 + 8 + 16 + 2 + len(job) + 2 + len(part)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 7])
def test_round_trip(size):
    key = new_data_key()
    data = os.urandom(size)
    sealed = _seal(data, key)
    assert _open(sealed, key) == data
    chunks = max(1, -(-size // CHUNK))
    assert len(sealed) == _header_len() + size + chunks * TAG_LEN
    assert size < 16 or data not in sealed  # a byte or two can occur in ciphertext by chance


def test_default_chunking_and_bytes_helpers():
    key = new_data_key()
    data = os.urandom(3 * (1 << 20) + 5)
    sealed = seal_bytes(data, key, "job-x", "result")
    assert open_bytes(sealed, key, "job-x", "result") == data


def test_fresh_nonce_every_time():
    key = new_data_key()
    assert _seal(b"same", key) != _seal(b"same", key)
    assert new_data_key() != new_data_key() and len(new_data_key()) == 32


def test_wrong_key():
    sealed = _seal(b"x" * 300, new_data_key())
    with pytest.raises(IntegrityError, match="wrong key"):
        _open(sealed, new_data_key())


@pytest.mark.parametrize("job, part", [("job-2", "bundle"), ("job-1", "result")])
def test_swapped_part_or_job(job, part):
    key = new_data_key()
    sealed = _seal(b"x" * 300, key)
    with pytest.raises(IntegrityError, match="swapped part"):
        _open(sealed, key, job, part)


def test_header_names_edited_to_match_still_fail():
    # An attacker rewrites the clear header so the names match; every chunk authenticates the header.
    key = new_data_key()
    sealed = _seal(b"y" * 300, key, "job-A", "bundle")
    forged = sealed.replace(b"job-A", b"job-B", 1)
    with pytest.raises(IntegrityError, match="chunk 0"):
        _open(forged, key, "job-B", "bundle")


def test_tampered_byte_anywhere_is_refused():
    key = new_data_key()
    sealed = bytearray(_seal(os.urandom(4 * CHUNK + 10), key))
    for pos in range(_header_len(), len(sealed), 17):
        bad = bytearray(sealed)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            _open(bytes(bad), key)


def test_truncation_is_refused():
    key = new_data_key()
    data = os.urandom(4 * CHUNK)  # exact multiple: truncation at a chunk boundary is the hard case
    sealed = _seal(data, key)
    block = CHUNK + TAG_LEN
    h = _header_len()
    for cut in (h + block, h + 2 * block, h + 3 * block, len(sealed) - 1, h + 5, h, h - 3, 4):
        with pytest.raises(SealError):
            _open(sealed[:cut], key)
    with pytest.raises(IntegrityError, match="chunk 2"):
        _open(sealed[:h + 3 * block], key)


def test_appended_data_is_refused():
    key = new_data_key()
    sealed = _seal(os.urandom(2 * CHUNK), key)
    with pytest.raises(IntegrityError):
        _open(sealed + _seal(os.urandom(CHUNK), key)[_header_len():], key)


def test_reordered_chunks_are_refused():
    key = new_data_key()
    sealed = _seal(os.urandom(4 * CHUNK + 3), key)
    h, block = _header_len(), CHUNK + TAG_LEN
    chunks = [sealed[h + i * block:h + (i + 1) * block] for i in range(5)]
    swapped = sealed[:h] + chunks[1] + chunks[0] + b"".join(chunks[2:])
    with pytest.raises(IntegrityError, match="chunk 0"):
        _open(swapped, key)


def test_not_a_sealed_stream():
    with pytest.raises(SealError, match="not a sealed stream"):
        _open(b"PK\x03\x04 zip file, not sealed" * 3, new_data_key())
    sealed = bytearray(_seal(b"z", new_data_key()))
    sealed[6] = 9
    with pytest.raises(SealError, match="version 9"):
        _open(bytes(sealed), new_data_key())


def test_bad_key_length():
    with pytest.raises(SealError, match="32 bytes"):
        _seal(b"x", b"short")


def test_files_appear_only_when_verified(tmp_path):
    key = new_data_key()
    src = tmp_path / "bundle.tar"
    src.write_bytes(os.urandom(3 * (1 << 20) + 11))
    sealed = tmp_path / "bundle.sealed"
    seal_file(src, sealed, key, "job-f", "bundle")
    assert (sealed.stat().st_mode & 0o777) == 0o600
    opened = tmp_path / "opened.tar"
    open_file(sealed, opened, key, "job-f", "bundle")
    assert opened.read_bytes() == src.read_bytes()
    blob = bytearray(sealed.read_bytes())
    blob[-5] ^= 0xFF  # last chunk: earlier chunks verify and are written before the failure
    sealed.write_bytes(bytes(blob))
    target = tmp_path / "never.tar"
    with pytest.raises(IntegrityError):
        open_file(sealed, target, key, "job-f", "bundle")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class _Trickle(io.RawIOBase):
    """A source that returns at most 7 bytes per read, like a pipe."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(min(7, n) if n and n > 0 else 7)


def test_short_reads_from_pipes():
    key = new_data_key()
    data = os.urandom(3 * CHUNK + 1)
    out = io.BytesIO()
    seal_stream(_Trickle(data), out, key, "job-p", "bundle", chunk_size=CHUNK)  # type: ignore[arg-type]
    back = io.BytesIO()
    open_stream(_Trickle(out.getvalue()), back, key, "job-p", "bundle")  # type: ignore[arg-type]
    assert back.getvalue() == data


def test_wrap_key_round_trip_and_refusals():
    site, other_site = os.urandom(32), os.urandom(32)
    data_key = new_data_key()
    wrapped = wrap_key(site, data_key, "job-w")
    assert data_key not in wrapped
    assert unwrap_key(site, wrapped, "job-w") == data_key
    with pytest.raises(IntegrityError, match="wrong site key"):
        unwrap_key(other_site, wrapped, "job-w")
    with pytest.raises(IntegrityError):
        unwrap_key(site, wrapped, "job-other")
    bad = bytearray(wrapped)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError):
        unwrap_key(site, bytes(bad), "job-w")
    with pytest.raises(SealError):
        unwrap_key(site, wrapped[:-1], "job-w")


class _Zeros(io.RawIOBase):
    """n bytes of zeros, produced on demand (never held whole)."""

    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        self.left -= size
        return bytes(size)


class _Sink(io.RawIOBase):
    """Counts what is written, keeps nothing."""

    def __init__(self):
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)


def test_streaming_holds_only_a_few_chunks(tmp_path):
    size = 64 << 20
    key = new_data_key()
    sealed = tmp_path / "big.sealed"
    tracemalloc.start()
    try:
        with open(sealed, "wb") as out:
            seal_stream(_Zeros(size), out, key, "job-big", "bundle")  # type: ignore[arg-type]
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = _Sink()
        with open(sealed, "rb") as src:
            assert open_stream(src, sink, key, "job-big", "bundle") == size  # type: ignore[arg-type]
        _, open_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sealed.stat().st_size == _header_len("job-big") + size + 64 * TAG_LEN and sink.n == size
    assert seal_peak < 6 << 20, f"seal peak {seal_peak / 2**20:.1f} MiB for a 64 MiB stream"
    assert open_peak < 6 << 20, f"open peak {open_peak / 2**20:.1f} MiB for a 64 MiB stream"
