"""Build script: everything but the cffi extension is declared in pyproject.toml.

The CUDA sources live in csrc/cuda (next to the C core they mirror); the GPU
backend compiles them at run time, so build_py copies them into the package
(tripmine/_gpu/cuda) of every wheel.  An editable install reads csrc/cuda.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CUDA_SOURCES = Path(__file__).resolve().parent / "csrc" / "cuda"


class build_py_with_cuda(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "tripmine" / "_gpu" / "cuda"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(CUDA_SOURCES.glob("*.cu*")):
            self.copy_file(str(source), str(target / source.name))


setup(cffi_modules=["tripmine/_build.py:ffibuilder"], cmdclass={"build_py": build_py_with_cuda})
