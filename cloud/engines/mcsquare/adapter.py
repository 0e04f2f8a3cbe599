"""The MCsquare adapter: proton PBS dose with the MCsquare binary shipped in the opentps-core wheel.

Binary and material database come from ``$MCSQUARE_HOME`` (a folder holding ``MCsquare_linux*``
and ``Materials/``) or from the installed ``opentps-core`` distribution, located through its
metadata without importing opentps (its Python dependencies are not installed). The wheel installs
the binaries without the executable bit, so the chosen one is copied into a cache
(``$XDG_CACHE_HOME/dicom-mc-node/mcsquare/``, mode 0755). The instruction-set builds refuse to
start on some CPUs, so each is probed (it must get as far as reading its config file) from the
most to the least specific, falling back to the generic build.

Every input is written here: CT (HU, MHD), HU->density and HU->material tables and the generic
beam model (package data in ``cloud/engines/mcsquare/data/``, see their headers), the plan file and, per
shard, the config. MCsquare writes ``Outputs/Dose.mhd`` in eV/g per simulated primary.

Coordinate frames (pinned by tests/test_engine_physics.py):
    DICOM patient frame (HFS): x to the patient's left, y posterior, z superior; the CT volume is
    [z, y, x] with voxel centres at origin + index * spacing.
    MCsquare: origin at the image corner, coordinates in the file's voxel order. Found by experiment
    and pinned by the tests (off-axis spot, off-centre isocenter, gantry 90/270, couch 90): the image
    is written with its columns and rows reversed (as OpenTPS also does), and the isocenter is
        X = x - (x0 - dx/2),   Y = (y0 - dy/2) + ny*dy - y,   Z = z - (z0 - dz/2).
    Gantry angle, couch angle and spot positions (IEC 61217 gantry frame) then go through unchanged:
    for HFS, spot +X lands at patient +x (left) at gantry 0, spot +Y at +z (superior), gantry 0
    enters anteriorly (-y), gantry 90 from the patient's left (+x), gantry 270 from the right, and
    gantry 90 with couch 90 (IEC: counter-clockwise seen from above) enters from inferior (-z).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cloud.engines import dosegrid
from cloud.engines.base import (
    GENERIC_MODEL,
    UNCOMMISSIONED,
    DoseOptions,
    Engine,
    ShardInputs,
    mapped_model,
    one_plan,
)
from cloud.engines.ct import ct_grid, ct_slices, ct_volume
from cloud.engines.mcsquare.bdl import BeamModel, read_bdl
from cloud.engines.mcsquare.ionplan import IonPlan, read_ion_plan
from cloud.errors import EngineError, EngineUnavailable, UnsupportedPlan
from cloud.grid import Grid

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset

LOGGER = logging.getLogger(__name__)

NAME = "mcsquare"
EV_PER_G_TO_GY = 1.602176634e-19 * 1000.0
WHEEL_DIR = "opentps/core/processing/doseCalculation/protons/MCsquare"
# Most specific first; the generic build runs on any x86-64.
VARIANTS = ("MCsquare_linux_avx512", "MCsquare_linux_avx2", "MCsquare_linux_avx", "MCsquare_linux_sse4",
            "MCsquare_linux")

CT_FILE = "CT.mhd"
HU_DENSITY_FILE = "HU_Density_Conversion.txt"
HU_MATERIAL_FILE = "HU_Material_Conversion.txt"
BDL_FILE = "BDL.txt"
PLAN_FILE = "PlanPencil.txt"


# --- finding and starting the binary ---------------------------------------------------------


def mcsquare_home() -> Path:
    """The folder with the MCsquare binaries and Materials/ (MCSQUARE_HOME, else the wheel)."""
    env = os.environ.get("MCSQUARE_HOME")
    if env:
        home = Path(env)
        if not (home / "Materials" / "list.dat").is_file():
            raise EngineUnavailable(f"MCSQUARE_HOME={env} has no Materials/list.dat")
        return home
    try:
        dist = importlib.metadata.distribution("opentps-core")
    except importlib.metadata.PackageNotFoundError:
        raise EngineUnavailable("MCsquare not found: install it with "
                                "'pip install --no-deps opentps-core==3.0.1' or set MCSQUARE_HOME") from None
    home = Path(str(dist.locate_file(WHEEL_DIR)))
    if not (home / "Materials" / "list.dat").is_file():
        raise EngineUnavailable(f"opentps-core is installed but {home} lacks Materials/list.dat")
    return home


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dicom-mc-node" / "mcsquare"


def _cached_copy(src: Path) -> Path:
    """Copy a binary into the cache with mode 0755 (once per file version); return the copy."""
    st = src.stat()
    target = cache_dir() / f"{src.name}-{st.st_size}-{int(st.st_mtime)}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: parallel workers never run a half-copied file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


ENGINE_CUT = "mcsquare_cut"  # inputs.json extra: the CT grid MCsquare gets and the dose-grid box it scores


def _cut_ct(volume: np.ndarray, ct: Grid, dose: Grid | None, density_table: Path,
            options: DoseOptions) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]] | None:
    """Where to cut the air around the patient from MCsquare's CT: (CT box, dose-grid box), or None.

    MCsquare reads, converts and holds every CT voxel in every shard (1.0-1.4 s and ~460 MB for a
    512x512x177 head CT, three quarters of it air). Cut: whatever lies more than 5 mm outside every
    voxel denser than half the density below which MCsquare's segmentation scores no dose
    (``options.body_density_g_cm3``; couch and masks are denser, so they stay). No dose is lost (the
    cut voxels score none), and the protons cross the cut air in vacuum instead (MCsquare transports
    them in vacuum up to the CT): under 0.1 mm of water-equivalent range for 10 cm of air. Only with a
    dose grid apart from the CT grid (a dose on the CT grid keeps the whole CT).
    """
    if dose is None:
        return None
    rows = [[float(v) for v in line.split()[:2]] for line in density_table.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    hu, rho = np.array(rows).T
    hu_min = float(np.interp(options.body_density_g_cm3 / 2, np.maximum.accumulate(rho), hu))
    return dosegrid.matter_box(volume, ct, dose, hu_min)


def _engine_cut(inputs: ShardInputs) -> tuple[slice, slice, slice] | None:
    """The box of the dose grid MCsquare scores when its CT was cut (``_cut_ct``), else None."""
    cut = inputs.extra.get(ENGINE_CUT)
    if not cut:
        return None
    (z0, z1), (y0, y1), (x0, x1) = cut["dose_box"]
    return slice(z0, z1), slice(y0, y1), slice(x0, x1)


def _die_with_worker() -> None:
    """In the engine's process before it starts: the kernel kills it when the worker that started it ends.

    A worker stopped by SIGTERM kills its engine itself (subprocess.run does, unwinding); one killed
    outright (SIGKILL, the OOM killer, a backend's hard stop) cannot, and its MCsquare would run on
    alone for as long as its shard needs, on the cores the next shard gets (Linux: PR_SET_PDEATHSIG).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _starts(binary: Path, materials: Path) -> bool:
    """True when the build gets as far as looking for its config (no CPU-feature refusal)."""
    with tempfile.TemporaryDirectory(prefix="mcsquare-probe-") as tmp:
        try:
            proc = subprocess.run([str(binary), "no-such-config.txt"], cwd=tmp, capture_output=True, text=True,
                                  timeout=30, env={**os.environ, "MCsquare_Materials_Dir": str(materials)})
        except (OSError, subprocess.TimeoutExpired):
            return False
    return "Configuration file" in (proc.stdout + proc.stderr)


@functools.cache
def mcsquare_binary() -> tuple[Path, Path]:
    """(executable copy of the best build that starts here, Materials folder). Probed once per process."""
    home = mcsquare_home()
    materials = home / "Materials"
    tried = []
    for variant in VARIANTS:
        src = home / variant
        if not src.is_file():
            continue
        binary = _cached_copy(src)
        if _starts(binary, materials):
            LOGGER.info("MCsquare build %s starts on this CPU", variant)
            return binary, materials
        tried.append(variant)
    raise EngineUnavailable(f"no MCsquare build starts on this machine (tried {', '.join(tried) or 'none found'} "
                            f"in {home})")


# --- writing inputs ----------------------------------------------------------------------------


def _data_file(name: str) -> Path:
    return Path(str(resources.files("cloud.engines.mcsquare.data").joinpath(name)))


def generic_beam_model_path() -> Path:
    return _data_file("generic_pbs_bdl.txt")


def write_mhd(path: Path, volume_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> None:
    """Write a [z, y, x] volume with its (dz, dy, dx) spacing as MHD + RAW in MCsquare's frame (rows and
    columns reversed; the header lists spacing and size x first)."""
    dz, dy, dx = spacing_zyx
    element = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.float32): "MET_FLOAT"}[volume_zyx.dtype]
    raw = path.with_suffix(".raw")
    nz, ny, nx = volume_zyx.shape
    header = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        "Offset = 0 0 0",
        f"ElementSpacing = {dx:.6f} {dy:.6f} {dz:.6f}",
        f"DimSize = {nx} {ny} {nz}",
        f"ElementType = {element}",
        f"ElementDataFile = {raw.name}",
    ]
    path.write_text("\n".join(header) + "\n")
    little = volume_zyx.dtype.newbyteorder("<")
    with raw.open("wb") as fh:  # a slice at a time: no CT-sized copy of the volume
        for k in range(nz):
            np.ascontiguousarray(volume_zyx[k, ::-1, ::-1], dtype=little).tofile(fh)


