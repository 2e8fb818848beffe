"""``python -m pipedream bench``: pipedream side by side with stdlib baselines.

One process, one run: every workload is measured on pipedream with the Cython
core, on pipedream with the pure-Python core, and on a stdlib baseline that
does the same job; ratios are computed from figures taken in that same run.

Each workload function does the whole job (build, send, consume, close) and
returns ``(deliveries, drops)``. Both sides of a comparison have the same
shape: the sender sends in bursts of ``BURST`` messages with an
``await asyncio.sleep(0)`` between bursts (well below any capacity used here,
so no message is dropped; drops are reported anyway), and consumers run until
the relay closes or a sentinel arrives. The values are allocated before the
clock starts.

Each system runs once as a warm-up, then ``--repeat`` times, round-robin
with the other systems of the workload; its best time counts. A system whose
feature is missing or raises is reported as "unavailable: <reason>" and the
run goes on. Targets come from the product contract (the design document, section 5); a missed target is
reported, never an error.

Plain Python on purpose: ``make bench`` needs nothing beyond the package.
"""

import argparse
import asyncio
import gc
import importlib
import json
import os
import platform
import queue
import sys
import threading
import time
import tracemalloc

from . import _backend
from .channel import Relay
from .errors import RelayClosed

__all__ = ["main", "WORKLOADS", "Workload", "System", "measure_workload"]

BURST = 256         # messages sent between two yields to the loop
BATCH = 256         # recv_many size, and the drain limit of its baselines
PRODUCERS = 4       # threads in W5
STOP = object()     # end-of-stream sentinel for the queue baselines
RUN_TIMEOUT = 60.0  # seconds; a case that takes longer is reported unavailable


# -- shared pieces -------------------------------------------------------------

async def send_bursts(send, values):
    """Call ``send(v)`` for each value, yielding to the loop after every burst."""
    for start in range(0, len(values), BURST):
        for v in values[start:start + BURST]:
            send(v)
        await asyncio.sleep(0)


async def count_each(sub):
    """Per-message consumer: ``async for`` until the relay closes."""
    count = 0
    async for _ in sub:
        count += 1
    return count


async def count_batches(sub):
    """Batch consumer: ``recv_many`` until the relay closes."""
    count = 0
    try:
        while True:
            count += len(await sub.recv_many(BATCH))
    except RelayClosed:
        return count


async def queue_count_each(q):
    """Per-message consumer of an asyncio.Queue, until STOP."""
    count = 0
    while (await q.get()) is not STOP:
        count += 1
    return count


async def queue_get_batch(q):
    """One ``await get()`` then ``get_nowait()`` up to BATCH items: recv_many's twin."""
    batch = [await q.get()]
    while len(batch) < BATCH:
        try:
            batch.append(q.get_nowait())
        except asyncio.QueueEmpty:
            break
    return batch


async def queue_count_batches(q):
    count = 0
    while True:
        batch = await queue_get_batch(q)
        if batch[-1] is STOP:       # STOP is the last item ever put
            return count + len(batch) - 1
        count += len(batch)


def is_even(v):
    return v % 2 == 0


def plus_one(v):
    return v + 1


class Calls:
    """The handler of W2 (same function on both sides): counts its calls."""

    __slots__ = ("count",)

    def __init__(self):
        self.count = 0

    def handle(self, value):
        self.count += 1


def ints(n):
    return list(range(n))


def ints_and_strs(n):
    # Even positions int, odd positions str: half of the messages are strs.
    return [i if i % 2 == 0 else str(i) for i in range(n)]


def start_producers(send, values):
    """PRODUCERS threads, each calling ``send`` on its share of ``values``."""
    def produce(share):
        for v in share:
            send(v)
    threads = [threading.Thread(target=produce, args=(values[i::PRODUCERS],))
               for i in range(PRODUCERS)]
    for t in threads:
        t.start()
    return threads


def join_all(threads):
    for t in threads:
        t.join()


# -- W1 / W1b: fan-out; per-message async for / recv_many ----------------------

