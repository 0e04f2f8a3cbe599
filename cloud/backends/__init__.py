"""Backends run shard tasks somewhere: `local` (default), `ssh`, `aws`. See base.Backend."""

from __future__ import annotations

from typing import Any

from cloud.backends.base import Backend


def get_backend(name: str, **options: Any) -> Backend:
    """The backend named in `[cloud] backend`; third-party modules load only for the one chosen."""
    if name == "local":
        from cloud.backends.local import LocalBackend

        return LocalBackend(**options)
    if name == "ssh":
        from cloud.backends.ssh import SshBackend

        return SshBackend(**options)
    if name == "aws":
        from cloud.backends.aws import AwsBackend

        return AwsBackend(**options)
    raise ValueError(f"unknown backend {name!r}")
