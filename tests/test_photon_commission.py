"""`mcnode commission-photon`: a spectrum that does not describe the measured depth dose is refused
and nothing is written; one that does gives a commissioned model (no UNCOMMISSIONED mark) whose
reference dose agrees with the generic model's for the same spectrum and output.

Measured tables: the 6 MV and Co-60 central-axis PDDs (10x10 cm) tabulated in the lixinzhan/MedPhys
notes (00_Fundamental/Dosimetry.md): 6 MV d_max 1.5 cm, 86 % at 5 cm, 67 % at 10 cm, 40 % at 20 cm;
Co-60 80.4 %, 58.7 %, 41.6 % (a beam the 6 MV spectrum must not pass for).
"""

from __future__ import annotations

import pytest

from cloud.engines import get_engine
from cloud.engines.ompmc.photon import read_photon_model
from dicom_node.cli import main
from tests.photon_plans import MACHINE, photon_plan, water_study

pytestmark = pytest.mark.slow

SIX_MV = [(0.0, 15.0), (1.5, 100.0), (5.0, 86.0), (10.0, 67.0), (20.0, 40.0)]
CO60 = [(0.0, 30.0), (0.5, 100.0), (5.0, 80.4), (10.0, 58.7), (20.0, 41.6)]


def _csv(path, rows):
    path.write_text("depth_cm,dose_percent,uncertainty_percent\n" + "".join(f"{z},{d},0\n" for z, d in rows))
    return path


def test_commission_photon_refuses_a_foreign_pdd_and_writes_a_model_for_a_matching_one(tmp_path, capsys):
    out = tmp_path / "linac6.json"
    args = ["commission-photon", "--energy", "6", "--spectrum", "mohan6", "--gy-per-mu", "0.01", "--histories",
            "30000", "--tolerance", "3", "-o", str(out)]
    assert main([*args, "--pdd", str(_csv(tmp_path / "co60.csv", CO60))]) == 1
    assert "does not describe this beam: PDD(" in capsys.readouterr().err and not out.exists()

    assert main([*args, "--pdd", str(_csv(tmp_path / "six.csv", SIX_MV))]) == 0
    assert "PDD(10 cm): measured 67.0 %" in capsys.readouterr().out
    model = read_photon_model(out)
    generic = read_photon_model("generic")
    assert model.commissioned and model.energies[6.0].spectrum == "mohan6"
    ref, generic_ref = model.energies[6.0].engine_dose_ref, generic.energies[6.0].engine_dose_ref
    assert ref is not None and generic_ref is not None and ref == pytest.approx(generic_ref, rel=0.06)
    plan = photon_plan(water_study())
    assert get_engine("ompmc").check_plan(plan, beam_models={MACHINE: out}) == ()  # commissioned: no warning
