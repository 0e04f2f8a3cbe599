"""Photon RT Plans on the CT with ompMC: beam model, HU calibration, beam geometry and beamlets.

Frames. ompMC's phantom frame here *is* the DICOM patient frame (HFS), in cm: the geometry's x, y, z
bounds are the voxel edges of the transport grid -- the CT's own, or the dose grid's lattice over the
whole CT with the CT's density averaged onto it (``transport_density``; ompMC scores on the grid it
transports on) -- and the density and medium cubes are transposed to [x, y, z] (Fortran order).
IEC 61217 for a head-first-supine patient: fixed X = patient left (+x),
Y = towards the gantry (superior, +z), Z = up (anterior, -y). Gantry angle g rotates right-handed
about Y, so the source sits at iso + SAD (sin g, -cos g, 0) (gantry 0 anterior, 90 on the
patient's left) and the beam's X axis is (cos g, sin g, 0), its Y axis +z. The collimator angle c
rotates the jaw/leaf axes right-handed about the axis pointing to the source; the couch angle t
(counter-clockwise seen from above) turns the patient, i.e. the whole beam by R_y(t) in patient
coordinates, so gantry 90 with couch 90 comes from inferior (-z), as the proton engine's frame is
pinned.

Beamlets. Each beam's fluence is a grid of square beamlets (``beamlet_mm`` at the isocenter) over
its jaws; a beamlet's weight is the sum over segments of MU x its open fraction (jaws and leaves as
ideal edges). All beams go into one ``calc_forward`` run; its dose is linear in the weights.

Absolute dose. The beam model gives Gy per MU at a reference point (depth ``ref_depth_cm`` on the
axis of a ``ref_field_cm`` square field at SSD ``ref_ssd_cm`` in water) and ``engine_dose_ref``:
what this same machinery computes there for 1 MU (``reference_engine_dose``). A plan's dose is
calc_forward(weights) x gy_per_mu_ref / engine_dose_ref. Without ``engine_dose_ref`` a model cannot
give absolute dose and is refused.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cloud.engines import dosegrid
from cloud.engines.base import GENERIC_MODEL
from cloud.engines.ompmc.photonplan import PhotonBeam, PhotonPlan, open_fraction
from cloud.errors import EngineError, UnsupportedPlan
from cloud.grid import Grid

MEDIA = ("AIR700ICRU", "LUNG700ICRU", "H2O700ICRU", "ICRPBONE700ICRU")
MEDIUM_DENSITY_LIMITS = (0.05, 0.8, 1.2)  # air below 0.05, lung below 0.8, water below 1.2, bone above
GEOMETRY_FILE = "photon_geometry.npz"
LEFT_OUT = 1e-3  # the weakest beamlets, up to this fraction of a plan's fluence, are not run (``_kept``)
BEAMLETS_FILE = "photon_beamlets.npz"


def _data(name: str) -> Path:
    return Path(str(resources.files("cloud.engines.ompmc.data").joinpath(name)))


@dataclass(frozen=True)
class EnergyModel:
    spectrum: str
    gy_per_mu_ref: float
    ref_ssd_cm: float
    ref_field_cm: float
    ref_depth_cm: float
    engine_dose_ref: float | None


@dataclass(frozen=True)
class PhotonBeamModel:
    name: str
    beamlet_mm: float
    energies: dict[float, EnergyModel]
    commissioned: bool

    def for_energy(self, mv: float, beam: str) -> EnergyModel:
        for e, model in self.energies.items():
            if abs(e - mv) < 1e-3:
                return model
        known = ", ".join(f"{e:g} MV" for e in sorted(self.energies))
        raise UnsupportedPlan(f"beam {beam}: {mv:g} MV is not in the photon beam model {self.name} ({known})")


def read_photon_model(source: Path | str) -> PhotonBeamModel:
    """A photon beam model (JSON, see data/generic_photon_model.json); GENERIC_MODEL = the built-in one."""
    generic = isinstance(source, str) and source == GENERIC_MODEL
    path = _data("generic_photon_model.json") if generic else Path(source)
    try:
        raw = json.loads(Path(path).read_text())
        energies = {float(k): EnergyModel(spectrum=str(v["spectrum"]), gy_per_mu_ref=float(v["gy_per_mu_ref"]),
                                          ref_ssd_cm=float(v["ref_ssd_cm"]), ref_field_cm=float(v["ref_field_cm"]),
                                          ref_depth_cm=float(v["ref_depth_cm"]),
                                          engine_dose_ref=None if v.get("engine_dose_ref") is None
                                          else float(v["engine_dose_ref"]))
                    for k, v in raw["energies"].items()}
        beamlet = float(raw.get("beamlet_mm", 5.0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EngineError(f"photon beam model {Path(path).name}: {exc}") from exc
    from cloud.engines.ompmc.adapter import SHIPPED_SPECTRA

    odd = sorted({e.spectrum for e in energies.values()} - set(SHIPPED_SPECTRA))
    if odd:
        raise EngineError(f"photon beam model {Path(path).name}: spectrum {odd[0]!r} is not one shipped with ompmc "
                          f"({', '.join(SHIPPED_SPECTRA)})")
    if not energies or beamlet <= 0:
        raise EngineError(f"photon beam model {Path(path).name}: no energies or a bad beamlet size")
    return PhotonBeamModel(name="generic" if generic else Path(path).name, beamlet_mm=beamlet, energies=energies,
                           commissioned=not generic)


# --- the CT ---------------------------------------------------------------------------------------------


@functools.cache
def _hu_table() -> np.ndarray:
    table: np.ndarray = np.loadtxt(_data("hu_photon.txt"), comments="#")
    return table


def hu_to_density(hu: np.ndarray) -> np.ndarray:
    table = _hu_table()
    density: np.ndarray = np.interp(hu.astype(np.float64), table[:, 0], table[:, 1])
    return density


def density_to_medium(density: np.ndarray) -> np.ndarray:
    """1-based medium index into MEDIA."""
    return (np.searchsorted(np.array(MEDIUM_DENSITY_LIMITS), density, side="right") + 1).astype(np.int32)


def transport_density(volume_hu: np.ndarray, ct: Grid, transport: Grid | None) -> np.ndarray:
    """Mass density (g/cm3) on the transport grid: the CT's own voxels (``transport`` None), or each
    transport voxel's mean over the CT voxels it overlaps (air where it reaches beyond the CT)."""
    if transport is None:
        return hu_to_density(volume_hu)
    air = float(hu_to_density(np.array([-1000.0]))[0])
    return dosegrid.average_onto(volume_hu, ct, transport, outside=air, transform=hu_to_density)


