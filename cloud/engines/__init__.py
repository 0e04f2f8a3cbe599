"""Monte Carlo engines behind one small abstract class, looked up by name.

``get_engine("mcsquare")`` returns the MCsquare adapter (proton PBS), ``get_engine("ompmc")`` the
ompMC adapter (photons and electrons; its GPL-3.0 library is imported only when it runs). A further
engine registers itself with ``register_engine`` and needs no change elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

from cloud.engines.base import Engine, ShardInputs, Tally
from cloud.errors import EngineError

_FACTORIES: dict[str, Callable[[], Engine]] = {}


def register_engine(name: str, factory: Callable[[], Engine]) -> None:
    _FACTORIES[name] = factory


def engine_names() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def get_engine(name: str) -> Engine:
    """A fresh engine instance by name; EngineError names the known engines otherwise."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r} (known: {', '.join(engine_names())})") from None
    return factory()


PHOTON_ENGINE = "ompmc"


def engine_name_for(plan: object, configured: str) -> str:
    """The engine for a plan: RT Plans (photon beams) go to the photon engine, RT Ion Plans to the configured one.

    ``plan`` is a pydicom Dataset (only membership of ``BeamSequence`` / ``IonBeamSequence`` is asked).
    """
    if "BeamSequence" in plan and "IonBeamSequence" not in plan:  # type: ignore[operator]
        return PHOTON_ENGINE
    return configured


def _mcsquare() -> Engine:
    from cloud.engines.mcsquare.adapter import MCsquareEngine

    return MCsquareEngine()


def _ompmc() -> Engine:
    # ompmc (GPL-3.0, optional extra "photon") is imported by the adapter only when a shard runs
    from cloud.engines.ompmc.adapter import OmpmcEngine

    return OmpmcEngine()


register_engine("mcsquare", _mcsquare)
register_engine("ompmc", _ompmc)

__all__ = ["Engine", "ShardInputs", "Tally", "get_engine", "register_engine", "engine_names", "engine_name_for"]
