"""Per-scanner CT calibration: chosen by the CT's scanner on the clinic node, recorded, used by the engine."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.engines.mcsquare.adapter import HU_DENSITY_FILE, HU_MATERIAL_FILE, _data_file
from dicom_node.errors import ConfigError
from dicom_node.jobs.compute import compute_folder
from dicom_node.jobs.ctcal import choose_ct_calibration
from dicom_node.phantom import PhantomSpec, Spot, build_study, write_study
from dicom_node.settings import settings_from_dict

TINY = PhantomSpec(size_mm=(60.0, 60.0, 40.0), spacing_mm=(5.0, 5.0, 5.0), water_box_mm=(40.0, 40.0, 30.0),
                   bone_slab_thickness_mm=0.0, target_radius_mm=10.0, machine_name="TR3",
                   spots=(Spot(0.0, 0.0, 80.0, 2.0),))


@pytest.fixture
def tables(tmp_path):
    density = tmp_path / "as_density.txt"
    material = tmp_path / "as_material.txt"
    # water 10 % denser than the built-in table says: the dose must change
    lines = []
    for line in _data_file("hu_density.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.lstrip().startswith("#"):
            line = f"{parts[0]} {float(parts[1]) * 1.1:.4f}"
        lines.append(line)
    density.write_text("\n".join(lines) + "\n")
    material.write_text(_data_file("hu_material.txt").read_text())
    return density, material


def _ct(**attrs):
    ct = build_study(TINY).ct
    for ds in ct:
        for k, v in attrs.items():
            setattr(ds, k, v)
    return ct


def test_the_scanner_picks_its_tables_else_the_built_in(tables):
    cal = {"Siemens/SOMATOM Definition AS": tables, "CT_ROOM_3": tables}
    chosen = choose_ct_calibration(_ct(Manufacturer="SIEMENS ", ManufacturerModelName="Somatom  definition AS"), cal)
    assert chosen.key == "Siemens/SOMATOM Definition AS" and chosen.density == tables[0]
    assert chosen.label.startswith("site tables sha256:") and "SOMATOM" not in chosen.label  # neutral in the bundle
    assert choose_ct_calibration(_ct(Manufacturer="GE", StationName="ct_room_3"), cal).key == "CT_ROOM_3"
    builtin = choose_ct_calibration(_ct(Manufacturer="GE", ManufacturerModelName="Revolution"), cal)
    assert builtin.key == "" and builtin.for_engine() is None and builtin.description == "built-in tables"


def test_settings_need_two_existing_tables(tmp_path, tables):
    ok = settings_from_dict({"engine": {"ct_calibrations": {"A/B": [str(t) for t in tables]}}}, tmp_path)
    assert ok.engine.ct_calibrations["A/B"] == tables
    with pytest.raises(ConfigError, match=r"engine.ct_calibrations.A/B: must be two files"):
        settings_from_dict({"engine": {"ct_calibrations": {"A/B": [str(tables[0])]}}}, tmp_path)
    with pytest.raises(ConfigError, match="calibration file .*nope.txt does not exist"):
        settings_from_dict({"engine": {"ct_calibrations": {"A/B": [str(tables[0]), "nope.txt"]}}}, tmp_path)


def test_the_chosen_tables_are_used_and_recorded(tmp_path, tables):
    study = build_study(TINY)
    for ds in study.ct:
        ds.Manufacturer, ds.ManufacturerModelName = "Siemens", "SOMATOM Definition AS"
    write_study(study, tmp_path / "in")
    base = {"beam_models": {"TR3": "generic"}, "primaries": 2000}
    plain = settings_from_dict({"engine": base}, tmp_path).engine
    site = settings_from_dict({"engine": {**base, "ct_calibrations": {
        "Siemens/SOMATOM Definition AS": [str(t) for t in tables]}}}, tmp_path).engine
    a = compute_folder(tmp_path / "in", tmp_path / "a", primaries=2000, shards=1, engine_settings=plain)
    b = compute_folder(tmp_path / "in", tmp_path / "b", primaries=2000, shards=1, engine_settings=site)
    from pydicom import dcmread

    assert "CT calibration built-in tables" in dcmread(a.rt_dose_path).ImageComments
    assert "CT calibration 'Siemens/SOMATOM Definition AS' (sha256:" in dcmread(b.rt_dose_path).ImageComments
    # 10 % denser water (same seed): the protons stop shallower, so the dose differs
    assert not np.allclose(a.merged.plan_gy, b.merged.plan_gy)


def test_engine_writes_the_tables_it_was_given(tmp_path, tables):
    from cloud.engines import get_engine

    inputs = get_engine("mcsquare").prepare(build_study(TINY).all(), tmp_path / "in", beam_models={"TR3": "generic"},
                                            ct_calibration=("site tables sha256:abc", *tables))
    assert (tmp_path / "in" / HU_DENSITY_FILE).read_text() == tables[0].read_text()
    assert (tmp_path / "in" / HU_MATERIAL_FILE).read_text() == tables[1].read_text()
    assert inputs.ct_calibration == "site tables sha256:abc"