async def fan_out_relay(values, k, consume, mode="observable"):
    """One relay, ``k`` subscribers each running ``consume``; the sender bursts."""
    tx, rx = Relay.channel(mode=mode)
    subs = [rx.subscribe(int) for _ in range(k)]
    tasks = [asyncio.create_task(consume(s)) for s in subs]
    await send_bursts(tx.send_nowait, values)
    tx.close()
    counts = await asyncio.gather(*tasks)
    return sum(counts), sum(s.dropped for s in subs)


async def fan_out_queues(values, k, consume):
    """``k`` asyncio.Queues each drained by ``consume``; the sender bursts."""
    queues = [asyncio.Queue() for _ in range(k)]
    tasks = [asyncio.create_task(consume(q)) for q in queues]

    def put_all(v):
        for q in queues:
            q.put_nowait(v)

    await send_bursts(put_all, values)
    put_all(STOP)
    counts = await asyncio.gather(*tasks)
    return sum(counts), 0


async def w1_relay(values, k, mode="observable"):
    return await fan_out_relay(values, k, count_each, mode)


async def w1_queues(values, k):
    return await fan_out_queues(values, k, queue_count_each)


async def w1b_relay(values, k):
    return await fan_out_relay(values, k, count_batches)


async def w1b_queues(values, k):
    return await fan_out_queues(values, k, queue_count_batches)


# -- W2: round trip through one tracked sync sink --------------------------------

async def w2_relay(values):
    tx, rx = Relay.channel()
    calls = Calls()
    rx.sink(int, calls.handle)
    send = tx.send
    for v in values:
        await send(v)
    tx.close()
    return calls.count, tx.dropped


async def w2_queue(values):
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()
    calls = Calls()

    async def consume():
        while True:
            item = await q.get()
            if item is STOP:
                return
            value, fut = item
            try:
                calls.handle(value)
            except Exception as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(None)

    task = asyncio.create_task(consume())
    for v in values:
        fut = loop.create_future()
        q.put_nowait((v, fut))
        await fut
    q.put_nowait(STOP)
    await task
    return calls.count, 0


# -- W3: int and str interleaved, one str subscriber ----------------------------

async def w3_relay(values):
    tx, rx = Relay.channel()
    sub = rx.subscribe(str)
    task = asyncio.create_task(count_each(sub))
    await send_bursts(tx.send_nowait, values)
    tx.close()
    return await task, sub.dropped


async def w3_queue(values):
    q = asyncio.Queue()
    task = asyncio.create_task(queue_count_each(q))

    def put_str(v):
        if isinstance(v, str):
            q.put_nowait(v)

    await send_bursts(put_str, values)
    q.put_nowait(STOP)
    return await task, 0


# -- W4: filter -> map -> subscriber ---------------------------------------------

async def w4_relay(values):
    tx, rx = Relay.channel()
    out = rx.filter(int, is_even).map(int, plus_one)
    sub = out.subscribe(int)
    task = asyncio.create_task(count_each(sub))
    await send_bursts(tx.send_nowait, values)
    tx.close()
    count = await task
    return count, sub.dropped + tx.dropped


async def w4_queues(values):
    q_in, q_mid, q_out = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()

    async def filter_stage():
        while True:
            v = await q_in.get()
            if v is STOP:
                q_mid.put_nowait(STOP)
                return
            if is_even(v):
                q_mid.put_nowait(v)

    async def map_stage():
        while True:
            v = await q_mid.get()
            if v is STOP:
                q_out.put_nowait(STOP)
                return
            q_out.put_nowait(plus_one(v))

    stages = [asyncio.create_task(filter_stage()), asyncio.create_task(map_stage())]
    task = asyncio.create_task(queue_count_each(q_out))
    await send_bursts(q_in.put_nowait, values)
    q_in.put_nowait(STOP)
    count = await task
    await asyncio.gather(*stages)
    return count, 0


