"""Only here because cffi's setuptools hook (cffi_modules) has no pyproject.toml key."""
from setuptools import setup

setup(cffi_modules=["vhostd/_build_ffi.py:ffibuilder"])