def read_mhd(path: Path) -> np.ndarray:
    """Read an MCsquare MHD output back into DICOM order, [z, y, x] (rows and columns reversed again)."""
    header: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            header[key.strip()] = value.strip()
    try:
        nx, ny, nz = (int(v) for v in header["DimSize"].split())
        dtype = {"MET_FLOAT": "f4", "MET_DOUBLE": "f8", "MET_SHORT": "i2"}[header["ElementType"]]
    except (KeyError, ValueError) as exc:
        raise EngineError(f"{path}: unexpected MHD header ({exc})") from exc
    order = ">" if header.get("BinaryDataByteOrderMSB", "False").lower() == "true" else "<"
    data = np.fromfile(path.parent / header["ElementDataFile"], dtype=order + dtype)
    if data.size != nx * ny * nz:
        raise EngineError(f"{path}: {data.size} values for a {nx}x{ny}x{nz} grid")
    return data.reshape(nz, ny, nx)[:, ::-1, ::-1]


def to_mcsquare_frame(point: tuple[float, float, float], grid: Grid) -> tuple[float, float, float]:
    """A DICOM patient-coordinate point (mm) in MCsquare's image frame (mm)."""
    (z0, y0, x0), (dz, dy, dx) = grid.origin, grid.spacing
    ny = grid.shape[1]
    return (point[0] - (x0 - dx / 2), (y0 - dy / 2) + ny * dy - point[1], point[2] - (z0 - dz / 2))