# -- W5: 4 producer threads, one consumer ----------------------------------------
# The consumer stops after len(values) items on every side. The relay gets a
# capacity of at least len(values) so that, like the unbounded queues, it
# cannot drop (drops are still counted and reported).

async def w5_relay(values):
    n = len(values)
    tx, rx = Relay.channel(max(65536, n))
    sub = rx.subscribe(int)
    threads = start_producers(tx.send_nowait, values)
    count = 0
    while count + sub.dropped < n:
        count += len(await sub.recv_many(BATCH))
    join_all(threads)
    tx.close()
    return count, sub.dropped


async def w5_queue_thread(values):
    # All threads: the event loop only starts them and waits (blocking is fine,
    # nothing else runs on it).
    n = len(values)
    q = queue.Queue()
    got = []

    def consume():
        get = q.get
        for _ in range(n):
            get()
        got.append(n)

    consumer = threading.Thread(target=consume)
    consumer.start()
    join_all(start_producers(q.put, values))
    consumer.join()
    return sum(got), 0


async def w5_call_soon(values):
    n = len(values)
    loop = asyncio.get_running_loop()
    q = asyncio.Queue()
    put = q.put_nowait

    def send(v):
        loop.call_soon_threadsafe(put, v)

    threads = start_producers(send, values)
    count = 0
    while count < n:
        count += len(await queue_get_batch(q))
    join_all(threads)
    return count, 0


# -- C1: the core alone (W1b's core operations, no asyncio) -----------------------

async def c1_core(values, k):
    core = _backend.core
    ring = core.Ring(65536, False, 1, None)
    readers = [ring.reader(int, False) for _ in range(k)]
    write, empty = ring.write, core.EMPTY
    count = 0
    for start in range(0, len(values), BURST):
        for v in values[start:start + BURST]:
            write(v, 0, None)
        for r in readers:
            got = r.pop_many(BATCH)
            while got is not empty:
                count += len(got)
                got = r.pop_many(BATCH)
    ring.close()
    return count, sum(r.dropped for r in readers)


# -- the registry ------------------------------------------------------------------

CORES = ("cython", "python")
CORE_MODULES = {"cython": "pipedream._core", "python": "pipedream._core_py"}


class System:
    """One way of doing a workload: pipedream on a core, or a stdlib baseline."""

    def __init__(self, name, fn, core=None, **params):
        self.name = name
        self.fn = fn
        self.core = core        # "cython", "python", or None for a baseline
        self.params = params


def on_both_cores(fn, suffix="", **params):
    return [System(core + suffix, fn, core, **params) for core in CORES]


class Workload:
    """One group of table rows: the same job done by each of ``systems``.

    ``n`` messages are sent (``values(n)`` makes them, before the clock
    starts); ``params`` go to every system; ratios divide by ``baseline``.
    """

    def __init__(self, name, group, n, text, systems, baseline, values=ints, **params):
        self.name = name
        self.group = group
        self.n = n
        self.text = text
        self.systems = systems
        self.baseline = baseline
        self.values = values
        self.params = params


def _workloads():
    out = []
    for k, n in ((1, 100_000), (8, 30_000), (64, 4_000)):
        systems = on_both_cores(w1_relay)
        if k == 8:      # reliable mode's cost, measured against the same baseline
            systems += on_both_cores(w1_relay, " reliable", mode="reliable")
        out.append(Workload(
            "W1 K=%d" % k, "W1", n, "fan-out to %d subscriber(s), async for" % k,
            systems + [System("asyncio.Queue", w1_queues)], "asyncio.Queue", k=k))
    for k, n in ((1, 200_000), (8, 60_000), (64, 8_000)):
        out.append(Workload(
            "W1b K=%d" % k, "W1b", n, "fan-out to %d subscriber(s), recv_many" % k,
            on_both_cores(w1b_relay) + [System("asyncio.Queue", w1b_queues)],
            "asyncio.Queue", k=k))
    out += [
        Workload("W2", "W2", 20_000, "await send() round trip, one tracked sync sink",
                 on_both_cores(w2_relay) + [System("asyncio.Queue+Future", w2_queue)],
                 "asyncio.Queue+Future"),
        Workload("W3", "W3", 100_000, "int and str interleaved, one str subscriber",
                 on_both_cores(w3_relay) + [System("asyncio.Queue", w3_queue)],
                 "asyncio.Queue", values=ints_and_strs),
        Workload("W4", "W4", 50_000, "filter(int) -> map(int) -> subscriber",
                 on_both_cores(w4_relay) + [System("asyncio.Queue x3", w4_queues)],
                 "asyncio.Queue x3"),
        Workload("W5", "W5", 80_000, "%d threads send_nowait, one consumer" % PRODUCERS,
                 on_both_cores(w5_relay) + [System("queue.Queue", w5_queue_thread),
                                            System("call_soon_threadsafe", w5_call_soon)],
                 "queue.Queue"),
        Workload("C1 K=8", "C1", 60_000, "core only: write + pop_many, 8 readers",
                 on_both_cores(c1_core), "python", k=8),
    ]
    return out


