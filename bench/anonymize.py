"""Benchmark: de-identification throughput (files/s) on a 300-slice CT series, ours vs dicognito.

Both tools do the same work per file in the same run: read the file from disk, de-identify, write
the result to disk. Each gets a fresh anonymizer per round (so UID caches start cold), rounds
alternate between the tools, and the median round counts (robust to a busy shared machine). The
last line of stdout is one JSON object:
{"ours_files_per_s": ..., "dicognito_files_per_s": ..., "ratio": ...} (ratio = ours / theirs).

Needs the bench extra: pip install -e '.[bench]' (this script installs nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from dicognito.anonymizer import Anonymizer as DicognitoAnonymizer
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench/anonymize.py needs dicognito: run  .venv/bin/pip install -e '.[bench]'  (or make bench)")

import pydicom

from anonymizer.deidentify import Deidentifier
from dicom_node.phantom import PhantomSpec, build_study, write_study


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ours(paths: list[Path], out_dir: Path, key: bytes) -> float:
    deid = Deidentifier(key)
    start = time.perf_counter()
    for path in paths:
        out = deid.deidentify(pydicom.dcmread(path))
        out.save_as(out_dir / path.name, enforce_file_format=True)
    return time.perf_counter() - start


def _dicognito(paths: list[Path], out_dir: Path) -> float:
    anonymizer = DicognitoAnonymizer()
    start = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out_dir / path.name, enforce_file_format=True)  # same writer settings as ours
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--spacing", type=float, default=2.5, help="mm; 300 mm field of view")
    args = parser.parse_args()

    spec = PhantomSpec(size_mm=(300.0, 300.0, args.slices * args.spacing),
                       spacing_mm=(args.spacing, args.spacing, args.spacing))
    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="bench-anonymize-") as tmp:
        root = Path(tmp)
        study = build_study(spec)
        paths = write_study(study, root / "in")
        paths = [p for p in paths if p.name.startswith("CT_")]
        del study
        rows = pydicom.dcmread(paths[0]).Rows
        megabytes = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} CT files, {rows}x{rows} pixels, {megabytes:.1f} MB")
        times: dict[str, list[float]] = {"ours": [], "dicognito": []}
        for r in range(args.rounds):
            for name in (("ours", "dicognito") if r % 2 == 0 else ("dicognito", "ours")):
                out = root / f"{name}-{r}"
                out.mkdir()
                seconds = _ours(paths, out, key) if name == "ours" else _dicognito(paths, out)
                times[name].append(seconds)
                print(f"round {r + 1} {name:<9} {seconds:6.3f} s  {len(paths) / seconds:8.1f} files/s")
    ours = len(paths) / statistics.median(times["ours"])
    theirs = len(paths) / statistics.median(times["dicognito"])
    print(f"machine: {_cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"pydicom {pydicom.__version__}")
    print(json.dumps({"ours_files_per_s": round(ours, 1), "dicognito_files_per_s": round(theirs, 1),
                      "ratio": round(ours / theirs, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