def write_geometry(density: np.ndarray, grid: Grid, path: Path) -> None:
    """The transport geometry: voxel edges (cm), density and medium (by density) on ``grid``."""
    edges = [e / 10.0 for e in grid.voxel_edges()[::-1]]  # cm, x first (ompMC's order)
    np.savez_compressed(path, x=edges[0], y=edges[1], z=edges[2], density=density.astype(np.float32),
                        medium=density_to_medium(density).astype(np.int8))


def geometry_density(path: Path) -> np.ndarray:
    """The density cube of a written geometry, [z, y, x]."""
    with np.load(path) as g:
        density: np.ndarray = g["density"]
        return density


def load_geometry(ompmc: Any, path: Path) -> Any:
    with np.load(path) as g:
        density = np.asfortranarray(g["density"].astype(np.float64).transpose(2, 1, 0))
        medium = np.asfortranarray(g["medium"].astype(np.int32).transpose(2, 1, 0))
        return ompmc.Geometry(g["x"], g["y"], g["z"], list(MEDIA), density, medium)


# --- beams ----------------------------------------------------------------------------------------------


def beam_axes(beam: PhotonBeam) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(towards the source, collimator X, collimator Y) as unit vectors in patient coordinates."""
    g, c, t = (math.radians(a) for a in (beam.gantry, beam.collimator, beam.couch))
    to_source = np.array([math.sin(g), -math.cos(g), 0.0])
    xb = np.array([math.cos(g), math.sin(g), 0.0])
    yb = np.array([0.0, 0.0, 1.0])
    xc = math.cos(c) * xb + math.sin(c) * yb
    yc = -math.sin(c) * xb + math.cos(c) * yb
    couch = np.array([[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]])
    return couch @ to_source, couch @ xc, couch @ yc


def beam_fluence(beam: PhotonBeam, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Beamlet centres along collimator X and Y (mm at the isocenter) and the weights [ix, iy] in MU."""
    lo_x = max(-200.0, min(s.x_jaw[0] for s in beam.segments))
    hi_x = min(200.0, max(s.x_jaw[1] for s in beam.segments))
    lo_y = max(-200.0, min(s.y_jaw[0] for s in beam.segments))
    hi_y = min(200.0, max(s.y_jaw[1] for s in beam.segments))
    if hi_x <= lo_x or hi_y <= lo_y:
        raise UnsupportedPlan(f"beam {beam.name}: jaws closed")
    nx, ny = math.ceil((hi_x - lo_x) / step), math.ceil((hi_y - lo_y) / step)
    xs = lo_x + step * (np.arange(nx) + 0.5)
    ys = lo_y + step * (np.arange(ny) + 0.5)
    weights = np.zeros((nx, ny))
    for seg in beam.segments:
        weights += seg.mu * open_fraction(seg, xs, ys, step)
    return xs, ys, weights


