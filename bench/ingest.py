"""Ingest speed: a 300-slice 512x512 CT sent by dcmtk's storescu into our node, Orthanc and dcmtk's storescp.

All three receivers run as their own processes on loopback, in the same run, and write every file
to disk. Ours fsyncs each file and records it in the journal before answering (node.fsync = true,
the default); Orthanc syncs its storage area too (SyncStorageArea, its default); storescp does not
fsync. Each receiver gets a new series (new UIDs) every round, as from a TPS; the median is reported.

Orthanc binds every interface and has no listen-address option, so as root the whole benchmark runs
in its own network namespace (tests.peers.loopback_network: loopback only): nothing is reachable from outside.
Orthanc comes from Debian (`apt-get install --no-install-recommends orthanc`; its service is not
used); without it, or not as root, Orthanc is left out and the line says so.

    .venv/bin/python bench/ingest.py [--slices 300] [--rounds 3] [--no-fsync] [--no-orthanc]

Last line: {"receiver": "pynetdicom", "ours_images_per_s": ..., "orthanc_images_per_s": ...,
            "dcmtk_images_per_s": ..., "ratio_orthanc": ..., "ratio_dcmtk": ...}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from tests.peers import ORTHANC, loopback_network, orthanc_config  # noqa: E402


def send(port: int, aec: str, files: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "TPS", "-aec", aec, "127.0.0.1", str(port), *files],
                       capture_output=True, text=True, env=DCMTK_ENV)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr}")
    return elapsed


def start_orthanc(work: Path, port: int) -> subprocess.Popen[bytes]:
    config = orthanc_config(work / "orthanc", port, free_port())
    return subprocess.Popen([ORTHANC, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-fsync", action="store_true",
                    help="node.fsync = false: what the receive path costs without the disk's flushes")
    ap.add_argument("--no-orthanc", action="store_true", help="leave Orthanc out")
    args = ap.parse_args()
    use_orthanc = not args.no_orthanc and Path(ORTHANC).exists()
    orthanc_note = None
    if use_orthanc and os.geteuid() != 0:
        use_orthanc, orthanc_note = False, "left out: needs root to run in its own network namespace"
    elif not args.no_orthanc and not Path(ORTHANC).exists():
        orthanc_note = "left out: not installed (apt-get install --no-install-recommends orthanc)"
    # Everything started from here on (node, storescp, Orthanc, storescu) is in that namespace.
    with loopback_network() if use_orthanc else contextlib.nullcontext():
        return measure(args, use_orthanc, orthanc_note)


def measure(args: argparse.Namespace, use_orthanc: bool, orthanc_note: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        spec = PhantomSpec(size_mm=(500.0, 500.0, 2.0 * args.slices), spacing_mm=(500 / 512, 500 / 512, 2.0))
        receivers = ["dcmtk", "ours"] + (["orthanc"] if use_orthanc else [])
        # A new series (new UIDs) for every round and receiver, as a TPS sends new CTs: re-sending the
        # same instances would time a replace path instead of ingest.
        series: dict[tuple[str, int], list[str]] = {}
        for name in receivers:
            for i in range(args.rounds):
                folder = work / f"study-{name}-{i}"
                write_study(build_study(spec), folder)
                series[name, i] = sorted(str(p) for p in folder.glob("CT_*.dcm"))
        count = len(series["ours", 0])
        size_mb = sum(Path(f).stat().st_size for f in series["ours", 0]) / 1e6
        print(f"{count} CT files, {size_mb:.0f} MB; {machine()}", file=sys.stderr)

        ports = {name: free_port() for name in receivers}
        aets = {"ours": "MCNODE", "dcmtk": "ANY", "orthanc": "ORTHANC"}
        cfg = init_config_dir(work / "node", port=ports["ours"])
        node_keys = "fsync = false\n" if args.no_fsync else ""
        cfg.write_text(cfg.read_text().replace("[node]\n", "[node]\n" + node_keys, 1)
                       .replace("port = 8484", "port = 0"))  # no web page
        procs.append(subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "-c", str(cfg)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (work / "scp").mkdir()
        procs.append(subprocess.Popen(["storescp", "-od", str(work / "scp"), str(ports["dcmtk"])], env=DCMTK_ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if use_orthanc:
            procs.append(start_orthanc(work, ports["orthanc"]))
        for name in receivers:
            wait_echo(ports[name], aets[name], timeout=60)
        times: dict[str, list[float]] = {name: [] for name in receivers}
        for i in range(args.rounds):
            for name in receivers:
                times[name].append(send(ports[name], aets[name], series[name, i]))
            print(f"round {i + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in receivers), file=sys.stderr)
        rate = {name: count / statistics.median(times[name]) for name in receivers}
        print(f"date {today()}", file=sys.stderr)
        result: dict[str, object] = {"receiver": "pynetdicom", "fsync": not args.no_fsync,
                                     "ours_images_per_s": round(rate["ours"], 1),
                                     "dcmtk_images_per_s": round(rate["dcmtk"], 1),
                                     "ratio_dcmtk": round(rate["ours"] / rate["dcmtk"], 3)}
        if use_orthanc:
            result.update(orthanc_images_per_s=round(rate["orthanc"], 1),
                          ratio_orthanc=round(rate["ours"] / rate["orthanc"], 3))
        else:
            result["orthanc"] = orthanc_note or "left out (--no-orthanc)"
        print(json.dumps(result))
        return 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