def _write_bdl(model: BeamModel, plan: IonPlan, target: Path) -> None:
    """The machine's BDL, plus a block for each range shifter the plan uses that the model lacks.

    A missing range shifter is modelled as PMMA (MCsquare material 64, 1.19 g/cm3) of the water
    equivalent thickness the plan states; MCsquare derives the physical thickness from it.
    Comment lines are left out: a commissioned model's header names the clinic's reference files,
    and this copy travels in the job's bundle.
    """
    text = "".join(line + "\n" for line in model.path.read_text().splitlines()
                   if not line.lstrip().startswith("#"))
    wanted: dict[str, float] = {}
    for beam in plan.beams:
        for layer in beam.layers:
            if layer.range_shifter and layer.range_shifter.rs_id not in model.range_shifters:
                wanted[layer.range_shifter.rs_id] = layer.range_shifter.wet_mm
    if wanted:
        blocks = []
        for rs_id, wet in wanted.items():
            blocks += ["Range Shifter parameters", f"RS_ID = {rs_id}", "RS_type = binary", "RS_material = 64",
                       "RS_density = 1.19", f"RS_WET = {wet:.3f}", ""]
        marker = "Beam parameters"
        at = text.find(marker)
        if at < 0:
            raise EngineError(f"{model.path}: no 'Beam parameters' section")
        text = text[:at] + "\n".join(blocks) + "\n" + text[at:]
    target.write_text(text)


