"""Which HU -> density/material calibration a CT gets: chosen on the clinic node, before sealing.

Clinics calibrate each CT scanner (and protocol) separately. ``[engine] ct_calibrations`` maps a
scanner to its pair of tables; the scanner is recognised by the CT's ``Manufacturer/
ManufacturerModelName`` or its ``StationName``. Those attributes do not survive de-identification
(PS3.15 removes StationName; our profile removes every unlisted text attribute), so the choice is
made here, on the original CT, and only the tables and a neutral label travel in the bundle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

BUILT_IN = "built-in"


@dataclass(frozen=True)
class CtCalibration:
    key: str  # the config key that matched ("" for the built-in tables)
    density: Path | None
    material: Path | None
    digest: str = ""  # SHA-256 of both tables, first 12 hex digits: what the bundle calls it

    @property
    def label(self) -> str:
        """The non-identifying name that goes into the bundle (no scanner or station name)."""
        return f"site tables sha256:{self.digest}" if self.key else BUILT_IN

    @property
    def description(self) -> str:
        """What the clinic sees (job data, RT Dose): the scanner key and the tables' digest."""
        return f"{self.key!r} (sha256:{self.digest})" if self.key else f"{BUILT_IN} tables"

    def for_engine(self) -> tuple[str, Path, Path] | None:
        if self.density is None or self.material is None:
            return None
        return self.label, self.density, self.material


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def scanner_names(ct: Dataset) -> list[str]:
    """The names a CT slice may be matched by, most specific first."""
    names = []
    manufacturer = str(ct.get("Manufacturer", "") or "").strip()
    model = str(ct.get("ManufacturerModelName", "") or "").strip()
    if manufacturer or model:
        names.append(f"{manufacturer}/{model}")
    station = str(ct.get("StationName", "") or "").strip()
    if station:
        names.append(station)
    return names


def choose_ct_calibration(cts: Sequence[Dataset], calibrations: Mapping[str, Sequence[Path]]) -> CtCalibration:
    """The calibration whose key matches the CT's scanner (case and spacing ignored); else the built-in."""
    if not cts or not calibrations:
        return CtCalibration("", None, None)
    by_name = {_norm(k): k for k in calibrations}
    for name in scanner_names(cts[0]):
        key = by_name.get(_norm(name))
        if key is not None:
            density, material = calibrations[key]
            h = hashlib.sha256(Path(density).read_bytes() + b"\0" + Path(material).read_bytes())
            return CtCalibration(key, Path(density), Path(material), h.hexdigest()[:12])
    return CtCalibration("", None, None)