def write_beamlets(plan: PhotonPlan, step_mm: float, path: Path) -> tuple[float, float]:
    """Every open beamlet of every beam (cm, patient frame) and its weight, normalised to a sum of 1, but
    the weakest (``_kept``); returns the total weight of those written (MU) and the fraction left out."""
    sources, i_beam, corners, side1, side2, weights = [], [], [], [], [], []
    for b, beam in enumerate(plan.beams):
        to_source, xc, yc = beam_axes(beam)
        iso = np.array(beam.isocenter) / 10.0
        sources.append(iso + beam.sad_mm / 10.0 * to_source)
        xs, ys, w = beam_fluence(beam, step_mm)
        for ix, iy in zip(*np.nonzero(w > 0), strict=True):
            corner = iso + (xs[ix] - step_mm / 2) / 10.0 * xc + (ys[iy] - step_mm / 2) / 10.0 * yc
            corners.append(corner)
            side1.append(step_mm / 10.0 * xc)
            side2.append(step_mm / 10.0 * yc)
            i_beam.append(b)
            weights.append(w[ix, iy])
    if not weights:
        raise UnsupportedPlan("no open beamlet in any beam (jaws or leaves closed)")
    w = np.array(weights)
    keep = _kept(w)
    total = float(np.sum(w[keep]))
    np.savez_compressed(path, i_beam=np.array(i_beam, dtype=np.int32)[keep], source=np.array(sources),
                        corner=np.array(corners)[keep], side1=np.array(side1)[keep], side2=np.array(side2)[keep],
                        weights=w[keep] / total)
    return total, 1.0 - total / float(np.sum(w))


def _kept(weights: np.ndarray) -> np.ndarray:
    """Which beamlets to run: all but the weakest, as many as together carry at most LEFT_OUT of the fluence.

    ompMC runs a beamlet only when its share of a batch is one history or more (``min_histories``): a
    sliver a leaf barely uncovers (weight 1/1000 of the strongest, common in arcs) would make every
    shard need millions of histories. Leaving out the weakest ones up to LEFT_OUT (0.1 %) of the
    fluence -- a dose change far below the MC noise and the ideal leaf edges -- keeps that to
    tens of thousands; how much was left out is recorded with the job's inputs.
    """
    order = np.argsort(weights, kind="stable")
    dropped = np.cumsum(weights[order]) <= LEFT_OUT * float(np.sum(weights))
    keep = np.ones(weights.size, dtype=bool)
    keep[order[dropped]] = False
    return keep


def run_forward(ompmc: Any, root: Path, spectrum: str, histories: int, seed: int, second_seed: int,
                batches: int) -> np.ndarray:
    """Dose [z, y, x] for the beamlet weights normalised to a sum of 1."""
    geometry = load_geometry(ompmc, root / GEOMETRY_FILE)
    with np.load(root / BEAMLETS_FILE) as b:
        source = ompmc.BeamletSource(b["i_beam"], b["source"], b["corner"], b["side1"], b["side2"])
        weights = b["weights"].copy()
    check_histories(weights, histories, batches)
    dose, _unc = ompmc.calc_forward(geometry, source, weights, spectrum_for(ompmc, spectrum),
                                    ompmc.Physics(seeds=(int(seed), second_seed)), n_histories=int(histories),
                                    n_batches=batches)
    return np.ascontiguousarray(np.asarray(dose).transpose(2, 1, 0))


