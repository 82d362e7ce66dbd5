"""Build script: everything but the cffi extension is declared in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["tripmine/_build.py:ffibuilder"])