def _write_plan(plan: IonPlan, grid: Grid, target: Path) -> None:
    total_mu = sum(b.mu for b in plan.beams)
    out = ["#TREATMENT-PLAN-DESCRIPTION", "#PlanName", "dicom-mc-node", "#NumberOfFractions", "1",
           "##FractionID", "1", "##NumberOfFields", str(len(plan.beams))]
    for i in range(len(plan.beams)):
        out += ["###FieldsID", str(i + 1)]
    out += ["#TotalMetersetWeightOfAllFields", f"{total_mu:.9g}"]
    for i, beam in enumerate(plan.beams):
        iso = to_mcsquare_frame(beam.isocenter_mm, grid)
        out += ["", "#FIELD-DESCRIPTION", "###FieldID", str(i + 1), "###FinalCumulativeMeterSetWeight",
                f"{beam.mu:.9g}", "###GantryAngle", f"{beam.gantry_deg:.6f}", "###PatientSupportAngle",
                f"{beam.couch_deg:.6f}", "###IsocenterPosition", f"{iso[0]:.6f}\t{iso[1]:.6f}\t{iso[2]:.6f}"]
        rs_ids = {layer.range_shifter.rs_id for layer in beam.layers if layer.range_shifter}
        if len(rs_ids) > 1:
            raise UnsupportedPlan(f"beam {beam.name}: more than one range shifter in one beam")
        if rs_ids:
            out += ["###RangeShifterID", rs_ids.pop(), "###RangeShifterType", "binary"]
        out += ["###NumberOfControlPoints", str(len(beam.layers)), "", "#SPOTS-DESCRIPTION"]
        cumulative = 0.0
        for j, layer in enumerate(beam.layers):
            out += ["####ControlPointIndex", str(j + 1), "####SpotTunnedID", "1", "####CumulativeMetersetWeight",
                    f"{cumulative:.9g}", "####Energy (MeV)", f"{layer.energy_mev:.6f}"]
            if rs_ids or any(ly.range_shifter for ly in beam.layers):
                rs = layer.range_shifter
                out += ["####RangeShifterSetting", "IN" if rs else "OUT", "####IsocenterToRangeShifterDistance",
                        f"{rs.iso_to_rs_mm if rs else 0.0:.6f}", "####RangeShifterWaterEquivalentThickness",
                        f"{rs.wet_mm if rs else 0.0:.6f}"]
            out += ["####NbOfScannedSpots", str(len(layer.mu)), "####X Y Weight"]
            out += [f"{x:.6f} {y:.6f} {w:.9g}" for (x, y), w in zip(layer.positions_mm, layer.mu, strict=True)]
            cumulative += float(layer.mu.sum())
    target.write_text("\n".join(out) + "\n")


