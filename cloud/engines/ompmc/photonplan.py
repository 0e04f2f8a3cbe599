"""Photon RT Plans: what the ompmc engine computes, read from DICOM, and everything it refuses.

Computed: static and step-and-shoot photon beams -- jaws (ASYMX/ASYMY, X/Y) and MLC (MLCX/MLCY)
from each control point's BeamLimitingDevicePositionSequence, gantry, collimator and couch angle,
isocenter, source-axis distance, and the meterset delivered between control points (beam MU from
the fraction group x the cumulative meterset weight). A segment is the aperture of control point i
held while the meterset goes from CP i to CP i+1; step-and-shoot pairs (same aperture, more MU) are
exactly that.

Arcs (VMAT, conformal arcs: the gantry rotating CW or CC while the beam is on) are computed as many
control points: each control point interval that delivers meterset becomes one static beam at the
interval's mean gantry angle (along the rotation direction), with the interval's MU and the mean of
its two apertures (jaws and leaves may move with the gantry). A control point spacing of a few
degrees, as TPSs export, keeps the error of that discretisation small.

Refused, naming the element (UnsupportedPlan): electron (or other non-photon) beams, wedges,
compensators, blocks, boli, applicators (electron cones, virtual cones), collimator or couch
rotating during the beam, leaves or jaws moving while the beam is on at a fixed gantry angle
(sliding window), a gantry angle that changes without a rotation direction, a non-standard fluence
mode (FFF, unless a later beam model says it has one), couch pitch/roll.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cloud.errors import UnsupportedPlan

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

_TOL = 1e-3


@dataclass(frozen=True)
class Segment:
    """One aperture and the MU delivered through it; positions in mm at the isocenter plane."""

    mu: float
    x_jaw: tuple[float, float]
    y_jaw: tuple[float, float]
    mlc: np.ndarray | None = None  # (n_leaf_pairs, 2): bank A (negative side), bank B
    mlc_axis: str = "X"  # leaves travel along X (MLCX) or Y (MLCY)
    leaf_boundaries: np.ndarray | None = None  # n_leaf_pairs + 1, along the other axis


@dataclass(frozen=True)
class PhotonBeam:
    name: str
    machine: str
    energy_mv: float
    sad_mm: float
    gantry: float
    collimator: float
    couch: float
    isocenter: tuple[float, float, float]
    segments: tuple[Segment, ...]
    # The plan's beam this comes from (an arc gives one PhotonBeam per control point interval).
    dicom_beam: str = ""

    @property
    def mu(self) -> float:
        return float(sum(s.mu for s in self.segments))


@dataclass(frozen=True)
class PhotonPlan:
    sop_instance_uid: str
    frame_of_reference_uid: str
    fractions: int
    beams: tuple[PhotonBeam, ...] = field(default_factory=tuple)

    @property
    def machines(self) -> tuple[str, ...]:
        return tuple(sorted({b.machine for b in self.beams}))

    @property
    def dicom_beams(self) -> tuple[str, ...]:
        """The plan's treatment beams computed (an arc counts once)."""
        return tuple(dict.fromkeys(b.dicom_beam or b.name for b in self.beams))


