"""Chooses the core: the Cython extension, or its pure-Python twin.

``PIPEDREAM_CORE=python`` forces the twin; ``PIPEDREAM_CORE=cython`` insists on
the extension (ImportError if it is missing). Unset: the extension if it
imports, otherwise the twin with a ``RuntimeWarning`` saying why.

The rest of the package reads ``core`` from here when it creates a ring, so
tests can swap it (see tests/conftest.py).
"""

import os
import warnings

__all__ = ["core", "core_name"]


def _load():
    wanted = os.environ.get("PIPEDREAM_CORE", "").strip().lower()
    if wanted not in ("", "auto", "cython", "python"):
        raise ImportError("PIPEDREAM_CORE must be 'cython' or 'python', got %r" % wanted)
    if wanted == "python":
        from . import _core_py
        return _core_py, "python"
    try:
        from . import _core
    except ImportError as exc:
        if wanted == "cython":
            raise
        warnings.warn("pipedream: the Cython core could not be imported (%s); "
                      "using the pure-Python core, which is several times slower" % exc,
                      RuntimeWarning, stacklevel=3)
        from . import _core_py
        return _core_py, "python"
    return _core, "cython"


core, core_name = _load()
