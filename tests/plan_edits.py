"""Ways to spoil a phantom plan, one per kind of bad input the engine must refuse with its reason."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


def with_range_shifter(plan: Dataset, rs_id: str = "RS_75MM", wet_mm: float = 75.0) -> Dataset:
    """Every beam gets range shifter ``rs_id`` inserted (IN from its first control point)."""
    for beam in plan.IonBeamSequence:
        rs = Dataset()
        rs.RangeShifterNumber = 1
        rs.RangeShifterID = rs_id
        rs.RangeShifterType = "BINARY"
        beam.RangeShifterSequence = Sequence([rs])
        beam.NumberOfRangeShifters = 1
        setting = Dataset()
        setting.ReferencedRangeShifterNumber = 1
        setting.RangeShifterSetting = "IN"
        setting.IsocenterToRangeShifterDistance = 300.0
        setting.RangeShifterWaterEquivalentThickness = wet_mm
        beam.IonControlPointSequence[0].RangeShifterSettingsSequence = Sequence([setting])
    return plan


def without_beams(plan: Dataset) -> Dataset:
    plan.IonBeamSequence = Sequence()
    plan.FractionGroupSequence[0].ReferencedBeamSequence = Sequence()
    plan.FractionGroupSequence[0].NumberOfBeams = 0
    return plan


def with_energy(plan: Dataset, energy_mev: float) -> Dataset:
    for beam in plan.IonBeamSequence:
        for cp in beam.IonControlPointSequence:
            cp.NominalBeamEnergy = energy_mev
    return plan


def with_odd_spot_map(plan: Dataset) -> Dataset:
    cp = plan.IonBeamSequence[0].IonControlPointSequence[0]
    cp.ScanSpotPositionMap = [float(v) for v in cp.ScanSpotPositionMap][:-1]
    return plan


def with_machine(plan: Dataset, name: str) -> Dataset:
    for beam in plan.IonBeamSequence:
        beam.TreatmentMachineName = name
    return plan
