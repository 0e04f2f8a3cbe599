"""Can the engine compute what arrived? Asked by the assembler, so a plan that can never be computed
is REJECTED the moment it arrives (not after the CT timeout), and a CT that cannot be used is
REJECTED when it is assembled, each with the reason.

The checks read headers only (no pixel data) and ask the engine (``Engine.check_plan`` with the
configured beam models, ``Engine.check_ct``). Anything unreadable is a rejection with its reason,
never an internal error.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cloud.engines import engine_name_for, get_engine
from cloud.errors import EngineError, UnsupportedPlan
from dicom_node.settings import EngineSettings


class InputCheck:
    def __init__(self, engine: EngineSettings, returns_to: Callable[[str], object | None] | None = None) -> None:
        """`returns_to(calling_ae)`: where a dose for that sender would go (None: nowhere); leave it
        out when the node does not return doses (it only receives and assembles)."""
        self.settings = engine
        self.engine = get_engine(engine.name)
        self.returns_to = returns_to

    def sender(self, calling_ae: str | None) -> None:
        """UnsupportedPlan if a dose for this sender could never be returned: no `[[destinations]]`
        entry for its calling AE title. Refused on arrival, not after the whole computation."""
        if self.returns_to is not None and self.returns_to(calling_ae or "") is None:
            raise UnsupportedPlan(f"no [[destinations]] entry for calling AE title {calling_ae!r}: "
                                  "the dose could not be returned to the sender")

    def plan(self, path: str) -> tuple[str, ...]:
        """The warnings a dose would carry; UnsupportedPlan with the reason if it can never be computed."""
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise UnsupportedPlan(f"plan cannot be read: {exc}") from exc
        try:
            # photon RT Plans are checked by the photon engine, ion plans by the configured one
            engine = get_engine(engine_name_for(ds, self.settings.name))
            return engine.check_plan(ds, beam_models=self.settings.beam_models)
        except UnsupportedPlan:
            raise
        except EngineError as exc:  # e.g. a beam model file that cannot be parsed
            raise UnsupportedPlan(f"plan cannot be checked: {exc}") from exc

    def ct(self, paths: list[str]) -> None:
        """UnsupportedPlan with the reason if the engine cannot compute on this CT series (tilt, gaps)."""
        try:
            headers: list[Dataset] = [dcmread(p, stop_before_pixels=True) for p in paths]
            self.engine.check_ct(headers)
        except UnsupportedPlan:
            raise
        except (InvalidDicomError, OSError, AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise UnsupportedPlan(f"CT cannot be used: {type(exc).__name__}: {exc}") from exc
