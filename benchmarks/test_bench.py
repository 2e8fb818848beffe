"""pytest-benchmark suite: a few representative workloads of ``pipedream bench``.

Run with ``python -m pytest benchmarks`` (not part of ``make test``). The
workload functions are the runner's own (``pipedream.bench``), so both measure
the same thing; each group holds pipedream on both cores and its baseline,
for ``--benchmark-group-by=group`` comparisons. The side-by-side table with
ratios and targets is ``python -m pipedream bench``.
"""

import asyncio
import importlib

import pytest

from pipedream import _backend, bench

CORE_MODULES = {"cython": "pipedream._core", "python": "pipedream._core_py"}


@pytest.fixture(params=sorted(CORE_MODULES))
def core(request, monkeypatch):
    """Relays built during the test use this core."""
    try:
        module = importlib.import_module(CORE_MODULES[request.param])
    except ImportError as exc:
        pytest.skip("the %s core is not importable (%s)" % (request.param, exc))
    monkeypatch.setattr(_backend, "core", module)
    return request.param


def measure(benchmark, fn, values, **params):
    """Benchmark one whole workload run; return its ``(deliveries, drops)``.

    A feature that is not built yet (missing module, NotImplementedError)
    skips the test; any other failure fails it.
    """
    def once():
        return asyncio.run(fn(values, **params))
    try:
        once()      # also the warm-up
    except (ImportError, NotImplementedError) as exc:
        pytest.skip("unavailable: %s: %s" % (type(exc).__name__, exc))
    return benchmark.pedantic(once, rounds=5, iterations=1)


N = 20_000


@pytest.mark.benchmark(group="W1 K=8 fan-out, async for")
def test_w1_relay(benchmark, core):
    deliveries, drops = measure(benchmark, bench.w1_relay, bench.ints(N), k=8)
    assert (deliveries, drops) == (8 * N, 0)


@pytest.mark.benchmark(group="W1 K=8 fan-out, async for")
def test_w1_asyncio_queues(benchmark):
    assert measure(benchmark, bench.w1_queues, bench.ints(N), k=8) == (8 * N, 0)


@pytest.mark.benchmark(group="W1b K=8 fan-out, recv_many")
def test_w1b_relay(benchmark, core):
    deliveries, drops = measure(benchmark, bench.w1b_relay, bench.ints(N), k=8)
    assert (deliveries, drops) == (8 * N, 0)


@pytest.mark.benchmark(group="W1b K=8 fan-out, recv_many")
def test_w1b_asyncio_queues(benchmark):
    assert measure(benchmark, bench.w1b_queues, bench.ints(N), k=8) == (8 * N, 0)


@pytest.mark.benchmark(group="W2 round trip, tracked sink")
def test_w2_relay(benchmark, core):
    deliveries, drops = measure(benchmark, bench.w2_relay, bench.ints(N // 2))
    assert (deliveries, drops) == (N // 2, 0)


@pytest.mark.benchmark(group="W2 round trip, tracked sink")
def test_w2_asyncio_queue_future(benchmark):
    assert measure(benchmark, bench.w2_queue, bench.ints(N // 2)) == (N // 2, 0)


@pytest.mark.benchmark(group="W5 4 producer threads")
def test_w5_relay(benchmark, core):
    deliveries, drops = measure(benchmark, bench.w5_relay, bench.ints(N))
    assert deliveries + drops == N


@pytest.mark.benchmark(group="W5 4 producer threads")
def test_w5_queue_queue(benchmark):
    assert measure(benchmark, bench.w5_queue_thread, bench.ints(N)) == (N, 0)


@pytest.mark.benchmark(group="C1 core only, 8 readers")
def test_c1_core(benchmark, core):
    deliveries, drops = measure(benchmark, bench.c1_core, bench.ints(N), k=8)
    assert (deliveries, drops) == (8 * N, 0)