def scoring_keys(ct: Grid, dose: Grid | None) -> dict[str, str]:
    """MCsquare's independent scoring grid for ``dose`` (nothing when it is the CT grid).

    ``Scoring_origin`` is the corner of the scoring grid in MCsquare's image frame (cm), the frame
    in which the CT's corner is 0 and y runs from the CT's largest y down (see the module doc): x
    and z from the grid's low edge, y from its high edge. Pinned by tests/test_dose_grid.py.
    """
    if dose is None or dosegrid.same_grid(dose, ct):
        return {}
    (z0, y0, x0), (dz, dy, dx) = ct.origin, ct.spacing
    (gz0, gy0, gx0), (gdz, gdy, gdx) = dose.origin, dose.spacing
    gnz, gny, gnx = dose.shape
    corner = (gx0 - gdx / 2 - (x0 - dx / 2),
              (y0 - dy / 2) + ct.shape[1] * dy - (gy0 + (gny - 0.5) * gdy),
              gz0 - gdz / 2 - (z0 - dz / 2))
    return {
        "Independent_scoring_grid": "True",
        "Scoring_origin": " ".join(f"{c / 10:.6f}" for c in corner),
        "Scoring_grid_size": f"{gnx} {gny} {gnz}",
        "Scoring_voxel_spacing": f"{gdx / 10:.6f} {gdy / 10:.6f} {gdz / 10:.6f}",
        # Volume: this MCsquare build refuses "Mass" ("not implemented yet").
        "Dose_weighting_algorithm": "Volume",
    }


def write_config(inputs_root: Path, out_dir: Path, primaries: int, seed: int, threads: int,
                 relative: bool = False, extra: Mapping[str, object] | None = None) -> Path:
    """One shard's MCsquare config.

    Paths are absolute by default (the shard may run in any folder). MCsquare silently writes no
    dose when a path is longer than about 100 characters, so `run_shard` runs it in a short scratch
    folder with `relative=True`: paths relative to the config's folder (inputs linked in as `in/`).
    """
    r = Path("in") if relative else inputs_root.resolve()
    lines = {
        "Num_Threads": threads,
        # MCsquare takes 0 as "seed from the clock"; offset so that every seed >= 0 is reproducible.
        "RNG_Seed": seed + 1,
        "Num_Primaries": primaries,
        "CT_File": r / CT_FILE,
        "HU_Density_Conversion_File": r / HU_DENSITY_FILE,
        "HU_Material_Conversion_File": r / HU_MATERIAL_FILE,
        "BDL_Machine_Parameter_File": r / BDL_FILE,
        "BDL_Plan_File": r / PLAN_FILE,
        "Simulate_Nuclear_Interactions": "True",
        "Compute_stat_uncertainty": "False",  # uncertainty comes from the spread between shards
        "Output_Directory": Path(out_dir.name) if relative else out_dir.resolve(),
        "Dose_MHD_Output": "True",
        "Energy_MHD_Output": "False",
        "LET_MHD_Output": "False",
        "Dose_to_Water_conversion": "Disabled",
        "Export_Beam_dose": "False",
        **(extra or {}),
    }
    path = out_dir.parent / "config.txt"
    # a tab after the value: MCsquare rejects the last number of a vector value when a newline follows it
    path.write_text("".join(f"{k} {v}\t\n" for k, v in lines.items()))
    return path


# --- the engine --------------------------------------------------------------------------------


def beam_model_for(plan: IonPlan, beam_models: Mapping[str, Path | str] | None) -> tuple[BeamModel, bool]:
    """(the machine's beam model, whether it is commissioned); UnsupportedPlan if the plan cannot use it.

    A machine must be listed in ``beam_models``: a BDL file (commissioned), or GENERIC_MODEL (the
    built-in model, uncommissioned). Every energy must lie in the model's table, and every range
    shifter must be one of the model's (the generic model has none: it models any range shifter as
    PMMA of the water-equivalent thickness the plan states, see ``_write_bdl``).
    """
    choice = mapped_model(plan.machines, beam_models, model_file="BDL file")
    machine = plan.machines[0]
    commissioned = not (isinstance(choice, str) and choice == GENERIC_MODEL)
    model = read_bdl(Path(choice) if commissioned else generic_beam_model_path())
    lo, hi = model.energies[0], model.energies[-1]
    for beam in plan.beams:
        for layer in beam.layers:
            if not model.covers(layer.energy_mev):
                raise UnsupportedPlan(f"beam {beam.name}: energy {layer.energy_mev:g} MeV outside the beam model "
                                      f"of machine {machine!r} ({model.path.name}: {lo:g}-{hi:g} MeV)")
            rs = layer.range_shifter
            if commissioned and rs is not None and rs.rs_id not in model.range_shifters:
                known_rs = ", ".join(sorted(model.range_shifters)) or "none"
                raise UnsupportedPlan(f"beam {beam.name}: range shifter {rs.rs_id!r} is not in the beam model of "
                                      f"machine {machine!r} ({model.path.name}; its range shifters: {known_rs})")
    return model, commissioned


