"""cffi builder for tripmine's C core (out-of-line API mode).

``setup.py`` names this module in ``cffi_modules``; it compiles every
``csrc/*.c`` file into the private extension ``tripmine._native``.  Flags:
``-O3 -Wall -Wextra`` (warnings are bugs), ``-ffp-contract=off`` (the
portable kernel rounds identically everywhere), OpenMP when the compiler
accepts ``-fopenmp`` (``TRIPMINE_OPENMP=0`` turns it off), and no
host-specific ``-march`` flag: ISA-specific kernels enable their instruction
sets per file and are chosen at run time, so one build runs on any x86-64.
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

from cffi import FFI

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")


def _relative(path: str) -> str:
    """Paths relative to the working directory, as setuptools prefers."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


def _compiler_command() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile args, link args) for OpenMP, or empty lists if unavailable."""
    if os.environ.get("TRIPMINE_OPENMP", "1") == "0" or sys.platform == "win32":
        return [], []
    source = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_check.c")
        with open(src, "w") as fh:
            fh.write(source)
        cmd = _compiler_command() + ["-fopenmp", src, "-o", os.path.join(tmp, "omp_check")]
        try:
            ok = subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            ok = False
    return (["-fopenmp"], ["-fopenmp"]) if ok else ([], [])


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

_omp_compile, _omp_link = _openmp_flags()
_san_compile, _san_link = _sanitizer_flags()
ffibuilder.set_source(
    "tripmine._native",
    '#include "tripmine.h"\n',
    sources=sorted(_relative(p) for p in glob.glob(os.path.join(_CSRC, "*.c"))),
    include_dirs=[_relative(_CSRC)],
    depends=sorted(_relative(p) for p in glob.glob(os.path.join(_CSRC, "*.h"))),
    extra_compile_args=_compile_args() + _omp_compile + _san_compile,
    extra_link_args=_omp_link + _san_link,
    libraries=[] if sys.platform == "win32" else ["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
