"""Thread control and build facts of the C core."""

from __future__ import annotations

from typing import Any

from . import _core
from . import _validation as check

__all__ = ["set_num_threads", "get_num_threads", "build_info"]


def set_num_threads(n: int | None) -> None:
    """Set the number of threads every C call uses (``None``: the default).

    The default is OpenMP's (``OMP_NUM_THREADS`` or the core count); the
    ``TRIPMINE_NUM_THREADS`` environment variable, read at import, overrides it.
    Results never depend on the thread count.
    """
    _core.set_num_threads(0 if n is None else check.positive_int(n, "n"))


def get_num_threads() -> int:
    """The number of threads the next C call will use (1 without OpenMP)."""
    return _core.get_num_threads()


def build_info() -> dict[str, Any]:
    """Facts about this build: version, compiler, OpenMP, sanitizers (``""`` unless built
    with ``TRIPMINE_SANITIZE``), instruction sets, threads."""
    facts = _core.build_facts()
    facts.update(
        isa=_core.get_isa(),
        isas_usable=_core.usable_isas(),
        isas_compiled=_core.compiled_isas(),
        num_threads=_core.get_num_threads(),
    )
    return facts