def _f(value: object, default: float = 0.0) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _refuse_accessories(beam: Dataset, name: str) -> None:
    for what, seq, id_tag in (("wedge", "WedgeSequence", "WedgeID"),
                              ("compensator", "CompensatorSequence", "CompensatorID"),
                              ("block", "BlockSequence", "BlockName"),
                              ("bolus", "ReferencedBolusSequence", "ReferencedROINumber")):
        count = int(_f(beam.get(f"NumberOf{'Boli' if what == 'bolus' else what.capitalize() + 's'}", 0)))
        items = beam.get(seq) or []
        if count > 0 or len(items) > 0:
            ids = ", ".join(str(it.get(id_tag, "?")) for it in items) or f"{count}"
            raise UnsupportedPlan(f"beam {name}: {what} ({ids}) is not modelled by the photon engine")
    for app in beam.get("ApplicatorSequence") or []:
        kind = str(app.get("ApplicatorType", "applicator"))
        ident = str(app.get("ApplicatorID", "?"))
        raise UnsupportedPlan(f"beam {name}: applicator {ident} ({kind}) is not modelled by the photon engine")
    if beam.get("GeneralAccessorySequence"):
        ids = ", ".join(str(a.get("AccessoryCode", a.get("GeneralAccessoryID", "?")))
                        for a in beam.GeneralAccessorySequence)
        raise UnsupportedPlan(f"beam {name}: accessory ({ids}) is not modelled by the photon engine")
    for mode in beam.get("PrimaryFluenceModeSequence") or []:
        if str(mode.get("FluenceMode", "STANDARD")) != "STANDARD":
            ident = str(mode.get("FluenceModeID", "NON_STANDARD"))
            raise UnsupportedPlan(f"beam {name}: fluence mode {ident} (e.g. flattening-filter free) has no beam model")


def check_photon_plan(plan: Dataset) -> None:
    """UnsupportedPlan with the reason for anything this engine does not model (headers only)."""
    from pydicom.uid import RTPlanStorage  # here: a worker never loads pydicom

    if "IonBeamSequence" in plan:
        raise UnsupportedPlan("RT Ion Plan: the photon engine computes photon RT Plans only")
    if str(plan.get("SOPClassUID", "")) != RTPlanStorage or "BeamSequence" not in plan:
        raise UnsupportedPlan(f"not an RT Plan with beams (SOP class {plan.get('SOPClassUID', 'missing')})")
    treatment = [b for b in plan.BeamSequence if str(b.get("TreatmentDeliveryType", "TREATMENT")) == "TREATMENT"]
    if not treatment:
        raise UnsupportedPlan("plan has no treatment beam")
    for beam in treatment:
        name = str(beam.get("BeamName", beam.get("BeamNumber", "?")))
        kind = str(beam.get("RadiationType", ""))
        if kind != "PHOTON":
            raise UnsupportedPlan(f"beam {name}: radiation type {kind or 'missing'}; "
                                  "electron plans (applicators, cut-outs) are not computed yet")
        _refuse_accessories(beam, name)
        cps = beam.get("ControlPointSequence") or []
        if len(cps) < 2:
            raise UnsupportedPlan(f"beam {name}: fewer than two control points")
        for cp in cps:
            for tag, what in (("BeamLimitingDeviceRotationDirection", "collimator"),
                              ("PatientSupportRotationDirection", "couch")):
                if str(cp.get(tag, "NONE") or "NONE") not in ("NONE", ""):
                    raise UnsupportedPlan(f"beam {name}: {what} rotates during the beam; only the gantry may "
                                          "rotate (arcs)")
            direction = str(cp.get("GantryRotationDirection", "NONE") or "NONE")
            if direction not in ("NONE", "CW", "CC"):
                raise UnsupportedPlan(f"beam {name}: gantry rotation direction {direction!r}")
            if abs(_f(cp.get("TableTopPitchAngle", 0))) > _TOL or abs(_f(cp.get("TableTopRollAngle", 0))) > _TOL:
                raise UnsupportedPlan(f"beam {name}: couch pitch/roll is not modelled")
            if cp.get("WedgePositionSequence"):
                raise UnsupportedPlan(f"beam {name}: wedge positions in the control points (wedge) are not modelled")


def _devices(beam: Dataset) -> dict[str, Dataset]:
    return {str(d.RTBeamLimitingDeviceType): d for d in beam.get("BeamLimitingDeviceSequence") or []}


def _positions(cp: Dataset) -> dict[str, list[float]]:
    return {str(p.RTBeamLimitingDeviceType): [float(v) for v in p.LeafJawPositions]
            for p in cp.get("BeamLimitingDevicePositionSequence") or []}


