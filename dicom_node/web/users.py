"""Who may use the web page: user names and Argon2id password hashes in `data_dir/web_users.json`.

The file (mode 0600, written atomically) holds no password, only argon2-cffi's encoded hashes
(Argon2id, RFC 9106 low-memory parameters). `mcnode user add/list/remove` edit it while the node
runs; the web server reads it again whenever it changes, so a removed user is locked out at once.

Verifying an Argon2 hash costs tens of milliseconds and 64 MiB by design. A script polling
`/api/jobs` with HTTP Basic would pay that on every request, so a verified (user, password) pair
is remembered for `CACHE_SECONDS` as an HMAC under a per-process random key (never the password).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from dicom_node.errors import NodeError

FILENAME = "web_users.json"
MIN_PASSWORD = 10
CACHE_SECONDS = 300.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class UserError(NodeError):
    """A user name or password that cannot be used, or a users file that cannot be read."""


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError("user name must be 1-64 characters of A-Z a-z 0-9 . _ @ - (not starting with . _ @ -)")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password must be at least {MIN_PASSWORD} characters")
    if password != password.strip() or "\n" in password:
        raise UserError("password must not start or end with white space")
    return password


class UserStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._hasher = PasswordHasher()
        self._lock = threading.Lock()
        self._loaded: tuple[float, int] | None = None  # (mtime, size) of what _users holds
        self._users: dict[str, dict[str, str]] = {}
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[str, float] = {}
        self._dummy: str | None = None

    @classmethod
    def in_dir(cls, data_dir: Path) -> UserStore:
        return cls(Path(data_dir) / FILENAME)

    # --- file ------------------------------------------------------------------------------

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._loaded, self._users = None, {}
            return self._users
        stamp = (st.st_mtime, st.st_size)
        if self._loaded != stamp:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                users = data["users"]
                if not isinstance(users, dict):
                    raise TypeError("users is not a table")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"users file {self.path} cannot be read: {exc}") from exc
            self._users, self._loaded = users, stamp
            self._verified.clear()
        return self._users

    def _write(self, users: dict[str, dict[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"users": users}, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._loaded = None
        self._verified.clear()

    # --- editing ---------------------------------------------------------------------------

    def add(self, name: str, password: str, replace: bool = False) -> None:
        check_name(name)
        check_password(password)
        with self._lock:
            users = dict(self._read())
            if name in users and not replace:
                raise UserError(f"user {name} exists; use --replace to set a new password")
            users[name] = {"hash": self._hasher.hash(password),
                           "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")}
            self._write(users)

    def remove(self, name: str) -> None:
        with self._lock:
            users = dict(self._read())
            if name not in users:
                raise UserError(f"no user {name}")
            del users[name]
            self._write(users)

    def names(self) -> list[tuple[str, str]]:
        """(name, created) of every user."""
        with self._lock:
            return sorted((n, u.get("created", "")) for n, u in self._read().items())

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._read()

    # --- checking --------------------------------------------------------------------------

    def verify(self, name: str, password: str) -> bool:
        with self._lock:
            users = self._read()
            entry = users.get(name)
            mark = hmac.new(self._cache_key, f"{name}\0{password}".encode(), hashlib.sha256).hexdigest()
            seen = self._verified.get(mark)
            if entry is not None and seen is not None and time.monotonic() - seen < CACHE_SECONDS:
                return True
        if entry is None and self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_hex(16))
        try:
            # an unknown name still costs one verification, so timing does not tell names apart
            self._hasher.verify(entry["hash"] if entry else str(self._dummy), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        if entry is None:
            return False
        with self._lock:
            self._verified[mark] = time.monotonic()
        return True
