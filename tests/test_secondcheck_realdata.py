"""Second check on a real RayStation 12 export (plan, structure set, RayStation's own RT Dose).

The export has no CT: the phantom CT is rebuilt from its External contour on the structure set's
referenced CT UIDs (tests/realdata.py: 2 mm pixels, 5 mm slices, air around the body). Until an MC dose computed with a
commissioned beam model is part of the tests, the "MC" dose here is RayStation's dose on that CT
grid with realistic Monte Carlo noise (1 % relative SE at the maximum, growing as 1/sqrt(dose)) and
noise spikes in the air around the body, as an MC scoring grid has them. The comparison then has to
find: the dose as it is passes; the TPS dose shifted by 3 mm, or scaled by 4 %, fails with the
reason; the same check with an MC uncertainty above the limit is inconclusive; two per-beam doses
summed compare like the plan dose.
"""

from __future__ import annotations

import copy
import io
import logging
import shutil
import subprocess

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.cli import guard_log_handlers
from dicom_node.qa.report import write_report
from dicom_node.qa.secondcheck import decide, referenced_beam_numbers, run_comparison
from dicom_node.settings import SecondCheckSettings
from tests.realdata import noisy_mc_dose, scaled_dose, second_check_case, shifted_dose

POLICY = SecondCheckSettings(report_criteria=())  # the verdict criterion only: lean
SUMMARY = {"uncertainty_percent": 1.0}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    c = second_check_case(tmp_path_factory.mktemp("realdata"))
    mc, noisy = noisy_mc_dose(c, 0.01, seed=2022, air_spike=0.6)
    air = c.ct.values < -500
    return {"rs": c.rs, "rp": c.rp, "rd": c.rd, "ct": c.ct, "mc": mc, "air_max": float(noisy[air].max()),
            "dmax": float(c.clean.max())}


def _roundtrip(ds) -> io.BytesIO:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return buf


def _check(case, tps, policy=POLICY, summary=SUMMARY):
    return run_comparison(case["mc"], tps, policy, case["rs"], 1, ct=case["ct"], plan=case["rp"], summary=summary)


def test_real_plan_dose_passes_inside_the_body_normalised_to_the_tps(case):
    cmp, result = _check(case, case["rd"])
    assert case["air_max"] > 1.1 * case["dmax"]  # noise in the air above the dose maximum ...
    meth = result["method"]
    assert meth["body"] == "ROI 'External' (type EXTERNAL)"
    # ... is neither the normalisation nor compared
    assert meth["normalisation_gy"] == pytest.approx(case["dmax"], rel=0.02)
    assert not (cmp.region & ~cmp.body).any()
    assert result["coverage"]["mc_max_outside_body_gy"] == pytest.approx(case["air_max"], rel=1e-3)
    assert result["verdict"] == "pass", result["reasons"]
    assert result["gamma"]["3%/2mm"]["pass_rate_percent"] > 99.0
    assert result["shift"]["magnitude_mm"] < 0.5
    assert abs(result["dose_difference"]["high_dose_ratio_percent"]) < 0.5
    names = [r["name"] for r in result["structures"]]
    assert "Cube101010" in names and "External" in names
    # the same numbers with the MC too noisy for the policy: inconclusive, with the reason first
    noisy = decide(copy.deepcopy(cmp.numbers), POLICY, 3.0, "pooled relative SE")
    assert noisy["verdict"] == "inconclusive"
    assert noisy["reasons"][0].startswith("MC statistical uncertainty 3.00 %")
    assert decide(copy.deepcopy(cmp.numbers), POLICY, None, "")["verdict"] == "inconclusive"