def read_photon_plan(plan: Dataset) -> PhotonPlan:
    """The plan's treatment beams as segments; UnsupportedPlan naming what is not computed."""
    check_photon_plan(plan)
    try:
        fg = plan.FractionGroupSequence[0]
    except (AttributeError, IndexError):
        raise UnsupportedPlan("plan has no fraction group (FractionGroupSequence)") from None
    fractions = int(_f(fg.get("NumberOfFractionsPlanned", 1), 1)) or 1
    meterset = {int(r.ReferencedBeamNumber): _f(r.get("BeamMeterset"), 0.0)
                for r in fg.get("ReferencedBeamSequence") or []}
    beams = []
    for beam in plan.BeamSequence:
        if str(beam.get("TreatmentDeliveryType", "TREATMENT")) != "TREATMENT":
            continue
        name = str(beam.get("BeamName", beam.get("BeamNumber", "?")))
        beam_mu = meterset.get(int(beam.get("BeamNumber", -1)), 0.0)
        final = _f(beam.get("FinalCumulativeMetersetWeight"), 0.0)
        if beam_mu <= 0 or final <= 0:
            continue  # a setup field, or a beam with no meterset: nothing delivered
        devices = _devices(beam)
        cps = list(beam.ControlPointSequence)
        first = cps[0]
        iso = first.get("IsocenterPosition")
        if iso is None:
            raise UnsupportedPlan(f"beam {name}: first control point has no IsocenterPosition")
        mlc_type = next((t for t in ("MLCX", "MLCY") if t in devices), None)
        boundaries = None
        if mlc_type is not None:
            lb = devices[mlc_type].get("LeafPositionBoundaries")
            if lb is None:
                raise UnsupportedPlan(f"beam {name}: {mlc_type} without LeafPositionBoundaries")
            boundaries = np.array([float(v) for v in lb])
        collimator, couch = _f(first.get("BeamLimitingDeviceAngle")), _f(first.get("PatientSupportAngle"))
        gantry, direction = _f(first.get("GantryAngle")), str(first.get("GantryRotationDirection", "NONE") or "NONE")
        pos = _positions(first)
        intervals: list[tuple[float, Segment]] = []  # (gantry angle, segment)
        for i in range(len(cps) - 1):
            a, b = cps[i], cps[i + 1]
            for key, tag, now in (("collimator", "BeamLimitingDeviceAngle", collimator),
                                  ("couch", "PatientSupportAngle", couch)):
                if tag in b and abs(_f(b.get(tag)) - now) > _TOL:
                    raise UnsupportedPlan(f"beam {name}: {key} angle changes during the beam")
            if i > 0:
                pos = {**pos, **_positions(a)}
                direction = str(a.get("GantryRotationDirection", direction) or "NONE")
            next_pos = {**pos, **_positions(b)}
            next_gantry = _f(b.get("GantryAngle"), gantry) if "GantryAngle" in b else gantry
            sweep = _sweep(name, gantry, next_gantry, direction)
            d_mu = (_f(b.get("CumulativeMetersetWeight")) - _f(a.get("CumulativeMetersetWeight"))) / final * beam_mu
            if d_mu > 1e-9:
                moving = [dev for dev, values in next_pos.items()
                          if dev in pos and not np.allclose(values, pos[dev], atol=0.01)]
                if moving and sweep == 0.0:
                    raise UnsupportedPlan(f"beam {name}: {moving[0]} moves while the beam is on at a fixed gantry "
                                          "angle (sliding window); static, step-and-shoot and arc fields are computed")
                aperture = {dev: [(u + v) / 2.0 for u, v in zip(values, next_pos.get(dev, values), strict=True)]
                            for dev, values in pos.items()}
                intervals.append(((gantry + sweep / 2.0) % 360.0,
                                  _segment(name, aperture, d_mu, mlc_type, boundaries)))
            gantry = next_gantry
        if not intervals:
            continue
        common = {"machine": str(beam.get("TreatmentMachineName", "")), "energy_mv": _f(first.get("NominalBeamEnergy")),
                  "sad_mm": _f(beam.get("SourceAxisDistance"), 1000.0), "collimator": collimator % 360.0,
                  "couch": couch % 360.0, "isocenter": (float(iso[0]), float(iso[1]), float(iso[2])),
                  "dicom_beam": name}
        if len({round(g, 6) for g, _seg in intervals}) == 1:  # static or step-and-shoot: one beam
            beams.append(PhotonBeam(name=name, gantry=intervals[0][0], segments=tuple(seg for _g, seg in intervals),
                                    **common))  # type: ignore[arg-type]
        else:  # an arc: one beam per control point interval
            beams.extend(PhotonBeam(name=f"{name} [{k + 1}]", gantry=g, segments=(seg,), **common)  # type: ignore[arg-type]
                         for k, (g, seg) in enumerate(intervals))
    if not beams:
        raise UnsupportedPlan("plan has no treatment beam with a meterset")
    return PhotonPlan(sop_instance_uid=str(plan.get("SOPInstanceUID", "")),
                      frame_of_reference_uid=str(plan.get("FrameOfReferenceUID", "")), fractions=fractions,
                      beams=tuple(beams))


