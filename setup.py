"""Build script for the optional Cython core ``pipedream._core``.

Project metadata lives in pyproject.toml; this file only declares the
extension module.

* ``PIPEDREAM_NO_EXTENSIONS=1`` -> build no extension (pure-Python install;
  the package falls back at import time).
* Otherwise the extension is mandatory: a Cython or C compiler failure makes
  the install fail (no silent skip).
"""
import os

from setuptools import Extension, setup


def _extensions():
    if os.environ.get("PIPEDREAM_NO_EXTENSIONS") == "1":
        return []

    from Cython.Build import cythonize

    ext = Extension(
        "pipedream._core",
        sources=["src/pipedream/_core.pyx"],
        extra_compile_args=["-O3"],
    )
    return cythonize(
        [ext],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "freethreading_compatible": True,
        },
    )


setup(ext_modules=_extensions())
