"""Fixtures shared by the test suite.

Every core behaviour runs against both cores: ``core`` gives the core module
itself (for tests of the core interface), ``relay_core`` switches the core
that new relays are built on (for tests of the asyncio layer).
"""

import asyncio
import importlib

import pytest

from pipedream import _backend

CORES = ["cython", "python"]
_MODULES = {"cython": "pipedream._core", "python": "pipedream._core_py"}


def load_core(name):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        pytest.skip("the Cython core is not built (%s)" % exc)


@pytest.fixture(params=CORES)
def core(request):
    """The core module: pipedream._core (Cython) or pipedream._core_py."""
    return load_core(request.param)


@pytest.fixture(params=CORES)
def relay_core(request, monkeypatch):
    """Relays created during the test use this core ("cython" or "python")."""
    module = load_core(request.param)
    monkeypatch.setattr(_backend, "core", module)
    return request.param


def run(coro, timeout=10):
    """Run ``coro`` in a fresh event loop, failing (not hanging) after ``timeout`` s."""
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())