WORKLOADS = _workloads()
MEMORY_GROUP = "MEM"


# -- running -------------------------------------------------------------------------

def load_cores():
    """``({name: module}, {name: reason it is unavailable})``."""
    cores, missing = {}, {}
    for name in CORES:
        try:
            cores[name] = importlib.import_module(CORE_MODULES[name])
        except ImportError as exc:
            missing[name] = "%s: %s" % (type(exc).__name__, exc)
    return cores, missing


class use_core:
    """Relays created inside the block are built on ``module`` (None: unchanged)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.saved = _backend.core
        if self.module is not None:
            _backend.core = self.module

    def __exit__(self, *exc_info):
        _backend.core = self.saved


def run_once(fn, values, params, core=None):
    """Run one workload in a fresh loop; return ``(seconds, deliveries, drops)``.

    Raises what the workload raises, or ``asyncio.TimeoutError``.
    """
    async def timed():
        start = time.perf_counter()
        deliveries, drops = await fn(values, **params)
        return time.perf_counter() - start, deliveries, drops

    async def guarded():
        return await asyncio.wait_for(timed(), RUN_TIMEOUT)

    gc.collect()
    with use_core(core):
        return asyncio.run(guarded())


def _why(exc):
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out after %.0f s" % RUN_TIMEOUT
    return "%s: %s" % (type(exc).__name__, exc)


def _figures(n, runs):
    seconds, deliveries, drops = min(runs)      # the best run
    return {"n": n, "seconds": seconds, "msgs_per_s": n / seconds,
            "deliveries": deliveries, "deliveries_per_s": deliveries / seconds,
            "drops": drops, "runs_s": [run[0] for run in runs]}


def measure_workload(w, n, repeat, cores, missing, report_progress=lambda text: None):
    """Figures per system of ``w``: ``{system: figures or {"unavailable": why}}``.

    Every system is warmed up, then the repeats go round-robin over the
    systems, so a load spike on the machine hits them all alike. A system
    that raises is reported unavailable; the others go on.
    """
    warm_values, values = w.values(max(n // 5, 1)), w.values(n)
    results, runs, live = {}, {}, []
    report_progress("warm-up,")
    for s in w.systems:
        if s.core in missing:
            results[s.name] = {"unavailable": "%s core unavailable" % s.core}
            continue
        try:
            run_once(s.fn, warm_values, dict(w.params, **s.params), cores.get(s.core))
        except Exception as exc:
            results[s.name] = {"unavailable": _why(exc)}
            continue
        live.append(s)
        runs[s.name] = []
    for round_ in range(repeat):
        report_progress("run %d/%d" % (round_ + 1, repeat))
        for s in list(live):
            try:
                runs[s.name].append(run_once(s.fn, values, dict(w.params, **s.params),
                                             cores.get(s.core)))
            except Exception as exc:
                results[s.name] = {"unavailable": _why(exc)}
                live.remove(s)
    for s in live:
        results[s.name] = _figures(n, runs[s.name])

    base = results.get(w.baseline, {}).get("msgs_per_s")
    for figures in results.values():
        if "msgs_per_s" in figures:
            figures["ratio"] = None if base is None else figures["msgs_per_s"] / base
    # Table order: the registry's.
    return {s.name: results[s.name] for s in w.systems}


def bytes_per_buffered_message(n):
    """Traced bytes per message with ``n`` preallocated objects buffered for
    one stalled subscriber (capacity ``n``: nothing is dropped)."""
    objects = [object() for _ in range(n)]
    tx, rx = Relay.channel(n)
    sub = rx.subscribe()
    tx.send_nowait(objects[0])      # first sight of the type, outside the figure
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        send = tx.send_nowait
        for obj in objects[1:]:
            send(obj)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if sub.pending != n:
        raise RuntimeError("%d of %d messages buffered: the figure would be wrong"
                           % (sub.pending, n))
    sub.close()
    tx.close()
    return (after - before) / (n - 1)


def idle_relay_bytes(capacity):
    """Traced bytes of a fresh relay (sender + receiver) with this capacity."""
    Relay.channel(capacity)         # warm-up: lazy imports and caches
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        relay = Relay.channel(capacity)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del relay
    return after - before


def measure_memory(core, n):
    try:
        with use_core(core):
            return {
                "bytes_per_buffered_message": bytes_per_buffered_message(n),
                "buffered_messages": n,
                "idle_relay_bytes": {"16": idle_relay_bytes(16),
                                     "65536": idle_relay_bytes(65536)},
            }
    except Exception as exc:
        return {"unavailable": _why(exc)}


class Progress:
    """``[step/total] what ... detail detail`` lines on stderr."""

    def __init__(self, total):
        self.total = total
        self.step = 0

    def start(self, what):
        self.step += 1
        self._write("[%d/%d] %s ..." % (self.step, self.total, what))

    def detail(self, text):
        self._write(" " + text)

    def end(self, text="done"):
        self._write(" " + text + "\n")

    @staticmethod
    def _write(text):
        sys.stderr.write(text)
        sys.stderr.flush()


def run_all(selected, with_memory, repeat, quick):
    """Measure everything; return the report dict (also what ``--json`` writes)."""
    load_before = _load_average()
    cores, missing = load_cores()
    progress = Progress(len(selected) + (len(CORES) if with_memory else 0))
    workloads = {}
    for w in selected:
        n = max(w.n // 50, 500) if quick else w.n
        progress.start("%s (n=%s)" % (w.name, _count(n)))
        systems = measure_workload(w, n, repeat, cores, missing, progress.detail)
        progress.end()
        baseline = w.baseline + " core" if w.baseline in CORES else w.baseline
        workloads[w.name] = {"text": w.text, "baseline": baseline, "systems": systems}

    memory = {}
    if with_memory:
        n = 2_000 if quick else 100_000
        for name in CORES:
            progress.start("memory %s core" % name)
            if name in missing:
                memory[name] = {"unavailable": "%s core unavailable" % name}
            else:
                memory[name] = measure_memory(cores[name], n)
            progress.end()

    report = {
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            # Other processes competing for the CPUs make every figure noisy.
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
        "python_version": platform.python_version(),
        "python": sys.version,
        "core": _backend.core_name,
        "cores_unavailable": missing,
        "settings": {"repeat": repeat, "quick": quick, "burst": BURST, "batch": BATCH},
        "workloads": workloads,
        "memory": memory,
    }
    report["targets"] = check_targets(report)
    return report


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):     # not on every platform
        return None


# -- targets (design document, section 5) ---------------------------------------------------

def _figure(report, workload, system, key="ratio"):
    return report["workloads"].get(workload, {}).get("systems", {}).get(system, {}).get(key)


def _target(label, goal, unit, measured, ok, note=None):
    return {"target": label, "goal": goal, "unit": unit, "measured": measured,
            "met": None if measured is None else bool(ok), "note": note}


def _ratio_target(report, label, workload, goal):
    """A ratio target, judged on the Cython core (the python core's figure as info)."""
    if workload not in report["workloads"]:
        return None
    measured = _figure(report, workload, "cython")
    note = None
    if measured is None:
        note = report["workloads"][workload]["systems"]["cython"].get(
            "unavailable", "no baseline figure")
    target = _target(label, goal, "x", measured, measured is not None and measured >= goal,
                     note)
    target["python_core"] = _figure(report, workload, "python")
    return target


def check_targets(report):
    """The design document's targets, each with its measured figure and met / not met / None."""
    targets = [
        _ratio_target(report, "W1 K=8 >= 3x an asyncio.Queue fan-out", "W1 K=8", 3.0),
        _ratio_target(report, "W1b K=8 >= 20x an asyncio.Queue fan-out", "W1b K=8", 20.0),
        _ratio_target(report, "W2 >= 5x an asyncio Queue+Future round trip", "W2", 5.0),
        _ratio_target(report, "W5 >= 3x a queue.Queue hand-off", "W5", 3.0),
        _ratio_target(report, "Cython core >= 5x the Python core (C1)", "C1 K=8", 5.0),
    ]
    targets = [t for t in targets if t is not None]

    memory = report["memory"].get("cython")
    if memory is None:
        return targets
    per_msg = memory.get("bytes_per_buffered_message")
    note = memory.get("unavailable")
    if per_msg is not None and per_msg < 8:
        # A buffered message needs at least its pointer: the core allocates
        # with something tracemalloc does not trace (plain malloc).
        note = "below 8 B: the core's allocations are invisible to tracemalloc"
    targets.append(_target("<= 16 B per buffered message beyond the object", 16, "B",
                           per_msg, per_msg is not None and per_msg <= 16, note))
    idle = memory.get("idle_relay_bytes")
    growth = None if idle is None else idle["65536"] - idle["16"]
    targets.append(_target("idle relay: capacity 65536 costs <= 256 B more than 16", 256,
                           "B", growth, growth is not None and growth <= 256,
                           memory.get("unavailable")))
    return targets


# -- printing ------------------------------------------------------------------------

def _count(x):
    return "{:,.0f}".format(x)


def print_table(report, out=sys.stdout):
    rows = [("workload", "system", "msgs/s", "deliveries/s", "ratio", "drops")]
    for name, w in report["workloads"].items():
        for system, f in w["systems"].items():
            if "unavailable" in f:
                rows.append((name, system, "unavailable: " + f["unavailable"]))
                continue
            ratio = "-" if f["ratio"] is None else "%.2fx" % f["ratio"]
            rows.append((name, system, _count(f["msgs_per_s"]),
                         _count(f["deliveries_per_s"]), ratio, str(f["drops"])))
    widths = [max(len(r[i]) for r in rows if len(r) == 6) for i in range(6)]
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        if len(r) == 6:
            cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        else:
            cells.append(r[2])
        print("  ".join(cells).rstrip(), file=out)

    print("\nworkloads (ratio: msgs/s over the named baseline's, same run):", file=out)
    for name, w in report["workloads"].items():
        print("  %-9s %s; vs %s" % (name, w["text"], w["baseline"]), file=out)

    if report["memory"]:
        print("\nmemory (tracemalloc; buffered: one stalled subscriber, preallocated "
              "objects, capacity = count):", file=out)
        for core, m in report["memory"].items():
            if "unavailable" in m:
                print("  %-7s unavailable: %s" % (core, m["unavailable"]), file=out)
                continue
            idle = m["idle_relay_bytes"]
            print("  %-7s %.2f B per buffered message (%s buffered); idle relay %s B at "
                  "capacity 16, %s B at 65536"
                  % (core, m["bytes_per_buffered_message"], _count(m["buffered_messages"]),
                     _count(idle["16"]), _count(idle["65536"])), file=out)

    quick = " (--quick: sizes too small for these to mean anything)" \
        if report["settings"]["quick"] else ""
    print("\ntargets (design document section 5, judged on the Cython core)%s:" % quick, file=out)
    for t in report["targets"]:
        print("  " + _target_line(t), file=out)
    info = reliable_overhead(report)
    if info:
        print("  (info) reliable / observable msgs/s on W1 K=8: " + info, file=out)


def _target_line(t):
    if t["measured"] is None:
        shown, verdict = "-", "not measured"
    else:
        shown = ("%.2fx" if t["unit"] == "x" else "%.2f B") % t["measured"]
        verdict = "met" if t["met"] else "NOT MET"
    extra = ""
    if t.get("note"):
        extra += ": " + t["note"]
    if t.get("python_core") is not None:
        extra += " (python core %.2fx)" % t["python_core"]
    return "%-56s %8s  %s%s" % (t["target"], shown, verdict, extra)


def reliable_overhead(report):
    parts = []
    for core in CORES:
        rel = _figure(report, "W1 K=8", core + " reliable", "msgs_per_s")
        obs = _figure(report, "W1 K=8", core, "msgs_per_s")
        if rel is not None and obs is not None:
            parts.append("%s core %.2f" % (core, rel / obs))
    return ", ".join(parts)


# -- command line --------------------------------------------------------------------

def select(only):
    """Workloads named by ``--only`` (groups like W1, or full names like "W1 K=8"),
    and whether the memory figures were asked for. Raises ValueError naming an
    unknown one."""
    if not only:
        return list(WORKLOADS), True
    parts = [part.strip() for part in only.split(",") if part.strip()]
    wanted = [part.lower() for part in parts]
    known = {w.group.lower() for w in WORKLOADS} | {w.name.lower() for w in WORKLOADS}
    known.add(MEMORY_GROUP.lower())
    unknown = [part for part in parts if part.lower() not in known]
    if unknown:
        groups = sorted({w.group for w in WORKLOADS}) + [MEMORY_GROUP]
        raise ValueError("--only: unknown workload(s) %s; choose from %s"
                         % (", ".join(unknown), ", ".join(groups)))
    chosen = [w for w in WORKLOADS
              if w.group.lower() in wanted or w.name.lower() in wanted]
    return chosen, MEMORY_GROUP.lower() in wanted


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pipedream bench",
        description="pipedream (Cython core, pure-Python core) side by side with "
                    "stdlib baselines, in one run.")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one repeat (smoke test)")
    parser.add_argument("--only", metavar="LIST",
                        help="comma-separated: groups W1,W1b,W2,W3,W4,W5,C1,MEM "
                             "or full names like 'W1 K=8'")
    parser.add_argument("--repeat", type=int, metavar="R",
                        help="timed runs per system, best counts (default 3; 1 with --quick)")
    args = parser.parse_args(argv)
    try:
        selected, with_memory = select(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be >= 1, got %d" % repeat)
    json_file = None
    if args.json:
        try:   # find out now, not after a minute of measuring
            json_file = open(args.json, "w")
        except OSError as exc:
            parser.error("--json: cannot write %s: %s" % (args.json, exc.strerror or exc))

    started = time.perf_counter()
    report = run_all(selected, with_memory, repeat, args.quick)
    report["wall_seconds"] = time.perf_counter() - started

    for core, reason in report["cores_unavailable"].items():
        print("%s core unavailable: %s" % (core, reason))
    print("pipedream bench: python %s, %s, %s cpus, default core: %s%s\n"
          % (report["python_version"], report["machine"]["machine"],
             report["machine"]["cpus"], report["core"], ", quick" if args.quick else ""))
    load = report["machine"]["load_average_before"]
    if load is not None and load > 0.5 * (report["machine"]["cpus"] or 1):
        print("note: the machine was busy (load average %.1f at start): figures are noisy\n"
              % load)
    print_table(report)
    print("\ntotal %.1f s" % report["wall_seconds"])
    if json_file is not None:
        with json_file:
            json.dump(report, json_file, indent=2)
            json_file.write("\n")
        print("figures written to %s" % args.json)
    return 0