def min_histories(weights: np.ndarray, batches: int) -> int:
    """The fewest histories with which ompMC's calc_forward runs every beamlet.

    It shares each batch's histories out by weight and leaves out (with a message on stdout, not an
    error) every beamlet whose share is below one history a batch: that beamlet's fluence would be
    missing from the dose. Every beamlet keeps its share once histories / batches >= total / smallest.
    """
    positive = weights[weights > 0]
    if positive.size == 0:
        raise UnsupportedPlan("no open beamlet in any beam (jaws or leaves closed)")
    return int(math.ceil(batches * float(positive.sum()) / float(positive.min()) * (1.0 + 1e-9)))


def check_histories(weights: np.ndarray, histories: int, batches: int) -> None:
    """EngineError unless ``histories`` run every beamlet (``min_histories``): never a dose missing fluence."""
    need = min_histories(weights, batches)
    if histories < need:
        raise EngineError(f"{histories} histories leave out the weakest beamlets of this plan (ompMC gives a beamlet "
                          f"its share of a batch only when that is one history or more): at least {need} are "
                          "needed per shard; raise [engine] primaries or use fewer shards")


def spectrum_for(ompmc: Any, name: str) -> Any:
    path = Path(ompmc.data_path()) / "spectra" / f"{name}.spectrum"
    if not path.is_file():
        raise EngineError(f"photon spectrum {name!r} not found")
    return ompmc.Spectrum.from_file(str(path))


def reference_engine_dose(energy: EnergyModel, step_mm: float, histories: int, seed: int = 1) -> tuple[float, float]:
    """What this machinery computes for 1 MU at the model's reference point, and its relative uncertainty.

    A water phantom (30 x 30 cm, 30 cm deep) with its surface at the isocenter, SSD = SAD =
    ``ref_ssd_cm``, one ``ref_field_cm`` square field at gantry 0, the same beamlets as a plan; the
    dose in a 2 x 2 x 1 cm voxel on the axis centred on ``ref_depth_cm`` (large, so that its
    statistics need few histories; the dose is flat to well under 1 % over it near d_max). Run it in
    a process of its own (ompMC keeps global state).
    """
    import tempfile

    from cloud.engines.ompmc.adapter import SECOND_SEED, _ompmc
    from cloud.engines.ompmc.photonplan import PhotonBeam, PhotonPlan, Segment

    half = 5.0 * energy.ref_field_cm
    beam = PhotonBeam(name="reference", machine="", energy_mv=0.0, sad_mm=10.0 * energy.ref_ssd_cm, gantry=0.0,
                      collimator=0.0, couch=0.0, isocenter=(0.0, 0.0, 0.0),
                      segments=(Segment(mu=1.0, x_jaw=(-half, half), y_jaw=(-half, half)),))
    plan = PhotonPlan(sop_instance_uid="", frame_of_reference_uid="", fractions=1, beams=(beam,))
    ref = energy.ref_depth_cm
    lateral = np.array([-15.0, -1.0, 1.0, 15.0])
    depth = np.unique(np.concatenate([[0.0], np.arange(ref - 0.5, 30.0, 1.0), [30.0]]))
    depth = depth[depth >= 0.0]
    shape = (3, len(depth) - 1, 3)  # x, y (depth: gantry 0 enters along +y), z
    ompmc = _ompmc()
    geometry = ompmc.Geometry(lateral, depth, lateral, list(MEDIA), np.ones(shape, order="F"),
                              np.full(shape, MEDIA.index("H2O700ICRU") + 1, dtype=np.int32, order="F"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / BEAMLETS_FILE
        total, _left_out = write_beamlets(plan, step_mm, path)
        with np.load(path) as b:
            source = ompmc.BeamletSource(b["i_beam"], b["source"], b["corner"], b["side1"], b["side2"])
            weights = b["weights"] * total
    check_histories(weights, histories, 10)
    dose, unc = ompmc.calc_forward(geometry, source, weights, spectrum_for(ompmc, energy.spectrum),
                                   ompmc.Physics(seeds=(seed, SECOND_SEED)), n_histories=histories, n_batches=10)
    k = int(np.argmin(np.abs(0.5 * (depth[1:] + depth[:-1]) - ref)))
    return float(np.asarray(dose)[1, k, 1]), float(np.asarray(unc)[1, k, 1])
