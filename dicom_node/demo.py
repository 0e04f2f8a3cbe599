"""`mcnode demo`: the whole path on this machine, with a phantom study playing the patient.

It writes a phantom study, starts a built-in receiver playing the TPS, starts a node (local
backend) on a free port, sends the study as a TPS would, waits for the RT Dose to come back,
prints seconds per stage and the dose numbers, and draws the dose over the CT into a PNG.
Last it creates the web page's user `demo` with a fresh random password and prints how to log in:
on a terminal it serves the page until Ctrl-C; otherwise (CI, a pipe) it says which `mcnode serve`
command serves it, and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from dicom_node.errors import NodeError
from dicom_node.intake.jobrecord import JobState
from dicom_node.intake.journal import Job
from dicom_node.jobs.node import Node
from dicom_node.net.dose_receiver import DoseReceiver
from dicom_node.net.scu import send_paths
from dicom_node.phantom import PhantomSpec, build_study, write_study
from dicom_node.settings import GENERIC_BEAM_MODEL, Destination, Settings, init_config_dir, load_settings

LOGGER = logging.getLogger(__name__)

DEMO_SPEC = PhantomSpec(size_mm=(240.0, 240.0, 150.0), spacing_mm=(3.0, 3.0, 3.0),
                        water_box_mm=(180.0, 180.0, 120.0), target_radius_mm=25.0, energy_layers=5)


def demo_settings(base: Settings, receiver_port: int, primaries: int, shards: int) -> Settings:
    return dataclasses.replace(
        base,
        trigger=dataclasses.replace(base.trigger, stable_seconds=2.0),
        # The phantom's machine is mapped explicitly to the uncommissioned generic model: its doses are
        # marked NOT FOR CLINICAL USE, as any site's would be.
        engine=dataclasses.replace(base.engine, primaries=primaries,
                                   beam_models={**base.engine.beam_models, DEMO_SPEC.machine_name: GENERIC_BEAM_MODEL}),
        cloud=dataclasses.replace(base.cloud, shards=shards),
        outbox=dataclasses.replace(base.outbox, retry_initial_seconds=1.0),
        destinations=(Destination(calling_ae_title="TPS", ae_title="TPS", host="127.0.0.1", port=receiver_port),),
    )


def wait_for_state(node: Node, states: tuple[JobState, ...], timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.journal.jobs_in(*states)
        if jobs:
            return jobs[0]
        time.sleep(0.1)
    raise NodeError(f"no job reached {' or '.join(states)} within {timeout:g} s")


def stage_seconds(node: Node, job: Job, send_s: float) -> dict[str, float]:
    """Seconds per stage, from the journal's transition times and the pipeline's own timers."""
    at = {state: t for state, _r, t in node.journal.history(job.id)}
    timings = node.pipeline.timings.get(job.id, {}) if node.pipeline else {}
    stages = {"receive": send_s, "assemble": at[JobState.READY] - at[JobState.RECEIVING]}
    stages["anonymize+prepare"] = timings.get("anonymize_prepare", 0.0)
    stages["seal"] = timings.get("seal", 0.0)
    stages["dispatch+compute"] = timings.get("compute", 0.0)
    stages["merge"] = timings.get("merge", 0.0)
    stages["write+reidentify"] = timings.get("write", 0.0)
    stages["send"] = at[JobState.SENT] - at[JobState.MERGED]
    return stages


def dose_picture(ct_dir: Path, dose_path: Path, out_png: Path) -> None:
    """Axial and sagittal slices through the isocenter: CT in grey, dose as a colour wash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cts = sorted((dcmread(p) for p in ct_dir.glob("CT_*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    ct = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in cts])
    rd = dcmread(dose_path)
    dose = rd.pixel_array * float(rd.DoseGridScaling)
    sx, sy = (float(v) for v in cts[0].PixelSpacing[::-1])
    sz = float(cts[1].ImagePositionPatient[2]) - float(cts[0].ImagePositionPatient[2])
    x0, y0, z0 = (float(v) for v in cts[0].ImagePositionPatient)
    iz = int(round((0.0 - z0) / sz))
    ix = int(round((0.0 - x0) / sx))
    x_edges = (x0 - sx / 2, x0 + sx * (ct.shape[2] - 0.5))
    y_edges = (y0 + sy * (ct.shape[1] - 0.5), y0 - sy / 2)
    z_edges = (z0 - sz / 2, z0 + sz * (ct.shape[0] - 0.5))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    dmax = float(dose.max()) or 1.0
    for ax, ct_img, dose_img, extent, title, xlabel in (
        (axes[0], ct[iz], dose[iz], (*x_edges, *y_edges), f"axial z = {z0 + iz * sz:.0f} mm", "x (mm)"),
        (axes[1], ct[:, :, ix].T, dose[:, :, ix].T, (*z_edges, *y_edges), f"sagittal x = {x0 + ix * sx:.0f} mm",
         "z (mm)"),
    ):
        ax.imshow(ct_img, cmap="gray", vmin=-1000, vmax=1500, extent=extent)
        masked = np.ma.masked_less(dose_img, 0.05 * dmax)
        im = ax.imshow(masked, cmap="jet", alpha=0.5, vmin=0, vmax=dmax, extent=extent)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("y (mm, posterior +)")
    fig.colorbar(im, ax=axes, label="dose per plan (Gy)")
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def dose_at(dose_path: Path, point: tuple[float, float, float]) -> float:
    rd = dcmread(dose_path)
    x0, y0, z0 = (float(v) for v in rd.ImagePositionPatient)
    row_sp, col_sp = (float(v) for v in rd.PixelSpacing)
    offsets = [float(v) for v in rd.GridFrameOffsetVector]
    k = int(np.argmin([abs(z0 + o - point[2]) for o in offsets]))
    i = int(round((point[1] - y0) / row_sp))
    j = int(round((point[0] - x0) / col_sp))
    return float(rd.pixel_array[k, i, j] * float(rd.DoseGridScaling))


@dataclasses.dataclass
class Run:
    """What one pass through the node produced."""

    job: Job
    stages: dict[str, float]
    dose_path: Path
    total_s: float


def _storescu(files: list[Path], port: int, called_ae: str) -> list[tuple[Path, str]]:
    """Send as a TPS would, with dcmtk's storescu in its own process (used by the benchmarks)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.run(["storescu", "-R", "-aet", "TPS", "-aec", called_ae, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=env)
    return [] if proc.returncode == 0 else [(files[0], proc.stderr.strip() or f"storescu exit {proc.returncode}")]


def run_study(spec: PhantomSpec, out: Path, primaries: int, shards: int, echo: bool = True,
              sender: str = "builtin") -> tuple[Run, Any]:
    """Phantom → node → RT Dose at a built-in TPS receiver; return the run and the study.

    sender "builtin" sends with our own SCU from this process; "storescu" uses dcmtk's storescu.
    """
    say = print if echo else (lambda *a, **k: None)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    study = build_study(spec)
    files = write_study(study, out / "study")
    say(f"1. phantom study: {len(study.ct)} CT slices, RT Struct, RT Ion Plan -> {out / 'study'}", flush=True)
    with DoseReceiver(out / "tps", ae_title="TPS") as receiver:
        settings = demo_settings(load_settings(init_config_dir(out / "node", port=0)), receiver.port, primaries,
                                 shards)
        with Node(settings) as node:
            say(f"2. node {settings.node.ae_title} on 127.0.0.1:{node.port}, TPS receiver on "
                f"127.0.0.1:{receiver.port}; local backend, {shards} shards x {primaries // shards} primaries",
                flush=True)
            t = time.perf_counter()
            if sender == "storescu":
                failures = _storescu(files, int(node.port or 0), settings.node.ae_title)
            else:
                failures = send_paths(files, "127.0.0.1", int(node.port or 0), settings.node.ae_title, "TPS")
            send_s = time.perf_counter() - t
            if failures:
                raise NodeError(f"{len(failures)} file(s) were not accepted: {failures[0][1]}")
            say(f"3. sent {len(files)} files by C-STORE in {send_s:.1f} s; computing ...", flush=True)
            job = wait_for_state(node, (JobState.SENT, JobState.REJECTED, JobState.FAILED), timeout=900)
            if job.state != JobState.SENT:
                raise NodeError(f"job {job.id} ended {job.state}: {job.reason}")
            stages = stage_seconds(node, job, send_s)
    (dose_path,) = receiver.received
    return Run(job, stages, dose_path, time.perf_counter() - t0), study


def run_demo(out: Path, primaries: int = 200_000, shards: int = 2) -> int:
    out = Path(out)
    run, study = run_study(DEMO_SPEC, out, primaries, shards)
    job, dose_path = run.job, run.dose_path
    summary: dict[str, Any] = job.data.public.summary or {}
    iso = dose_at(dose_path, (0.0, 0.0, 0.0))
    png = out / "dose.png"
    dose_picture(out / "study", dose_path, png)
    rd = dcmread(dose_path, stop_before_pixels=True)
    print(f"4. RT Dose received by the TPS: {dose_path}")
    print(f"   references plan {rd.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == study.plan.SOPInstanceUID}"
          f", study {rd.StudyInstanceUID == study.plan.StudyInstanceUID}, patient "
          f"{rd.PatientID == study.plan.PatientID} (original identity restored)")
    print(f"   SeriesDescription \"{rd.SeriesDescription}\": the phantom's machine is mapped to the generic beam "
          "model (engine.beam_models), so the dose says it is not for clinical use")
    unc = summary.get("uncertainty_percent")
    print(f"5. primaries {primaries}; dose at isocenter {iso:.3f} Gy; max dose "
          f"{float(summary.get('max_dose_plan_gy', 0)):.3f} Gy (plan, {summary.get('fractions')} fractions); "
          f"uncertainty (pooled SE, body voxels above 50 % of max) {float(unc or 0):.1f} %")
    print("   seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in run.stages.items()))
    print(f"   total {run.total_s:.1f} s; picture: {png}")
    serve_page(out, primaries, shards)
    return 0


def serve_page(out: Path, primaries: int, shards: int, hold: bool | None = None,
               stop: threading.Event | None = None) -> str:
    """Make the `demo` user with a new password and print the page's address; serve it while `hold`.

    `hold` defaults to "standard input is a terminal", so `make demo` in CI still ends.
    Returns the password (tests log in with it).
    """
    from dicom_node.web.users import UserStore

    cfg = Path(out) / "node" / "mcnode.toml"
    base = load_settings(cfg)
    password = secrets.token_urlsafe(12)
    UserStore.in_dir(base.node.data_dir).add("demo", password, replace=True)
    hold = sys.stdin.isatty() if hold is None else hold
    if not hold:
        web = base.web
        print(f"6. web page: run  mcnode serve -c {cfg}  and open http://{web.host}:{web.port}/  "
              f"(user demo, password {password})")
        return password
    from dicom_node.web.server import WebServer

    settings = demo_settings(base, 11113, primaries, shards)
    with Node(settings) as node:
        try:
            web_server = WebServer.for_node(node).start()
        except NodeError:  # the configured port is taken: any free one
            settings = dataclasses.replace(settings, web=dataclasses.replace(settings.web, port=0))
            web_server = WebServer(settings, node.journal, node.pipeline, node.outbox).start()
        try:
            print(f"6. web page: {web_server.url}  user demo  password {password}  (Ctrl-C stops)", flush=True)
            (stop or threading.Event()).wait()
        except KeyboardInterrupt:
            print()
        finally:
            web_server.stop()
    return password
