"""cffi builder for tripmine's C core (out-of-line API mode).

``setup.py`` names this module in ``cffi_modules``; it compiles every
``csrc/*.c`` file into the private extension ``tripmine._native``.  Flags:
``-O3 -Wall -Wextra`` (warnings are bugs), ``-ffp-contract=off`` (the
portable kernel rounds identically everywhere), ``-pthread`` for the core's own
thread pool (``TRIPMINE_THREADS=0`` builds it single-threaded), and no
host-specific ``-march`` flag: ISA-specific kernels enable their instruction
sets per file and are chosen at run time, so one build runs on any x86-64.
"""

from __future__ import annotations

import glob
import os
import sys

from cffi import FFI

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")


def _relative(path: str) -> str:
    """Paths relative to the working directory, as setuptools prefers."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


def _thread_flags() -> tuple[list[str], list[str]]:
    """(compile args, link args) for the C core's own thread pool (csrc/pool.c):
    POSIX threads, or a single-threaded build with ``TRIPMINE_THREADS=0`` (and on
    Windows, which has no pthreads)."""
    if os.environ.get("TRIPMINE_THREADS", "1") == "0" or sys.platform == "win32":
        return ["-DTM_NO_THREADS"] if sys.platform != "win32" else ["/DTM_NO_THREADS"], []
    return ["-pthread"], ["-pthread"]


def _compile_args() -> list[str]:
    if sys.platform == "win32":
        return ["/O2", "/W3"]
    # -fno-math-errno lets sqrt vectorise; it changes no result, only errno.
    return ["-O3", "-Wall", "-Wextra", "-ffp-contract=off", "-fno-math-errno",
            "-fvisibility=hidden"]


def _sanitizer_flags() -> tuple[list[str], list[str]]:
    """TRIPMINE_SANITIZE=address,undefined (any -fsanitize list) builds a checked
    extension: (compile args, link args).  Run Python with the sanitizer runtime
    preloaded (README, "Reliability"); never for release builds."""
    wanted = os.environ.get("TRIPMINE_SANITIZE", "").strip()
    if not wanted:
        return [], []
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    if not names or not all(n.replace("-", "").isalnum() for n in names):
        raise ValueError(f"TRIPMINE_SANITIZE={wanted!r}: expected a comma-separated list "
                         f"such as 'address,undefined'")
    joined = ",".join(names)
    compile_args = [f"-fsanitize={joined}", "-fno-omit-frame-pointer", "-g",
                    f'-DTM_SANITIZE="{joined}"']
    if "undefined" in names:
        compile_args.append("-fno-sanitize-recover=undefined")  # UB aborts: tests fail
    return compile_args, [f"-fsanitize={joined}"]


ffibuilder = FFI()
with open(os.path.join(_CSRC, "tripmine_cdef.h")) as _fh:
    ffibuilder.cdef(_fh.read())

_thr_compile, _thr_link = _thread_flags()
_san_compile, _san_link = _sanitizer_flags()
ffibuilder.set_source(
    "tripmine._native",
    '#include "tripmine.h"\n',
    sources=sorted(_relative(p) for p in glob.glob(os.path.join(_CSRC, "*.c"))),
    include_dirs=[_relative(_CSRC)],
    depends=sorted(_relative(p) for p in glob.glob(os.path.join(_CSRC, "*.h"))),
    extra_compile_args=_compile_args() + _thr_compile + _san_compile,
    extra_link_args=_thr_link + _san_link,
    libraries=[] if sys.platform == "win32" else ["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
