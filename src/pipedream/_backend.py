"""Chooses the core: the Cython extension, or its pure-Python twin.

``PIPEDREAM_CORE=python`` forces the twin; ``PIPEDREAM_CORE=cython`` insists on
the extension (ImportError if it is missing). Unset: the extension if it
imports, otherwise the twin with a ``RuntimeWarning`` saying why.

The rest of the package reads ``core`` from here when it creates a ring, so
tests can swap it (see tests/conftest.py).
"""

import importlib.util
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
    if importlib.util.find_spec(__package__ + "._core") is None:
        reason = ("the extension pipedream._core is not built (installed with "
                  "PIPEDREAM_NO_EXTENSIONS=1, or from a source tree never compiled)")
        error = None
    else:
        try:
            from . import _core
            return _core, "cython"
        except ImportError as exc:
            reason = "the extension pipedream._core failed to import: %s" % exc
            error = exc
    if wanted == "cython":
        raise ImportError("PIPEDREAM_CORE=cython, but " + reason) from error
    warnings.warn("pipedream: %s; using the pure-Python core, which is several "
                  "times slower" % reason, RuntimeWarning, stacklevel=2)
    from . import _core_py
    return _core_py, "python"


core, core_name = _load()
