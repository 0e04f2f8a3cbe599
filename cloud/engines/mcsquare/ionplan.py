"""Read an RT Ion Plan (PBS) into plain data, and refuse what a proton PBS engine cannot compute.

Spot MU = ScanSpotMetersetWeight x BeamMeterset / FinalCumulativeMetersetWeight (the beam's MU
from FractionGroupSequence[0]). Angles, isocenter and range-shifter settings are carried forward
from the control point that last set them, as DICOM allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cloud.errors import UnsupportedPlan

if TYPE_CHECKING:  # pydicom costs ~0.5 s to import; a worker only needs it for type hints
    from pydicom.dataset import Dataset



@dataclass
class RangeShifterSetting:
    rs_id: str
    wet_mm: float
    iso_to_rs_mm: float


@dataclass
class Layer:
    energy_mev: float
    positions_mm: np.ndarray  # (n, 2): x, y in the IEC gantry frame at the isocenter plane
    mu: np.ndarray  # (n,)
    range_shifter: RangeShifterSetting | None = None


@dataclass
class Beam:
    number: int
    name: str
    machine: str
    gantry_deg: float
    couch_deg: float
    isocenter_mm: tuple[float, float, float]
    layers: list[Layer] = field(default_factory=list)
    range_shifter_ids: tuple[str, ...] = ()

    @property
    def mu(self) -> float:
        return float(sum(layer.mu.sum() for layer in self.layers))


@dataclass
class IonPlan:
    sop_instance_uid: str
    frame_of_reference_uid: str
    fractions: int
    beams: list[Beam]

    @property
    def machines(self) -> tuple[str, ...]:
        return tuple(sorted({b.machine for b in self.beams}))


def _radiation_types(plan: Dataset) -> list[str]:
    beams = plan.get("BeamSequence") or plan.get("IonBeamSequence") or []
    return sorted({str(b.get("RadiationType", "unknown")) for b in beams})


def check_proton_pbs(plan: Dataset) -> None:
    """Raise UnsupportedPlan with the reason if this is not a proton pencil-beam-scanning plan."""
    from pydicom.uid import RTIonPlanStorage, RTPlanStorage  # here: a worker never loads pydicom

    sop = str(plan.get("SOPClassUID", ""))
    if sop == RTPlanStorage or "BeamSequence" in plan:
        kinds = ", ".join(_radiation_types(plan)) or "no beams"
        raise UnsupportedPlan(f"RT Plan with {kinds} beams: this engine computes proton pencil-beam-scanning "
                              "(RT Ion Plan) only")
    if sop != RTIonPlanStorage:
        raise UnsupportedPlan(f"not an RT Ion Plan (SOP class {sop or 'missing'})")
    if not plan.get("IonBeamSequence"):
        raise UnsupportedPlan("RT Ion Plan has no beams (IonBeamSequence missing or empty)")
    for beam in plan.IonBeamSequence:
        name = beam.get("BeamName", beam.get("BeamNumber", "?"))
        if beam.get("TreatmentDeliveryType", "TREATMENT") != "TREATMENT":
            continue
        kind = str(beam.get("RadiationType", ""))
        if kind != "PROTON":
            raise UnsupportedPlan(f"beam {name}: radiation type {kind or 'missing'}; this engine computes protons only")
        mode = str(beam.get("ScanMode", ""))
        if mode != "MODULATED":
            raise UnsupportedPlan(f"beam {name}: scan mode {mode or 'missing'} is not pencil-beam scanning "
                                  "(MODULATED); passive and uniform scanning are not supported")
        for what in ("Blocks", "Compensators", "Boli", "Wedges", "RangeModulators"):
            if int(beam.get(f"NumberOf{what}", 0) or 0) > 0:
                raise UnsupportedPlan(f"beam {name}: {what.lower()} are not supported by this engine")


def read_ion_plan(plan: Dataset) -> IonPlan:
    """The plan's treatment beams with their spots in MU; UnsupportedPlan for anything else.

    A malformed plan (a required attribute missing, a value that is not a number) is UnsupportedPlan
    naming the attribute, never an internal error.
    """
    check_proton_pbs(plan)
    try:
        return _read_ion_plan(plan)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnsupportedPlan(f"malformed RT Ion Plan: {type(exc).__name__}: {exc}") from exc


def _read_ion_plan(plan: Dataset) -> IonPlan:
    try:
        fg = plan.FractionGroupSequence[0]
    except (AttributeError, IndexError):
        raise UnsupportedPlan("plan has no fraction group (FractionGroupSequence)") from None
    fractions = int(fg.get("NumberOfFractionsPlanned", 1) or 1)
    meterset = {int(r.ReferencedBeamNumber): float(r.get("BeamMeterset", 0) or 0)
                for r in fg.get("ReferencedBeamSequence", [])}
    beams: list[Beam] = []
    for ds in plan.IonBeamSequence:
        number = int(ds.BeamNumber)
        if ds.get("TreatmentDeliveryType", "TREATMENT") != "TREATMENT" or meterset.get(number, 0.0) <= 0:
            continue
        beams.append(_read_beam(ds, meterset[number]))
    if not beams:
        raise UnsupportedPlan("plan has no treatment beam with a meterset")
    return IonPlan(sop_instance_uid=str(plan.SOPInstanceUID),
                   frame_of_reference_uid=str(plan.get("FrameOfReferenceUID", "")), fractions=fractions, beams=beams)


def _read_beam(ds: Dataset, beam_mu: float) -> Beam:
    name = str(ds.get("BeamName", ds.BeamNumber))
    final = float(ds.get("FinalCumulativeMetersetWeight", 0) or 0)
    if final <= 0:
        raise UnsupportedPlan(f"beam {name}: FinalCumulativeMetersetWeight missing or zero")
    scale = beam_mu / final
    rs_ids = tuple(str(r.RangeShifterID) for r in ds.get("RangeShifterSequence", []))
    cps = ds.IonControlPointSequence
    first = cps[0]
    gantry = float(first.get("GantryAngle", 0.0))
    couch = float(first.get("PatientSupportAngle", 0.0))
    if "IsocenterPosition" not in first:
        raise UnsupportedPlan(f"beam {name}: first control point has no IsocenterPosition")
    iso = tuple(float(v) for v in first.IsocenterPosition)
    beam = Beam(number=int(ds.BeamNumber), name=name, machine=str(ds.get("TreatmentMachineName", "")),
                gantry_deg=gantry, couch_deg=couch, isocenter_mm=(iso[0], iso[1], iso[2]), range_shifter_ids=rs_ids)
    rs: RangeShifterSetting | None = None
    energy = None
    for cp in cps:
        for tag, current in (("GantryAngle", gantry), ("PatientSupportAngle", couch)):
            if tag in cp and abs(float(cp.get(tag)) - current) > 1e-3:
                raise UnsupportedPlan(f"beam {name}: {tag} changes during the beam (arcs are not supported)")
        if "NominalBeamEnergy" in cp:
            energy = float(cp.NominalBeamEnergy)
        for item in cp.get("RangeShifterSettingsSequence", []):
            if str(item.get("RangeShifterSetting", "OUT")).upper() == "IN":
                wet = item.get("RangeShifterWaterEquivalentThickness")
                if wet is None:
                    raise UnsupportedPlan(f"beam {name}: range shifter IN without RangeShifterWaterEquivalentThickness")
                rs_id = rs_ids[0] if rs_ids else "RS"
                ref = item.get("ReferencedRangeShifterNumber")
                for r in ds.get("RangeShifterSequence", []):
                    if ref is not None and int(r.get("RangeShifterNumber", -1)) == int(ref):
                        rs_id = str(r.RangeShifterID)
                rs = RangeShifterSetting(rs_id, float(wet), float(item.get("IsocenterToRangeShifterDistance", 0) or 0))
            else:
                rs = None
        weights = np.asarray(cp.get("ScanSpotMetersetWeights", []), dtype=float).ravel()
        if weights.size == 0 or not np.any(weights > 0):
            continue
        if energy is None:
            raise UnsupportedPlan(f"beam {name}: control point without NominalBeamEnergy")
        where = f"beam {name}, control point {cp.get('ControlPointIndex', '?')}"
        flat = np.asarray(cp.get("ScanSpotPositionMap", []), dtype=float).ravel()
        if flat.size % 2:
            raise UnsupportedPlan(f"{where}: ScanSpotPositionMap has {flat.size} values, an odd number "
                                  "(it must hold x, y pairs)")
        positions = flat.reshape(-1, 2)
        if positions.shape[0] != weights.size:
            raise UnsupportedPlan(f"{where}: ScanSpotPositionMap has {positions.shape[0]} spots but "
                                  f"ScanSpotMetersetWeights {weights.size}")
        keep = weights > 0
        beam.layers.append(Layer(energy_mev=energy, positions_mm=positions[keep], mu=weights[keep] * scale,
                                 range_shifter=rs))
    if not beam.layers:
        raise UnsupportedPlan(f"beam {name}: no spot with a positive meterset weight")
    return beam
