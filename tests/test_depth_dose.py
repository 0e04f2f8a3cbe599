"""`mcnode depth-dose` and the ompmc engine: beam parsing, the curve analysis, the engine behind the
Engine interface, and (slow) depth doses against published data, each run as shards on the local
backend through the same dispatch and merge as a clinical job.

References (the values the slow tests compare with):
- Co-60, SSD 80 cm, 10x10 cm: d_max 0.5 cm, PDD(5 cm) 80.4 %, PDD(10 cm) 58.7 % -- the BJR
  Supplement 25 central-axis data as tabulated in the lixinzhan/MedPhys notes
  (00_Fundamental/Dosimetry.md, "Photon Beams"). Other tabulations give 78.8 % at 5 cm; the
  tolerance (3 points) covers both.
- 6 MV photons, SSD 100 cm, 10x10 cm: PDD(10 cm) 67 % (same table).
- Electrons: AAPM TG-25 (Khan et al., Med. Phys. 18 (1991) 73), used by IAEA TRS-398 for beam
  quality: mean energy at the surface E0 = 2.33 MeV/cm x R50, and most probable energy at the
  surface Ep,0 = 0.22 + 1.98 Rp + 0.0025 Rp^2 (MeV, cm). For a 10 MeV monoenergetic beam:
  R50 = 4.29 cm and Rp = 4.91 cm. The relations were fitted to clinical beams (energy spread,
  scattering foils) at SSD 100 cm; a monoenergetic point-source beam differs from them by a few
  percent, hence 2.5 mm tolerances.
- Protons: NIST PSTAR CSDA range in water, 100 MeV: 7.718 g/cm^2; R80 within about 1 % of it.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RTIonPlanStorage, RTPlanStorage

from cloud.engines import engine_names, get_engine
from cloud.engines.base import ShardInputs
from cloud.errors import EngineError, UnsupportedPlan
from cloud.merge import merge
from dicom_node.cli import main
from dicom_node.errors import ConfigError
from dicom_node.jobs.depth_dose import CSV_NAME, PNG_NAME, DepthDose, parse_beam, peak_value, read_csv

CO60_REF = {"dmax_cm": 0.5, "pdd5": 80.4, "pdd10": 58.7}
X6_PDD10 = 67.0


def _tg25_ranges(e0_mev: float) -> tuple[float, float]:
    """(R50, Rp) in cm for a mean = most probable surface energy e0 (TG-25 relations)."""
    r50 = e0_mev / 2.33
    a, b, c = 0.0025, 1.98, 0.22 - e0_mev
    rp = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return r50, rp


# --- fast: parsing, analysis, engine plumbing --------------------------------------------------


def test_parse_beam_kinds_and_defaults() -> None:
    co = parse_beam("co60")
    assert (co.kind, co.ssd, co.field) == ("co60", 80.0, 10.0)
    e = parse_beam("e10")
    assert (e.kind, e.energy, e.ssd) == ("electron", 10.0, 100.0)
    assert e.depth > _tg25_ranges(10.0)[1] * 1.4  # the background beyond Rp is inside the phantom
    x = parse_beam("X6")
    assert (x.kind, x.energy) == ("photon", 6.0)
    p = parse_beam("p150")
    assert p.kind == "proton" and p.depth > 15.77


@pytest.mark.parametrize("text, words", [("x10", "no 10 MV spectrum"), ("q5", "expected co60"),
                                         ("e0.5", "1-50 MeV"), ("p20", "70-230 MeV"), ("e", "expected")])
def test_parse_beam_refuses_with_the_reason(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_beam(text)


def test_peak_value_is_less_biased_by_noise_than_the_highest_bin() -> None:
    # a Co-60-like depth dose on 2.5 mm bins: build-up, attenuation, inverse square
    z = np.arange(0.125, 25.0, 0.25)
    true = (1 - np.exp(-z / 0.18)) * np.exp(-0.055 * z) * (80.5 / (80.0 + z)) ** 2
    true = 100.0 * true / true.max()
    assert peak_value(true) == pytest.approx(100.0, abs=0.6)  # a parabola across a skewed peak
    rng = np.random.default_rng(1)
    noisy = true * (1.0 + rng.normal(0.0, 0.03, size=(400, z.size)))
    highest = np.mean(noisy.max(axis=1)) - 100.0
    fitted = np.mean([peak_value(row) for row in noisy]) - 100.0
    assert highest > 1.5  # the highest of noisy bins sits well above the true maximum
    assert abs(fitted) < 0.6 * highest


def _curve(depth: np.ndarray, dose: np.ndarray) -> DepthDose:
    return DepthDose(beam="test", depth_cm=depth, dose_percent=dose, uncertainty_percent=np.zeros_like(dose),
                     histories=1, shards=2)


def test_r50_and_practical_range_of_a_known_curve() -> None:
    # plateau, then a straight fall from 100 % at 3 cm to the 2 % background at 5 cm: R50 = 3.98, Rp = 5.0
    z = np.arange(0.05, 8.0, 0.1)
    d = np.where(z < 3.0, 90 + 10 * z / 3.0, np.maximum(100 - 49 * (z - 3.0), 2.0))
    curve = _curve(z, d)
    assert curve.depth_at_percent(50.0) == pytest.approx(3.0 + 50 / 49, abs=0.01)
    assert curve.practical_range_cm() == pytest.approx(5.0, abs=0.02)
    assert curve.fitted_at(1.5) == pytest.approx(95.0, abs=0.01)


def test_ompmc_is_registered_but_not_imported_until_it_runs() -> None:
    assert "ompmc" in engine_names()
    code = ("import sys, cloud.engines, cloud.worker, dicom_node.cli, dicom_node.jobs.depth_dose;"
            "e = cloud.engines.get_engine('ompmc'); print(e.name, 'ompmc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ompmc", "False"]


def test_ompmc_refuses_ion_plans_and_plans_without_beams() -> None:
    plan = Dataset()
    plan.SOPClassUID = RTPlanStorage
    plan.BeamSequence = []
    engine = get_engine("ompmc")
    with pytest.raises(UnsupportedPlan, match="no treatment beam"):
        engine.check_plan(plan)
    ion = Dataset()
    ion.SOPClassUID = RTIonPlanStorage
    ion.IonBeamSequence = []
    with pytest.raises(UnsupportedPlan, match="RT Ion Plan: the photon engine computes photon RT Plans only"):
        engine.prepare([ion], __import__("pathlib").Path("/nonexistent"))


def test_ompmc_shards_seeded_and_merged(tmp_path) -> None:
    from cloud.engines.ompmc.adapter import WaterPhantomBeam, prepare_water_phantom

    beam = WaterPhantomBeam("photon", "co60", ssd=80.0, field=10.0, depth=6.0, dz=1.0, column=3.0)
    inputs = prepare_water_phantom(beam, tmp_path / "inputs")
    loaded = ShardInputs.load(tmp_path / "inputs")  # as a worker sees it after unpacking the bundle
    assert loaded.engine == "ompmc" and loaded.grid.shape == (6, 1, 1)
    engine = get_engine("ompmc")
    a = engine.run_shard(loaded, 3000, seed=1000, threads=1)
    b = engine.run_shard(loaded, 3000, seed=1001, threads=1)
    assert a.dose_per_primary.shape == (6, 1, 1) and a.engine == "ompmc"
    assert np.all(a.dose_per_primary > 0)
    assert not np.array_equal(a.dose_per_primary, b.dose_per_primary)  # the seed reaches the transport
    merged = merge([a, b], inputs.protons_per_fraction, inputs.fractions, expected_shards=2)
    assert merged.std_error_per_fraction_gy is not None
    assert np.all(merged.std_error_per_fraction_gy > 0)
    # the same dose falls off with depth beyond the build-up (attenuation in water)
    axis = merged.per_fraction_gy[:, 0, 0]
    assert axis[-1] < axis[1]
    with pytest.raises(EngineError, match="primaries must be positive"):
        engine.run_shard(loaded, 0, seed=1)


def test_cli_depth_dose_refuses_bad_arguments(tmp_path, capsys) -> None:
    assert main(["depth-dose", "x10", "-o", str(tmp_path)]) == 2
    assert "no 10 MV spectrum" in capsys.readouterr().err
    assert main(["depth-dose", "co60", "-o", str(tmp_path), "--shards", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / CSV_NAME).exists()


# --- slow: the physics against published data ----------------------------------------------------


@pytest.mark.slow
def test_co60_depth_dose_against_bjr25(tmp_path, capsys) -> None:
    out = tmp_path / "co60"
    assert main(["depth-dose", "co60", "-o", str(out), "--histories", "40000", "--shards", "4"]) == 0
    assert "Co-60" in capsys.readouterr().out
    assert (out / PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    z, d, u = read_csv(out / CSV_NAME)
    assert z[0] == pytest.approx(0.125) and z[-1] == pytest.approx(24.875)
    assert np.all(u > 0) and np.all(u < 10)
    curve = _curve(z, d)
    assert curve.fitted_at(5.0) == pytest.approx(CO60_REF["pdd5"], abs=3.0)
    assert curve.fitted_at(10.0) == pytest.approx(CO60_REF["pdd10"], abs=3.0)
    # build-up: the surface bin is well below the maximum, which lies within the first 1.25 cm
    assert d[0] < 75.0
    smooth = np.convolve(d, np.ones(3) / 3, mode="same")
    assert 0.0 < z[int(np.argmax(smooth[1:-1])) + 1] <= 1.25
    # the uncertainty column is the spread between shards, on the scale of the noise it describes
    resid = d[8:] - np.convolve(d, np.ones(5) / 5, mode="same")[8:]
    assert 0.3 < np.std(resid[:-4]) / np.mean(u[8:-4]) < 3.0


@pytest.mark.slow
def test_e10_r50_and_rp_against_tg25(tmp_path) -> None:
    from dicom_node.jobs.depth_dose import run_depth_dose

    dd = run_depth_dose("e10", tmp_path, histories=16000, shards=4)
    r50_ref, rp_ref = _tg25_ranges(10.0)
    assert dd.depth_at_percent(50.0) == pytest.approx(r50_ref, abs=0.25)
    assert dd.practical_range_cm() == pytest.approx(rp_ref, abs=0.25)
    assert 1.5 <= dd.dmax_cm <= 3.0
    assert dd.dose_percent[-1] < 5.0  # bremsstrahlung tail only


@pytest.mark.slow
def test_x6_pdd10(tmp_path) -> None:
    from dicom_node.jobs.depth_dose import run_depth_dose

    dd = run_depth_dose("x6", tmp_path, histories=40000, shards=4)
    assert dd.fitted_at(10.0) == pytest.approx(X6_PDD10, abs=3.0)
    assert 0.75 <= dd.dmax_cm <= 2.5


@pytest.mark.slow
def test_p100_through_mcsquare(tmp_path) -> None:
    from dicom_node.jobs.depth_dose import run_depth_dose

    dd = run_depth_dose("p100", tmp_path, histories=20000, shards=2)
    assert dd.setup["engine"] == "mcsquare"
    assert dd.depth_at_percent(80.0) == pytest.approx(7.718, rel=0.02)
    assert np.max(dd.dose_percent) == pytest.approx(100.0)
    assert dd.dose_percent[0] < 40.0  # entrance well below the Bragg peak
