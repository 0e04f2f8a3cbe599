"""The one voxel grid of the product: where each value of a CT or dose array lies.

One axis order everywhere, the order the arrays are indexed in: (z, y, x). ``shape`` is
(nz, ny, nx), ``origin`` is (z0, y0, x0) -- the centre of voxel [0, 0, 0] --, ``spacing`` is
(dz, dy, dx), and ``z``, ``y``, ``x`` are the voxel-centre coordinates along each axis in DICOM
patient coordinates (mm), increasing. A value ``a[k, j, i]`` lies at (z[k], y[j], x[i]). Axial grids
only (ImageOrientationPatient 1,0,0,0,1,0).

Only formats outside the product keep their own order: a DICOM *point* such as ImagePositionPatient
or IsocenterPosition is (x, y, z) (``index_of`` takes one), PixelSpacing is (dy, dx), and MHD headers
(MCsquare) and ompMC's voxel edges list x first; the code that writes them says so where it does.

The axes are stored, not derived from a step, so a grid may be rectilinear (a TPS dose whose
GridFrameOffsetVector is not evenly spaced); an engine grid is regular (``Grid.regular``) and keeps
the step it was made with, also along an axis of one voxel (a depth-dose column's width). Only a
regular grid is written to JSON (``inputs.json``, format 2: origin and spacing z first; format 1,
written before the one axis order, listed them x first and is still read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

JSON_AXES = "zyx"  # marks a grid written in the one axis order; without it origin and spacing are (x, y, z)


@dataclass(frozen=True, eq=False)
class Grid:
    """Voxel centres along z, y and x (mm, increasing), and the step of each axis (dz, dy, dx)."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    # (dz, dy, dx): given for a regular grid, else the mean step of each axis (0 along a single voxel)
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        for name in ("z", "y", "x"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if self.spacing == (0.0, 0.0, 0.0):
            dz, dy, dx = (float(np.mean(np.diff(a))) if len(a) > 1 else 0.0 for a in self.axes)
            object.__setattr__(self, "spacing", (dz, dy, dx))

    @classmethod
    def regular(cls, shape: Sequence[int], origin: Sequence[float], spacing: Sequence[float]) -> Grid:
        """A regular grid from (nz, ny, nx), the (z0, y0, x0) of voxel [0, 0, 0] and (dz, dy, dx)."""
        z, y, x = (float(o) + float(d) * np.arange(int(n)) for n, o, d in zip(shape, origin, spacing, strict=True))
        dz, dy, dx = (float(d) for d in spacing)
        return cls(z=z, y=y, x=x, spacing=(dz, dy, dx))

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.z, self.y, self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    @property
    def origin(self) -> tuple[float, float, float]:
        return (float(self.z[0]), float(self.y[0]), float(self.x[0]))

    @property
    def voxel_volume_cm3(self) -> float:
        dz, dy, dx = self.spacing
        return abs(dz * dy * dx) / 1000.0

    def bounds(self) -> list[tuple[float, float]]:
        """(first, last) voxel centre along z, y, x."""
        return [(float(a[0]), float(a[-1])) for a in self.axes]

    def extent(self) -> list[tuple[float, float]]:
        """(low, high) outer edge along z, y, x of a regular grid: half a step beyond the outer centres."""
        return [(float(a[0]) - d / 2.0, float(a[-1]) + d / 2.0) for a, d in zip(self.axes, self.spacing, strict=True)]

    def voxel_edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The voxel boundaries of a regular grid along z, y, x (one more than the centres), mm."""
        ez, ey, ex = (a[0] - d / 2.0 + d * np.arange(len(a) + 1) for a, d in zip(self.axes, self.spacing, strict=True))
        return (ez, ey, ex)

    def index_of(self, point_xyz: Sequence[float]) -> tuple[int, int, int]:
        """The [z, y, x] index of the voxel centre nearest a DICOM (x, y, z) point (clipped to the grid)."""
        x, y, z = point_xyz
        k, j, i = (int(np.argmin(np.abs(a - v))) for a, v in zip(self.axes, (z, y, x), strict=True))
        return (k, j, i)

    def describe(self) -> str:
        dz, dy, dx = self.spacing
        (z0, z1), (y0, y1), (x0, x1) = self.bounds()
        nz, ny, nx = self.shape
        return (f"{nx}x{ny}x{nz} voxels of {dx:.2f}x{dy:.2f}x{dz:.2f} mm, "
                f"x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f}, z {z0:.1f}..{z1:.1f} mm")

    def is_regular(self, tol_mm: float = 1e-6) -> bool:
        """Every voxel centre at origin + k * spacing along every axis."""
        return all(np.allclose(a, a[0] + d * np.arange(len(a)), rtol=0.0, atol=tol_mm)
                   for a, d in zip(self.axes, self.spacing, strict=True))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Grid) and self.spacing == other.spacing
                and all(np.array_equal(a, b) for a, b in zip(self.axes, other.axes, strict=True)))

    __hash__ = None  # type: ignore[assignment]  # the axes are arrays

    def to_json(self) -> dict[str, Any]:
        """A regular grid as shape, origin and spacing, each (z, y, x); ValueError for a rectilinear one."""
        if not self.is_regular():
            raise ValueError(f"only a regular grid is written as shape, origin and spacing: {self.describe()}")
        return {"axes": JSON_AXES, "shape": list(self.shape), "origin": list(self.origin),
                "spacing": list(self.spacing)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Grid:
        s, o, d = (list(data[k]) for k in ("shape", "origin", "spacing"))
        if data.get("axes") != JSON_AXES:  # written before the one axis order: origin and spacing (x, y, z)
            o, d = o[::-1], d[::-1]
        return cls.regular(s, o, d)
