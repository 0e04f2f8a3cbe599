"""Ingest speed: a 300-slice 512x512 CT sent by dcmtk's storescu into our node and into dcmtk's storescp.

Both receivers run as their own processes on loopback and write every file to disk; ours also
fsyncs each file and records it in the journal before answering (node.fsync = true, the default).
Each receiver gets the same series `--rounds` times; the median is reported.

    .venv/bin/python bench/ingest.py [--slices 300] [--rounds 3]

Last line: {"receiver": "pynetdicom", "ours_images_per_s": ..., "dcmtk_images_per_s": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import DCMTK_ENV, free_port, machine, today, wait_echo  # noqa: E402
from dicom_node.phantom import PhantomSpec, build_study, write_study  # noqa: E402
from dicom_node.settings import init_config_dir  # noqa: E402


def send(port: int, aec: str, files: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "TPS", "-aec", aec, "127.0.0.1", str(port), *files],
                       capture_output=True, text=True, env=DCMTK_ENV)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-fsync", action="store_true",
                    help="node.fsync = false: what the receive path costs without the disk's flushes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        spec = PhantomSpec(size_mm=(500.0, 500.0, 2.0 * args.slices), spacing_mm=(500 / 512, 500 / 512, 2.0))
        # A new series (new UIDs) for every round, as a TPS sends new CTs: re-sending the same instances
        # would time the replace-and-upsert path instead of ingest.
        series = []
        for i in range(args.rounds):
            write_study(build_study(spec), work / f"study-{i}")
            series.append(sorted(str(p) for p in (work / f"study-{i}").glob("CT_*.dcm")))
        files = series[0]
        size_mb = sum(Path(f).stat().st_size for f in files) / 1e6
        print(f"{len(files)} CT files, {size_mb:.0f} MB; {machine()}", file=sys.stderr)

        ours_port, dcmtk_port = free_port(), free_port()
        cfg = init_config_dir(work / "node", port=ours_port)
        node_keys = "fsync = false\n" if args.no_fsync else ""
        cfg.write_text(cfg.read_text().replace("[node]\n", "[node]\n" + node_keys, 1))
        procs.append(subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "-c", str(cfg)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (work / "scp").mkdir()
        procs.append(subprocess.Popen(["storescp", "-od", str(work / "scp"), str(dcmtk_port)], env=DCMTK_ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_echo(ours_port, "MCNODE")
        wait_echo(dcmtk_port, "ANY")
        ours, theirs = [], []
        for i in range(args.rounds):
            theirs.append(send(dcmtk_port, "ANY", series[i]))
            ours.append(send(ours_port, "MCNODE", series[i]))
            print(f"round {i + 1}: dcmtk {theirs[-1]:.2f} s, ours {ours[-1]:.2f} s", file=sys.stderr)
        ours_rate = len(files) / statistics.median(ours)
        dcmtk_rate = len(files) / statistics.median(theirs)
        print(f"date {today()}", file=sys.stderr)
        print(json.dumps({"receiver": "pynetdicom", "fsync": not args.no_fsync,
                          "ours_images_per_s": round(ours_rate, 1), "dcmtk_images_per_s": round(dcmtk_rate, 1),
                          "ratio": round(ours_rate / dcmtk_rate, 3)}))
        return 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
