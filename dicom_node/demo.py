"""`mcnode demo`: the whole path on this machine, with a phantom study playing the patient.

It writes a phantom study, starts a node (local backend) on a free port, sends the study as a TPS
would and waits for the job to finish, printing what happened at each stage.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from dicom_node.errors import NodeError
from dicom_node.journal import FINAL_STATES, READY, REJECTED
from dicom_node.phantom import PhantomSpec, build_study, write_study
from dicom_node.scu import send_paths
from dicom_node.server import Node
from dicom_node.settings import init_config_dir, load_settings

LOGGER = logging.getLogger(__name__)

DEMO_SPEC = PhantomSpec(size_mm=(240.0, 240.0, 200.0), spacing_mm=(3.0, 3.0, 3.0),
                        water_box_mm=(180.0, 180.0, 160.0), target_radius_mm=25.0, energy_layers=5)


def run_demo(out: Path, primaries: int = 200_000) -> int:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    study = build_study(DEMO_SPEC)
    files = write_study(study, out / "study")
    stages["phantom"] = time.perf_counter() - t0
    print(f"1. phantom study: {len(study.ct)} CT slices, RT Struct, RT Ion Plan -> {out / 'study'}")

    cfg_path = init_config_dir(out / "node", port=0)
    settings = load_settings(cfg_path)
    settings = dataclasses.replace(
        settings, trigger=dataclasses.replace(settings.trigger, stable_seconds=2.0),
        engine=dataclasses.replace(settings.engine, primaries=primaries))
    with Node(settings) as node:
        print(f"2. node {settings.node.ae_title} listening on 127.0.0.1:{node.port} (data in {out / 'node'})")
        t = time.perf_counter()
        failures = send_paths(files, "127.0.0.1", int(node.port or 0), settings.node.ae_title, "TPS")
        stages["send"] = time.perf_counter() - t
        if failures:
            raise NodeError(f"{len(failures)} file(s) were not accepted: {failures[0][1]}")
        print(f"3. sent {len(files)} files by C-STORE in {stages['send']:.1f} s")
        t = time.perf_counter()
        job = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            node.assembler.wait_idle()
            jobs = node.journal.jobs_in(READY, *FINAL_STATES)
            if jobs:
                job = jobs[0]
                break
            time.sleep(0.1)
        if job is None:
            raise NodeError("the job did not become READY within 60 s")
        stages["assemble"] = time.perf_counter() - t
        if job.state == REJECTED:
            raise NodeError(f"job {job.id} was rejected: {job.reason}")
        print(f"4. job {job.id} {job.state}: {job.data['public']['assembly']}, "
              f"{job.data['public']['ct_slices']} CT slices ({stages['assemble']:.1f} s)")
    print("stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    return 0
