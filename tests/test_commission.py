"""Commissioning a machine: fit on one real RayStation plan, reproduce a different plan of the same
machine (tests/data/realdata/raystation12_tr3, see its README)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cloud.engines import get_engine
from cloud.engines.mcsquare.adapter import generic_beam_model_path
from cloud.engines.mcsquare.bdl import read_bdl
from cloud.errors import UnsupportedPlan
from dicom_node.cli import main
from dicom_node.commission import check_reference, commissioned_bdl_text, factor_curve, load_reference
from tests.plan_edits import with_energy
from tests.realdata import PHANTOM_SCANNER, phantom_calibration, reference_folder

PRIMARIES = 50_000  # per plan: the sum over ~1e5 high-dose voxels is stable to a few 0.1 %


@pytest.mark.slow
def test_fit_on_one_raystation_plan_reproduces_the_other(tmp_path, capsys):
    fit_on = reference_folder("reference", tmp_path)  # Cube101010: 26 layers, 83.8-164.5 MeV
    other = reference_folder("ramp_10cm", tmp_path)  # a different plan, 24 layers, 86.5-160.8 MeV
    density, material = phantom_calibration(tmp_path)
    config = tmp_path / "mcnode.toml"
    config.write_text(f'[engine]\nct_calibrations = {{"{"/".join(PHANTOM_SCANNER)}" = ["{density}", "{material}"]}}\n')
    out = tmp_path / "tr3.txt"
    assert main(["commission", "--reference", str(fit_on), "-o", str(out), "--primaries", str(PRIMARIES),
                 "-c", str(config)]) == 0
    printed = capsys.readouterr().out
    # the residual per reference is printed; the uncalibrated model was ~x0.35 for RayStation's MU
    m = re.search(r"reference: MC/reference over \d+ voxels > 50 % of max: base ([\d.]+), fitted ([\d.]+) "
                  r"\(residual ([+-][\d.]+) %", printed)
    assert m, printed
    assert 0.3 < float(m.group(1)) < 0.4 and abs(float(m.group(3))) < 0.5

    model = read_bdl(out)
    generic = read_bdl(generic_beam_model_path())
    k = model.protons_per_mu / np.interp(model.energies, generic.energies, generic.protons_per_mu)
    assert np.allclose(k, k[0]) and 2.5 < k[0] < 3.2  # one factor over the reference's energy range
    assert model.energies[0] == 80 and model.energies[-1] == 165  # only the energies the reference spans
    header = out.read_text()
    assert "Commissioned by mcnode commission on" in header and "sha256" in header
    assert "RP1.2.752.243.1.1.20221206151952575.9000.63363.dcm sha256" in header  # what it was fitted from
    assert "residual" in header

    # a different plan of the same machine: MC with the commissioned model against RayStation's dose
    calibrations = {"/".join(PHANTOM_SCANNER): (density, material)}
    ratio, rms, voxels = check_reference(load_reference(other), out, tmp_path / "check", PRIMARIES, threads=0,
                                         ct_calibrations=calibrations)
    print(f"ramp_10cm with the model fitted on reference: MC/RayStation = {ratio:.4f} over {voxels} voxels "
          f"(voxel RMS {rms:.1f} %, MC noise included)")
    assert abs(ratio - 1) < 0.03

    # the commissioned model refuses energies it was not fitted for
    plan = with_energy(load_reference(other).plan, 200.0)
    with pytest.raises(UnsupportedPlan, match="energy 200 MeV outside the beam model of machine 'TR3'"):
        get_engine("mcsquare").check_plan(plan, beam_models={"TR3": out})


def test_the_factor_curve_is_linear_between_knots_and_flat_beyond(tmp_path):
    base = read_bdl(generic_beam_model_path())
    knots = factor_curve([(150.0, 2.0), (100.0, 1.0), (100.2, 1.2)])  # close knots are averaged
    assert list(knots[0]) == pytest.approx([100.1, 150.0]) and list(knots[1]) == pytest.approx([1.1, 2.0])
    text = commissioned_bdl_text(base, knots, (92.0, 151.0), ["fitted from nothing (a unit test)"])
    path = tmp_path / "m.txt"
    path.write_text(text)
    model = read_bdl(path)
    assert model.energies[0] == 90 and model.energies[-1] == 155 and "# fitted from nothing" in text
    ratio = model.protons_per_mu / np.interp(model.energies, base.energies, base.protons_per_mu)
    expected = np.interp(model.energies, [100.1, 150.0], [1.1, 2.0])
    np.testing.assert_allclose(ratio, expected, rtol=1e-3)


def test_commission_without_references_says_so(capsys, tmp_path):
    assert main(["commission", "-o", str(tmp_path / "x.txt")]) != 0
    assert "at least one --reference DIR or --measured CSV" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["commission", "--reference", str(tmp_path / "empty"), "-o", str(tmp_path / "x.txt")]) != 0
    assert "expected one plan, one RT Dose and a CT" in capsys.readouterr().err


def _bethe_water_mev_cm2_per_g(energy_mev: float) -> float:
    """Electronic mass stopping power of water (Bethe, I = 75 eV, Z/A = 0.5551), no shell/density terms."""
    mp, me = 938.272088, 0.51099895
    gamma = 1 + energy_mev / mp
    beta2 = 1 - 1 / gamma**2
    r = me / mp
    tmax = 2 * me * beta2 * gamma**2 / (1 + 2 * gamma * r + r * r)
    return 0.307075 * 0.5551 / beta2 * (0.5 * np.log(2 * me * beta2 * gamma**2 * tmax / 75e-6**2) - beta2)


def test_a_measured_idd_table_sets_protons_per_mu(tmp_path, capsys):
    """A chamber's IDD per MU at 2 cm, made here from the physics (stopping power of water at the energy
    left at 2 cm depth) for a machine delivering twice the generic model's protons per MU: the fit must
    come out near x2. Primary protons alone deposit S/rho; the MC adds secondaries (nuclear
    interactions), 4-9 % at 100-200 MeV, so the fitted factor lies a little below 2."""
    from dicom_node.phantom import csda_range_cm, energy_for_range

    generic = read_bdl(generic_beam_model_path())
    rows = ["# a chamber measurement", "energy_MeV,idd_2cm_Gy_mm2_per_MU"]
    for e in (100.0, 150.0):
        e_at_2cm = energy_for_range(csda_range_cm(e) - 2.0)
        per_proton = _bethe_water_mev_cm2_per_g(e_at_2cm) * 1.602176634e-8  # Gy mm2 per proton
        rows.append(f"{e},{per_proton * 2 * np.interp(e, generic.energies, generic.protons_per_mu):.6g}")
    csv = tmp_path / "idd.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "m.txt"
    assert main(["commission", "--measured", str(csv), "-o", str(out), "--primaries", "10000"]) == 0
    assert "protons/MU" in capsys.readouterr().out
    model = read_bdl(out)
    assert model.energies[0] == 100 and model.energies[-1] == 150
    k = model.protons_per_mu / np.interp(model.energies, generic.energies, generic.protons_per_mu)
    assert np.all((k > 2 / 1.12) & (k < 2.0)), k
    assert "idd.csv sha256" in out.read_text()
    csv.write_text("energy,idd\n100,1\n")
    assert main(["commission", "--measured", str(csv), "-o", str(out)]) != 0
    assert "missing column(s) energy_MeV, idd_2cm_Gy_mm2_per_MU" in capsys.readouterr().err


def test_the_header_of_a_commissioned_model_stays_on_the_clinic_node(tmp_path):
    """The header names the clinic's reference files; the BDL copy that goes into the bundle has no comments."""
    from dicom_node.phantom import PhantomSpec, Spot, build_study

    base = read_bdl(generic_beam_model_path())
    path = tmp_path / "tr3.txt"
    path.write_text(commissioned_bdl_text(base, factor_curve([(120.0, 2.0)]), (70.0, 230.0),
                                          ["reference Doe^Jane_QA: RP_Doe^Jane.dcm sha256 0123"]))
    spec = PhantomSpec(size_mm=(60.0, 60.0, 40.0), spacing_mm=(5.0, 5.0, 5.0), water_box_mm=(40.0, 40.0, 30.0),
                       bone_slab_thickness_mm=0.0, target_radius_mm=10.0, machine_name="TR3",
                       spots=(Spot(0.0, 0.0, 120.0, 1.0),))
    inputs = get_engine("mcsquare").prepare(build_study(spec).all(), tmp_path / "in", beam_models={"TR3": path})
    sent = (inputs.root / "BDL.txt").read_text()
    assert "Doe" not in sent and "#" not in sent and "Doe^Jane" in path.read_text()
    assert read_bdl(inputs.root / "BDL.txt").protons_per_mu == pytest.approx(read_bdl(path).protons_per_mu)