def _sweep(name: str, start: float, end: float, direction: str) -> float:
    """Signed degrees the gantry turns from ``start`` to ``end`` (CW: increasing angle, IEC 61217)."""
    if abs((end - start + 180.0) % 360.0 - 180.0) <= _TOL:
        return 0.0
    if direction == "CW":
        return (end - start) % 360.0
    if direction == "CC":
        return -((start - end) % 360.0)
    raise UnsupportedPlan(f"beam {name}: the gantry angle changes from {start:g} to {end:g} degrees with no "
                          "GantryRotationDirection (CW or CC)")


def _segment(name: str, pos: dict[str, list[float]], mu: float, mlc_type: str | None,
             boundaries: np.ndarray | None) -> Segment:
    big = 1000.0
    x = pos.get("ASYMX") or pos.get("X") or [-big, big]
    y = pos.get("ASYMY") or pos.get("Y") or [-big, big]
    mlc = None
    if mlc_type is not None:
        values = pos.get(mlc_type)
        if values is None:
            raise UnsupportedPlan(f"beam {name}: no {mlc_type} leaf positions in the first control point")
        assert boundaries is not None
        n = len(boundaries) - 1
        if len(values) != 2 * n:
            raise UnsupportedPlan(f"beam {name}: {len(values)} {mlc_type} positions for {n} leaf pairs")
        mlc = np.array([values[:n], values[n:]], dtype=np.float64).T
    return Segment(mu=mu, x_jaw=(x[0], x[1]), y_jaw=(y[0], y[1]), mlc=mlc,
                   mlc_axis="Y" if mlc_type == "MLCY" else "X", leaf_boundaries=boundaries)


def open_fraction(seg: Segment, xs: np.ndarray, ys: np.ndarray, step: float) -> np.ndarray:
    """Open fraction of square beamlets (centres xs x ys, side `step`, mm at isocenter): [ix, iy].

    Jaws and leaves are treated as ideal edges (no transmission, no penumbra of their own: the
    transport and the source size give the penumbra); a beamlet cut by an edge is open by its area.
    """
    def overlap(c: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.clip((np.minimum(c + step / 2, hi) - np.maximum(c - step / 2, lo)) / step, 0.0, 1.0)

    fx = overlap(xs, *seg.x_jaw)[:, None]
    fy = overlap(ys, *seg.y_jaw)[None, :]
    frac = fx * fy
    if seg.mlc is not None and seg.leaf_boundaries is not None:
        travel, across = (xs, ys) if seg.mlc_axis == "X" else (ys, xs)
        leaf_open = np.zeros((travel.size, across.size))
        lb = seg.leaf_boundaries
        for k in range(len(lb) - 1):
            w = np.clip((np.minimum(across + step / 2, lb[k + 1]) - np.maximum(across - step / 2, lb[k])) / step,
                        0.0, 1.0)
            if not np.any(w):
                continue
            a, b = seg.mlc[k]
            if b <= a:
                continue
            leaf_open += overlap(travel, a, b)[:, None] * w[None, :]
        frac = frac * (leaf_open if seg.mlc_axis == "X" else leaf_open.T)
    return np.asarray(frac)
