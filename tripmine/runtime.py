"""Thread control and build facts of the C core.

The C core runs on its own thread pool (``csrc/pool.c``), made to share the CPU with the
caller's BLAS or PyTorch threads: the calling thread takes part in every parallel region
and never waits for a worker that has not started work, and idle workers spin for at most
50 microseconds (``TRIPMINE_SPIN_US``) before they sleep.  ``threadpoolctl`` lists the
pool (``user_api="tripmine"``) and ``threadpool_limits`` limits it, when threadpoolctl is
installed.
"""

from __future__ import annotations

import ctypes
import importlib.util
from typing import Any

from . import _core
from . import _validation as check

__all__ = ["set_num_threads", "get_num_threads", "build_info"]


def set_num_threads(n: int | None) -> None:
    """Set the number of threads every C call uses (``None``: the default).

    The default is ``OMP_NUM_THREADS`` when set, else the CPUs this process may run on;
    the ``TRIPMINE_NUM_THREADS`` environment variable, read at import, overrides it.  At
    most 256.  Results never depend on the thread count, except the last bits of the
    reference gradients that README's "Threads" names.
    """
    _core.set_num_threads(0 if n is None else check.positive_int(n, "n"))


def get_num_threads() -> int:
    """The number of threads the next C call will use (1 in a single-threaded build)."""
    return _core.get_num_threads()


def build_info() -> dict[str, Any]:
    """Facts about this build: version, compiler, parallel runtime (``runtime``,
    ``threaded``), sanitizers (``""`` unless built with ``TRIPMINE_SANITIZE``),
    instruction sets, threads."""
    facts = _core.build_facts()
    facts.update(
        isa=_core.get_isa(),
        isas_usable=_core.usable_isas(),
        isas_compiled=_core.compiled_isas(),
        num_threads=_core.get_num_threads(),
    )
    return facts


def _register_with_threadpoolctl() -> None:
    """Teach threadpoolctl (3.5 or later, when installed) to find the C core's pool, so
    that ``threadpool_info()`` lists it and ``threadpool_limits`` limits it together with
    BLAS and OpenMP pools."""
    if importlib.util.find_spec("threadpoolctl") is None:
        return
    import threadpoolctl

    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return

    class TripmineController(threadpoolctl.LibController):
        """threadpoolctl's handle on tripmine's thread pool (the ``_native`` extension)."""

        user_api = "tripmine"
        internal_api = "tripmine"
        filename_prefixes = ("_native",)
        check_symbols = ("tm_get_num_threads", "tm_set_num_threads", "tm_runtime")

        # threadpoolctl builds a controller for every loaded library whose name starts
        # with "_native" (other packages have such modules too) and only then checks
        # check_symbols: these methods must not fail on a library that is not ours.
        def _string(self, name):
            function = getattr(self.dynlib, name, None)
            if function is None:
                return None
            function.restype = ctypes.c_char_p
            return function().decode()

        def get_num_threads(self):
            return self.dynlib.tm_get_num_threads()

        def set_num_threads(self, num_threads):
            self.dynlib.tm_set_num_threads(int(num_threads))

        def get_version(self):
            return self._string("tm_version")

        def set_additional_attributes(self):
            self.runtime = self._string("tm_runtime")

    threadpoolctl.register(TripmineController)


_register_with_threadpoolctl()