def uncommissioned_warning(machine: str) -> str:
    return (f"{UNCOMMISSIONED}: machine {machine!r} is mapped to the generic beam model; absolute dose rests on "
            "its protons-per-MU anchor, not on commissioning")


class MCsquareEngine(Engine):
    name = NAME

    def check_plan(self, plan: Dataset, *, beam_models: Mapping[str, Path | str] | None = None) -> tuple[str, ...]:
        ion = read_ion_plan(plan)
        _model, commissioned = beam_model_for(ion, beam_models)
        return () if commissioned else (uncommissioned_warning(ion.machines[0]),)

    def prepare(self, datasets: list[Dataset], work_dir: Path, *,
                beam_models: Mapping[str, Path | str] | None = None,
                ct_calibration: tuple[str, Path, Path] | None = None, dose: DoseOptions | None = None) -> ShardInputs:
        plan = read_ion_plan(one_plan(datasets))
        model, commissioned = beam_model_for(plan, beam_models)
        slices = ct_slices(datasets, plan.frame_of_reference_uid)
        options = dose or DoseOptions()
        dose_grid = dosegrid.choose_grid(ct_grid(slices), options)  # refused before anything is written
        volume, grid = ct_volume(slices)
        work_dir.mkdir(parents=True, exist_ok=True)
        warnings: list[str] = []
        if not commissioned:
            warnings.append(uncommissioned_warning(plan.machines[0]))
            LOGGER.info("machine %r computed with the generic (uncommissioned) beam model", plan.machines[0])
        protons = sum(model.protons_for(layer.energy_mev, float(layer.mu.sum()))
                      for beam in plan.beams for layer in beam.layers)
        calibration = "built-in"
        density, material = _data_file("hu_density.txt"), _data_file("hu_material.txt")
        if ct_calibration is not None:
            calibration, density, material = ct_calibration
        # MCsquare gets the CT cut to what the dose grid needs around the patient (see _cut_ct); the rest
        # of the node keeps the whole CT's grid and the whole dose grid
        engine_ct, cut = grid, _cut_ct(volume, grid, dose_grid, density, options)
        if cut is not None:
            engine_ct = dosegrid.sub_grid(grid, cut[0])
            volume = volume[cut[0]]
            LOGGER.info("MCsquare's CT: %s of the CT's %s (air cut away)", "x".join(map(str, engine_ct.shape[::-1])),
                        "x".join(map(str, grid.shape[::-1])))
        write_mhd(work_dir / CT_FILE, volume, grid.spacing)
        del volume  # the CT is on disk now; keep the node's memory to the dose grid
        # MCsquare's density segmentation always: air CT voxels score nothing, so a dose voxel on the
        # skin that holds some air is not inflated by them (dose per gram of air); the contour, when
        # there is one, then sets every dose voxel outside the body to 0.
        extra_out = dosegrid.write_body(datasets, dose_grid or grid, plan.frame_of_reference_uid, work_dir, options)
        if cut is not None:
            extra_out[ENGINE_CUT] = {"ct": engine_ct.to_json(), "dose_box": [[s.start, s.stop] for s in cut[1]]}
        shutil.copyfile(density, work_dir / HU_DENSITY_FILE)
        shutil.copyfile(material, work_dir / HU_MATERIAL_FILE)
        _write_bdl(model, plan, work_dir / BDL_FILE)
        _write_plan(plan, engine_ct, work_dir / PLAN_FILE)
        inputs = ShardInputs(root=work_dir, engine=NAME, grid=grid, protons_per_fraction=protons,
                             fractions=plan.fractions, plan_uid=plan.sop_instance_uid,
                             frame_of_reference_uid=plan.frame_of_reference_uid, machines=plan.machines,
                             warnings=tuple(warnings),
                             extra={"beam_model": model.path.name, "beams": len(plan.beams),
                                    "total_mu": sum(b.mu for b in plan.beams), **extra_out},
                             commissioned=commissioned, ct_calibration=calibration,
                             dose_grid=dose_grid, dose_to_water=options.dose_to_water)
        inputs.save()
        return inputs

    @staticmethod
    def _config_keys(inputs: ShardInputs) -> dict[str, object]:
        ct, dose = inputs.grid, inputs.dose_grid
        cut = _engine_cut(inputs)
        if cut is not None and dose is not None:
            ct, dose = Grid.from_json(inputs.extra[ENGINE_CUT]["ct"]), dosegrid.sub_grid(dose, cut)
        keys: dict[str, object] = dict(scoring_keys(ct, dose))
        if inputs.dose_to_water:
            keys["Dose_to_Water_conversion"] = "PostProcessing"
        threshold = inputs.extra.get("body_density_g_cm3")
        if threshold is not None:  # MCsquare's density segmentation: no dose in air
            keys["Dose_Segmentation"] = "True"
            keys["Density_Threshold_for_Segmentation"] = f"{float(threshold):g}"
        return keys

    def simulate(self, inputs: ShardInputs, primaries: int, seed: int,
                 threads: int) -> tuple[np.ndarray, dict[str, Any]]:
        binary, materials = mcsquare_binary()
        # A short scratch folder in the system temp dir, the inputs linked in: MCsquare fails silently
        # on long paths, and the inputs may live anywhere.
        shard_dir = Path(tempfile.mkdtemp(prefix=f"mcsq-{seed}-"))
        try:
            (shard_dir / "in").symlink_to(inputs.root.resolve(), target_is_directory=True)
            out_dir = shard_dir / "Outputs"
            out_dir.mkdir()
            config = write_config(inputs.root, out_dir, primaries, seed, threads, relative=True,
                                  extra=self._config_keys(inputs))
            log = shard_dir / "mcsquare.log"
            with log.open("w") as fh:
                # no timeout here: the backend owns the shard's deadline and stops the worker process
                proc = subprocess.run([str(binary), config.name], cwd=shard_dir, stdout=fh, stderr=subprocess.STDOUT,
                                      env={**os.environ, "MCsquare_Materials_Dir": str(materials)},
                                      preexec_fn=_die_with_worker)  # noqa: PLW1509 - prctl only, no locks taken
            dose_file = out_dir / "Dose.mhd"
            if proc.returncode != 0 or not dose_file.is_file():
                tail = log.read_text(errors="replace")[-2000:]
                raise EngineError(f"MCsquare failed (exit {proc.returncode}, seed {seed}): {tail.strip()}")
            dose = read_mhd(dose_file)
            # float32 throughout (eV/g to Gy is a scale): no float64 copy of a CT-sized volume
            dose_gy = np.multiply(dose, np.float32(EV_PER_G_TO_GY), dtype=np.float32)
        finally:
            shutil.rmtree(shard_dir, ignore_errors=True)
        cut = _engine_cut(inputs)
        if cut is not None:  # scored on the part of the dose grid over the cut CT; air elsewhere: no dose
            whole = np.zeros(inputs.scoring_grid.shape, dtype=np.float32)
            whole[cut] = dose_gy
            return whole, {}
        return dose_gy, {}
