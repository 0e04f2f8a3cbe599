"""Target uncertainty: the node runs shards in waves until the pooled uncertainty is met, or says it was not.

Real peers: storescu sends the phantom study, storescp receives the RT Dose, MCsquare runs the shards.
"""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
from pydicom import dcmread

from cloud.engines.base import UNCOMMISSIONED
from dicom_node.cli import main
from dicom_node.intake.jobrecord import JobState
from tests.conftest import settings_for, storescu, wait_for

pytestmark = pytest.mark.slow


def _settings(config_dir, tps_port, **engine):
    return settings_for(
        # the second check off: with it on, the job's target is also capped by what the check needs
        config_dir, engine=engine, cloud={"shards": 2}, secondcheck={"enabled": False},
        outbox={"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        destinations=[{"calling_ae_title": "TPS", "ae_title": "TPS", "host": "127.0.0.1", "port": tps_port}])


def _run(node, phantom_dir, tps_dir):
    assert storescu(node.port, sorted(phantom_dir.iterdir())).returncode == 0
    job = wait_for(lambda: node.journal.jobs_in(JobState.SENT), timeout=300)[0]
    (dose_file,) = wait_for(lambda: [p for p in tps_dir.iterdir() if p.name.startswith("RD")])
    return node.journal.job(job.id), dcmread(dose_file)


def _jobs_table(config) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["jobs", "-c", str(config)]) == 0
    return out.getvalue()


def test_waves_until_the_target_uncertainty_is_met(config_dir, node_factory, storescp, phantom_dir, caplog):
    tps_port, tps_dir = storescp(aet="TPS")
    node = node_factory(_settings(config_dir, tps_port, primaries=2_000, target_uncertainty_percent=4.0,
                                  max_primaries=400_000, dose_to_water=True), compute=True)
    with caplog.at_level(logging.INFO, logger="dicom_node.jobs.pipeline"):
        job, rd = _run(node, phantom_dir, tps_dir)
    public = job.data.public
    waves = public.waves or []
    estimates = [w["uncertainty_percent"] for w in waves]
    assert len(waves) >= 2 and estimates[0] > 4.0 >= estimates[-1], estimates
    assert all(a > b for a, b in zip(estimates, estimates[1:], strict=False))  # each wave brings it down
    assert public.uncertainty_target_met is True, (waves, public.primaries, public.warnings)
    # every wave continues the shard numbering (own seeds), and the shards add up to the primaries run;
    # after the first wave's two, one shard a wave: the local backend runs one at a time
    assert [w["shards"] for w in waves] == [2] + [1] * (len(waves) - 1)
    assert [w["first_shard"] for w in waves] == [0] + [1 + i for i in range(1, len(waves))]
    assert public.primaries == sum(w["primaries"] for w in waves) <= 400_000
    assert public.summary["uncertainty_percent"] == pytest.approx(estimates[-1], abs=1e-3)
    assert public.summary["primaries"] == public.primaries
    # the log and `mcnode jobs` show the estimate per wave
    logged = [r.getMessage() for r in caplog.records if "wave" in r.getMessage()]
    assert len(logged) == len(waves) and "target 4 %" in logged[0]
    table = _jobs_table(config_dir / "mcnode.toml")
    assert " > ".join(f"{e:.2f}" for e in estimates) + " ok" in table
    # the RT Dose says what it is: dose to water, uncertainty met, nothing to warn about
    assert rd.DoseComment == f"{UNCOMMISSIONED}; DOSE TO WATER"  # the phantom's machine is mapped to "generic"
    assert "target uncertainty 4 % met" in rd.ImageComments
    assert "ABOVE TARGET" not in rd.SeriesDescription


def test_max_primaries_reached_the_dose_is_marked(config_dir, node_factory, storescp, phantom_dir):
    tps_port, tps_dir = storescp(aet="TPS")
    node = node_factory(_settings(config_dir, tps_port, primaries=2_000, target_uncertainty_percent=0.5,
                                  max_primaries=5_000), compute=True)
    job, rd = _run(node, phantom_dir, tps_dir)
    public = job.data.public
    assert public.uncertainty_target_met is False
    assert public.primaries == 5_000 and len(public.waves or []) == 2
    assert any("above the target 0.5 %" in w for w in public.warnings or [])
    # visible wherever the TPS lists the dose (next to the uncommissioned model's mark: the short form)
    assert rd.SeriesDescription == f"{UNCOMMISSIONED} / NOISE>TARGET"
    assert rd.DoseComment == f"{UNCOMMISSIONED}; DOSE TO MEDIUM"
    assert rd.ImageComments.startswith(f"{UNCOMMISSIONED}; UNCERTAINTY ABOVE TARGET; DOSE TO MEDIUM")
    assert "target uncertainty 0.5 % NOT MET" in rd.ImageComments
    assert "NOT MET" in _jobs_table(config_dir / "mcnode.toml")