def test_tps_dose_shifted_3_mm_fails_naming_the_displacement(case, tmp_path):
    shifted = shifted_dose(case["rd"], 3.0)  # 3 mm to the patient's left, across the beam
    cmp, result = _check(case, shifted)
    assert result["verdict"] == "fail"
    why = "; ".join(result["reasons"])
    assert "displaced from the MC dose by" in why and "x +" in why, why
    assert 2.0 < result["shift"]["x_mm"] < 3.5
    # the report: verdict and reason first, pictures, a PDF that renders
    header = {"Plan": str(case["rp"].RTPlanLabel)}
    html, pdf = write_report(tmp_path / "report", cmp, result, header, ct=case["ct"], plan=case["rp"])
    text = html.read_text(encoding="utf-8")
    assert text.index("SECOND CHECK: FAIL") < text.index("displaced") < text.index("data:image/png;base64,")
    assert text.count("data:image/png;base64,") >= 5 and "<img src='http" not in text
    exe = shutil.which("pdftoppm")
    assert exe, "pdftoppm not found (apt-get install poppler-utils)"
    subprocess.run([exe, "-png", "-r", "40", pdf, str(tmp_path / "page")], check=True, timeout=120)
    pages = sorted(tmp_path.glob("page*.png"))
    assert len(pages) >= 5 and all(p.stat().st_size > 2000 for p in pages)


def test_tps_dose_scaled_4_percent_fails_naming_the_dose_difference(case):
    _cmp, result = _check(case, scaled_dose(case["rd"], 1.04))
    assert result["verdict"] == "fail"
    why = "; ".join(result["reasons"])
    assert "3%/2mm pass rate" in why
    assert "the TPS dose is 4.0 % higher than the MC dose in the high-dose region" in why, why
    assert result["shift"]["magnitude_mm"] < 0.5  # a scaled dose is not a displaced one


def test_per_beam_doses_summed_compare_like_the_plan_dose(case):
    beams = []
    for number, share in ((1, 0.6), (2, 0.4)):
        beam = copy.deepcopy(case["rd"])
        beam.DoseSummationType = "BEAM"
        fg = Dataset()
        fg.ReferencedFractionGroupNumber = 1
        ref_beam = Dataset()
        ref_beam.ReferencedBeamNumber = number
        fg.ReferencedBeamSequence = [ref_beam]
        beam.ReferencedRTPlanSequence[0].ReferencedFractionGroupSequence = [fg]
        beam.DoseGridScaling = f"{float(beam.DoseGridScaling) * share:.10g}"
        beams.append(dcmread(_roundtrip(beam)))
    assert [referenced_beam_numbers(b) for b in beams] == [[1], [2]]
    _cmp, summed = _check(case, beams)
    _cmp, whole = _check(case, case["rd"])
    assert summed["verdict"] == "pass"
    assert summed["method"]["tps_dose"].startswith("sum of 2 per-beam RT Doses")
    rate = summed["gamma"]["3%/2mm"]["pass_rate_percent"]
    assert rate == pytest.approx(whole["gamma"]["3%/2mm"]["pass_rate_percent"], abs=0.05)


def test_a_library_logging_badly_does_not_break_the_node_log(case, capsys):
    """pymedphys's gamma logs '%.3f' with numpy arrays on the root logger: with the node's log set up
    (a handler guarded as `mcnode serve` does), neither that nor a check leaves a '--- Logging error ---'."""
    import pymedphys

    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        guard_log_handlers()
        logging.getLogger("dicom_node.qa.secondcheck").info("job test: second check")
        _check(case, case["rd"])
        axes = (np.arange(6.0), np.arange(6.0), np.arange(6.0))
        dose = np.ones((6, 6, 6))
        pymedphys.gamma(axes, dose, axes, dose, 3, 3, lower_percent_dose_cutoff=10, max_gamma=1.1)
        logging.getLogger("somelib").info("value %.3f", np.array([1.0, 2.0]))  # unformattable
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    log = stream.getvalue()
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Logging error" not in log
    assert "job test: second check" in log
    assert "somelib: value %.3f (unformattable arguments:" in log
    assert "Global normalisation" not in log  # pymedphys's root-logger chatter is dropped
