"""Helpers shared by the benchmarks: machine description, free ports, waiting for peers."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from datetime import UTC, datetime

# dcmtk on loopback: see tests/conftest.py for why TCP_NODELAY=1 is set for every dcmtk program.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, aec: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["echoscu", "-aet", "TPS", "-aec", aec, "127.0.0.1", str(port)],
                           capture_output=True, env=DCMTK_ENV)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no DICOM peer answered on port {port}")
