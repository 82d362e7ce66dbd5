"""The C sources compile warning-free with and without the thread pool, and the
build never uses -march=native."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))


def _compiler():
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        pytest.skip(f"no C compiler ({cc[0]}) on this machine")
    return cc


@pytest.mark.parametrize("threads", [True, False], ids=["threads", "no-threads"])
def test_sources_compile_without_warnings(tmp_path, threads):
    cc = _compiler()
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-ffp-contract=off",
             f"-I{CSRC}", "-c"]
    flags.append("-pthread" if threads else "-DTM_NO_THREADS")
    for source in SOURCES:
        result = subprocess.run(cc + flags + [str(source), "-o", str(tmp_path / "out.o")],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{source.name}:\n{result.stderr}"


def test_no_march_native_anywhere():
    for path in [ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / "tripmine" / "_build.py",
                 *(p for p in CSRC.rglob("*") if p.is_file())]:
        assert "-march=native" not in path.read_text(), path


def test_cdef_declares_every_public_function():
    header = (CSRC / "tripmine.h").read_text()
    cdef = (CSRC / "tripmine_cdef.h").read_text()
    import re

    public = set(re.findall(r"TM_PUBLIC\s+[\w\s\*]+?\b(tm_\w+)\s*\(", header))
    declared = set(re.findall(r"\b(tm_\w+)\s*\(", cdef))
    assert public and public == declared
