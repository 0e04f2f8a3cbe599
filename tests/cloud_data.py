"""A tiny sealed job for the backend tests and the overhead benchmark: small phantom, one beam.

The phantom is synthetic (no patient), so it goes into the bundle as made; the engine and the seal
are the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from anonymizer.seal import new_data_key
from cloud.bundle import make_bundle
from cloud.dispatch import dispatch, plan_tasks
from cloud.engines import get_engine
from cloud.worker import ShardTask
from dicom_node.phantom import PhantomSpec, build_study, write_study

# 10 slices of 20x20 voxels at 6 mm, one energy layer: MCsquare starts and finishes in well under a second.
TINY = PhantomSpec(size_mm=(120.0, 120.0, 60.0), spacing_mm=(6.0, 6.0, 6.0), water_box_mm=(110.0, 110.0, 60.0),
                   target_radius_mm=8.0, energy_layers=1, spot_spacing_mm=8.0, bone_slab_thickness_mm=0.0)


@dataclass(frozen=True)
class SealedJob:
    job_id: str
    key: bytes
    bundle: Path
    folder: Path

    @property
    def bundle_uri(self) -> str:
        return self.bundle.as_uri()

    def results_uri(self, name: str = "results") -> str:
        return (self.folder / name).as_uri()


def sealed_job(folder: Path, job_id: str = "job-0001", spec: PhantomSpec = TINY) -> SealedJob:
    from pydicom import dcmread

    study_dir = folder / "study"
    write_study(build_study(spec), study_dir)
    datasets = [dcmread(p) for p in sorted(study_dir.iterdir())]
    engine = get_engine("mcsquare")
    inputs = engine.prepare(datasets, folder / "inputs", beam_models={spec.machine_name: "generic"})
    key = new_data_key()
    bundle = make_bundle(folder / "bundle.sealed", key, job_id, {"inputs": inputs.root},
                         {"engine": engine.name})
    return SealedJob(job_id, key, bundle, folder)


def shard_tasks(job: SealedJob, shards: int, primaries: int, name: str) -> list[ShardTask]:
    """Tasks with one engine thread each: MCsquare's random streams depend on its thread count, so
    only equal thread counts reproduce a tally exactly."""
    return [replace(t, threads=1) for t in plan_tasks(job.job_id, shards, primaries, job.bundle_uri,
                                                      job.results_uri(name))]


def local_tallies(job: SealedJob, shards: int, primaries: int, name: str = "reference") -> list[bytes]:
    """The same shards run by the local backend: the reference a remote run must equal (same seeds)."""
    from cloud.backends.local import LocalBackend

    return dispatch(shard_tasks(job, shards, primaries, name), job.key, LocalBackend(retries=0))


def all_cmdlines() -> list[str]:
    """Every process's command line, as other users of the machine could read it."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return out
