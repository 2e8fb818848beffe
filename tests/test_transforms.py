"""Transformations and topology: filter, map, filter_map, only, exclude, split,
batch, forward, merge; supervision, cascade close, tracking boundary, no leak.

Every test runs on both cores (``relay_core``) and through ``run(...)``.
No timing assertions: tests wait for events and counts.
"""

import asyncio
import gc
import logging
import threading
import weakref

import pytest

from pipedream import Relay, RelayClosed, RelayError, merge, transforms
from pipedream.errors import Empty

from conftest import run

# "coroutine ... was never awaited" and errors in finalizers fail the test.
pytestmark = [pytest.mark.filterwarnings("error::RuntimeWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(autouse=True)
def no_asyncio_noise(caplog):
    """No "Task exception was never retrieved" / "Task was destroyed" noise."""
    yield
    gc.collect()
    records = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    noise = [r for r in records if r.name == "asyncio" and r.levelno >= logging.WARNING]
    assert not noise, [r.getMessage() for r in noise]


async def settle(condition=None, turns=200):
    """Let the loop run until ``condition()`` holds (at most ``turns`` turns)."""
    for _ in range(turns):
        if condition is not None and condition():
            return
        await asyncio.sleep(0)
    if condition is not None:
        assert condition(), "condition not reached after %d loop turns" % turns


async def collect(sub):
    """Everything a subscription gets until its relay closes."""
    return [v async for v in sub]


def drained(sub):
    """Everything buffered for ``sub`` right now."""
    out = []
    while True:
        try:
            out.append(sub.recv_nowait())
        except (Empty, RelayClosed):
            return out


class _FailingCheck(type):
    # A user class whose isinstance/issubclass check raises: delivering a new
    # type into a relay that has a subscriber for it runs this user code.
    def __subclasscheck__(cls, subclass):
        if subclass is object:      # the core's validation of the filter itself
            return False
        raise LookupError("type check failed")


class Touchy(metaclass=_FailingCheck):
    pass


# -- each operator's output ------------------------------------------------------

def test_filter_map_filter_map_only_exclude_split(relay_core):
    async def main():
        tx, rx = Relay.channel()
        evens = rx.filter(int, lambda x: x % 2 == 0).subscribe()
        squares = rx.map(int, lambda x: x * x).subscribe()
        halves = rx.filter_map(int, lambda x: x // 2 if x % 2 == 0 else None).subscribe()
        strings = rx.only(str).subscribe()
        not_ints = rx.exclude(int).subscribe()
        ints, rest = rx.split(int)
        ints, rest = ints.subscribe(), rest.subscribe()
        for value in [1, "a", 2, 3.5, 4, None]:
            tx.send_nowait(value)
        tx.close()
        assert await collect(evens) == [2, 4]
        assert await collect(squares) == [1, 4, 16]
        assert await collect(halves) == [1, 2]
        assert await collect(strings) == ["a"]
        assert await collect(not_ints) == ["a", 3.5, None]
        assert await collect(ints) == [1, 2, 4]
        assert await collect(rest) == ["a", 3.5, None]
    run(main())


def test_filter_map_keeps_zero_and_empty_string_drops_none(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.filter_map(object, lambda v: v).subscribe()
        for value in [0, "", None, False, [], 7]:
            tx.send_nowait(value)
        tx.close()
        assert await collect(sub) == [0, "", False, [], 7]
    run(main())


def test_map_forwards_none(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.map(int, lambda x: None if x == 2 else x).subscribe()
        for value in [1, 2, 3]:
            tx.send_nowait(value)
        tx.close()
        assert await collect(sub) == [1, None, 3]
    run(main())


def test_typed_transformations_carry_only_their_type(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.filter(int, lambda x: True).subscribe()
        subclass_sub = rx.map(int, lambda x: x).subscribe()
        for value in ["s", 1, True, b"x", 2.0]:
            tx.send_nowait(value)
        tx.close()
        assert await collect(sub) == [1, True]      # isinstance: bool is an int
        assert await collect(subclass_sub) == [1, True]
    run(main())


def test_async_pred_and_fn(relay_core):
    async def main():
        tx, rx = Relay.channel()

        async def is_odd(x):
            await asyncio.sleep(0)
            return x % 2

        async def double(x):
            await asyncio.sleep(0)
            return 2 * x

        class AsyncCallable:
            async def __call__(self, x):
                return -x

        odd = rx.filter(int, is_odd).subscribe()
        doubled = rx.map(int, double).subscribe()
        negated = rx.filter_map(int, AsyncCallable()).subscribe()
        for i in range(6):
            tx.send_nowait(i)
        tx.close()
        assert await collect(odd) == [1, 3, 5]
        assert await collect(doubled) == [0, 2, 4, 6, 8, 10]
        assert await collect(negated) == [0, -1, -2, -3, -4, -5]
    run(main())


def test_chains(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = (rx.filter(int, lambda x: x > 0)
                 .map(int, lambda x: x * 10)
                 .filter_map(int, lambda x: str(x) if x != 20 else None)
                 .subscribe())
        gc.collect()        # the intermediate relays are gone; the chain works
        for value in [-1, 1, 2, 3, "x"]:
            tx.send_nowait(value)
        tx.close()
        assert await collect(sub) == ["10", "30"]
    run(main())


def test_messages_keep_their_origin_through_transformations(relay_core):
    async def main():
        tx, rx = Relay.channel()
        derived = rx.map(int, lambda x: x + 1)
        envelopes = derived.batch(int, 2).subscribe(envelopes=True)
        tx.send_nowait(1)
        tx.send_nowait(2)
        derived.send_nowait(100)            # ingress: origin is the derived relay
        derived.send_nowait(200)
        tx.close()
        got = await collect(envelopes)
        assert sorted((e.value, e.origin) for e in got) == [([2, 3], tx.id),
                                                             ([100, 200], derived.id)]
        assert all(e.relay_id != tx.id for e in got)
    run(main())


def test_relay_events_stay_on_their_relay(relay_core):
    async def main():
        tx, rx = Relay.channel(2)
        everything = rx.map(object, lambda v: v, capacity=100).subscribe()
        failing = rx.filter(int, lambda x: 1 // x, on_error="skip")  # RelayError on rx
        stalled = rx.subscribe(int)                         # never reads: Dropped on rx
        parent_events = rx.subscribe((RelayError,))
        for i in range(5):
            tx.send_nowait(i)
            await settle(lambda: everything.pending == i + 1)
        assert tx.dropped > 0
        await settle(lambda: parent_events.pending)
        tx.close()
        assert await collect(everything) == [0, 1, 2, 3, 4]
    run(main())


# -- batch -----------------------------------------------------------------------

def test_batch_full_and_final_partial_flush(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.batch(int, 3).subscribe()
        for value in [0, "x", 1, 2, 3, 4, 5, 6]:
            tx.send_nowait(value)
        await settle(lambda: sub.pending == 2)
        await settle()
        assert drained(sub) == [[0, 1, 2], [3, 4, 5]]     # [6] waits: no timeout
        tx.close()
        assert await collect(sub) == [[6]]
    run(main())


def test_batch_partial_flushed_by_timeout(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.batch(int, 100, timeout=0.01).subscribe()
        tx.send_nowait(1)
        tx.send_nowait(2)
        assert await sub.recv() == [1, 2]       # before any close
        tx.send_nowait(3)
        assert await sub.recv() == [3]
        tx.close()
        assert await collect(sub) == []
    run(main())


def test_batch_timeout_zero_flushes_whenever_idle(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.batch(int, 100, timeout=0).subscribe()
        for i in range(3):
            tx.send_nowait(i)
        assert await sub.recv() == [0, 1, 2]
        tx.close()
        assert await collect(sub) == []
    run(main())


def test_batch_final_flush_with_timeout_pending(relay_core):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.batch(int, 10, timeout=3600).subscribe()
        for i in range(4):
            tx.send_nowait(i)
        tx.close()
        assert await collect(sub) == [[0, 1, 2, 3]]
    run(main())


# -- supervision -----------------------------------------------------------------

FAILING = {
    # op: (callable failing on 0, output for the inputs 1, 0, 2 with on_error="skip")
    "filter": (lambda x: 10 // x > 0, [1, 2]),
    "map": (lambda x: 10 // x, [10, 5]),
    "filter_map": (lambda x: 10 // x, [10, 5]),
}


@pytest.mark.parametrize("op", sorted(FAILING))
@pytest.mark.parametrize("use_async", [False, True])
def test_failing_fn_closes_derived_relay_by_default(relay_core, op, use_async):
    fn, expected = FAILING[op]
    if use_async:
        sync_fn = fn

        async def fn(x):
            return sync_fn(x)

    async def main():
        tx, rx = Relay.channel()
        errors = rx.subscribe(RelayError)
        derived = getattr(rx, op)(int, fn)
        sub = derived.subscribe()
        derived_errors = derived.subscribe(RelayError)
        ids = [tx.send_nowait(v) for v in (1, 0, 2)]
        assert await collect(sub) == expected[:1]      # ends after the failure
        assert derived.closed and not tx.closed
        error = await errors.recv()
        assert (error.msg_id, error.source) == (ids[1], op)
        assert isinstance(error.error, ZeroDivisionError)
        assert error.__cause__ is error.error
        assert await tx.send(3) == ids[-1] + 1         # the parent is not affected
        assert drained(derived_errors) == []           # published on the parent only
    run(main())


@pytest.mark.parametrize("op", sorted(FAILING))
def test_failing_fn_skip_drops_the_message_and_goes_on(relay_core, op):
    fn, expected = FAILING[op]

    async def main():
        tx, rx = Relay.channel()
        errors = rx.subscribe(RelayError)
        derived = getattr(rx, op)(int, fn, on_error="skip")
        sub = derived.subscribe()
        ids = [tx.send_nowait(v) for v in (1, 0, 2, 0)]
        assert [await sub.recv() for _ in expected] == expected
        assert not derived.closed
        first, second = await errors.recv(), await errors.recv()
        assert (first.msg_id, second.msg_id) == (ids[1], ids[3])
        assert first.source == second.source == op
        tx.close()
        assert await collect(sub) == []
    run(main())


@pytest.mark.parametrize("on_error", ["close", "skip"])
def test_batch_failed_delivery_follows_on_error(relay_core, on_error):
    # Batching runs no user code; what can fail is delivering a list into the
    # derived relay (here: its subscriber's type check raises).
    async def main():
        tx, rx = Relay.channel()
        errors = rx.subscribe(RelayError)
        batches = rx.batch(int, 2, on_error=on_error)
        touchy = batches.subscribe(Touchy)
        ids = [tx.send_nowait(i) for i in range(4)]
        error = await errors.recv()
        assert (error.msg_id, error.source) == (ids[0], "batch")
        assert isinstance(error.error, LookupError)
        if on_error == "close":
            await settle(lambda: batches.closed)
            assert drained(errors) == []
        else:
            error = await errors.recv()
            assert error.msg_id == ids[2]
            assert not batches.closed
            tx.close()
            await settle(lambda: batches.closed)
        with pytest.raises(RelayClosed):
            await touchy.recv()
    run(main())


def test_unexpected_feed_failure_is_published_logged_and_closes(relay_core, monkeypatch, caplog):
    class BrokenWaiters(transforms.Waiters):
        async def wait(self):
            raise RuntimeError("feed bug")

    monkeypatch.setattr(transforms, "Waiters", BrokenWaiters)

    async def main():
        tx, rx = Relay.channel()
        errors = rx.subscribe(RelayError)
        derived = rx.map(int, lambda x: x)
        sub = derived.subscribe()
        error = await errors.recv()
        assert error.source == "map" and isinstance(error.error, RuntimeError)
        assert await collect(sub) == []
        assert derived.closed
        assert rx._hub.ring.reader_count == 1     # only `errors` is left
    with caplog.at_level(logging.ERROR, logger="pipedream"):
        run(main())
    assert any("map feed" in r.getMessage() for r in caplog.records if r.name == "pipedream")


# -- close -----------------------------------------------------------------------

def test_cascade_close_through_three_levels(relay_core):
    async def main():
        tx, rx = Relay.channel()
        level1 = rx.map(int, lambda x: x + 1)
        level2 = level1.filter(int, lambda x: x % 2 == 0)
        level3 = level2.batch(int, 4)
        subs = [level.subscribe() for level in (level1, level2, level3)]
        for i in range(10):
            tx.send_nowait(i)
        tx.close()          # nothing was forwarded yet: all of it drains first
        assert await collect(subs[0]) == list(range(1, 11))
        assert await collect(subs[1]) == [2, 4, 6, 8, 10]
        assert await collect(subs[2]) == [[2, 4, 6, 8], [10]]
        assert level1.closed and level2.closed and level3.closed
    run(main())


def test_aclose_waits_for_derived_relays_and_forwards(relay_core):
    async def main():
        tx, rx = Relay.channel()
        seen = []

        async def slow(batch):
            await asyncio.sleep(0)
            seen.append(batch)

        rx.map(int, lambda x: x * 2).batch(int, 3).sink(list, slow)
        target = Relay()
        target_sub = target.subscribe(int)
        rx.forward(target)
        for i in range(7):
            tx.send_nowait(i)
        await tx.aclose()
        assert seen == [[0, 2, 4], [6, 8, 10], [12]]
        assert drained(target_sub) == list(range(7))
    run(main())


def test_reliable_backpressure_through_a_chain(relay_core):
    async def main():
        tx, rx = Relay.channel(4, mode="reliable")
        sub = rx.map(int, lambda x: x + 1).filter(int, lambda x: x % 3).subscribe()
        received = []

        async def consume():
            async for value in sub:
                received.append(value)
                await asyncio.sleep(0)

        consumer = asyncio.ensure_future(consume())
        for i in range(300):
            await tx.send(i)            # waits for room when the chain is full
        tx.close()
        await consumer
        assert received == [x for x in range(1, 301) if x % 3]
        assert tx.dropped == 0
    run(main())


def test_transformation_of_closed_relay_is_closed(relay_core):
    async def main():
        tx, rx = Relay.channel()
        tx.close()
        for derived in (rx.map(int, str), rx.filter(int, bool), rx.batch(int, 2),
                        rx.only(int), rx.exclude(int), merge(rx)):
            assert derived.closed
            with pytest.raises(RelayClosed):
                await derived.subscribe().recv()
        assert rx._hub.ring.reader_count == 0
    run(main())


def test_closing_a_derived_relay_releases_its_parent_reader(relay_core):
    async def main():
        tx, rx = Relay.channel()
        ring = rx._hub.ring
        derived = rx.map(int, str)
        assert ring.reader_count == 1
        derived.close()                 # the parent stays idle: no message wakes the feed
        await settle(lambda: ring.reader_count == 0)
        assert not tx.closed
        assert rx._hub.children == [] and rx._hub.drain_waits == []
    run(main())


# -- tracking boundary and ingress -------------------------------------------------

def test_parent_send_does_not_wait_for_derived_handlers(relay_core):
    async def main():
        tx, rx = Relay.channel()
        gate, started = asyncio.Event(), asyncio.Event()

        async def slow(x):
            started.set()
            await gate.wait()

        rx.map(int, lambda x: x).sink(int, slow)

        def bad(x):
            raise ValueError("child sink failed")

        failing = rx.map(int, lambda x: x)
        failing.sink(int, bad)
        child_errors = failing.subscribe(RelayError)
        parent_errors = rx.subscribe(RelayError)
        await tx.send(1)                # returns: the child's sink is not waited for
        assert not gate.is_set()
        await started.wait()            # ... though it got the message
        error = await child_errors.recv()
        assert error.source == "sink" and isinstance(error.error, ValueError)
        assert drained(parent_errors) == []
        gate.set()
    run(main())


def test_ingress_into_a_derived_relay(relay_core):
    async def main():
        tx, rx = Relay.channel()
        parent_sub = rx.subscribe()
        derived = rx.map(int, lambda x: x * 2)
        derived_sub = derived.subscribe()
        tx.send_nowait(1)
        assert await derived.send("direct") > 0     # not mapped, not seen upstream
        derived.send_nowait(5)
        tx.close()
        assert sorted(await collect(derived_sub), key=str) == [2, 5, "direct"]
        assert await collect(parent_sub) == [1]
    run(main())


def test_ingress_send_waits_for_the_derived_relays_own_sink(relay_core):
    async def main():
        tx, rx = Relay.channel()
        derived = rx.map(int, lambda x: x)
        seen = []

        async def record(x):
            await asyncio.sleep(0)
            seen.append(x)

        derived.sink(int, record)
        await derived.send(7)
        assert seen == [7]
    run(main())


def test_messages_sent_right_after_creation_all_arrive(relay_core):
    async def main():
        tx, rx = Relay.channel()
        derived = [rx.map(int, lambda x: x) for _ in range(10)]
        for i in range(100):                 # before any feed task ran
            tx.send_nowait(i)
        subs = [d.subscribe() for d in derived]
        late = rx.filter(int, lambda x: True)
        late_sub = late.subscribe()

        def produce(base):
            for i in range(1000):
                tx.send_nowait(base + i)

        threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        tx.close()
        for sub in subs:
            assert len(await collect(sub)) == 4100
        got = await collect(late_sub)
        assert sorted(got) == list(range(4000))
        for k in range(4):   # each producer's messages in its order
            assert [v for v in got if v // 1000 == k] == list(range(k * 1000, k * 1000 + 1000))
    run(main(), timeout=30)


# -- forward -----------------------------------------------------------------------

def test_forward_both_ways_does_not_loop(relay_core):
    async def main():
        a, b = Relay(), Relay()
        a_sub, b_sub = a.subscribe(), b.subscribe()
        a_to_b, b_to_a = a.forward(b), b.forward(a)
        a.send_nowait("from a")
        b.send_nowait("from b")
        await settle(lambda: a_sub.pending == 2 and b_sub.pending == 2)
        await settle()                       # let any echo show up
        assert sorted(drained(a_sub)) == ["from a", "from b"]
        assert sorted(drained(b_sub)) == ["from a", "from b"]
        a.close()
        await a_to_b                         # the source closed
        await b_to_a                         # its target closed
        assert not b.closed                  # forward never closes its target
    run(main())


def test_forward_cycle_of_three_delivers_each_message_once(relay_core):
    async def main():
        relays = [Relay() for _ in range(3)]
        subs = [r.subscribe(envelopes=True) for r in relays]
        tasks = [relays[i].forward(relays[(i + 1) % 3]) for i in range(3)]
        for i, r in enumerate(relays):
            r.send_nowait(i)
        await settle(lambda: all(s.pending == 3 for s in subs))
        await settle()
        for sub in subs:
            got = drained(sub)
            assert sorted(e.value for e in got) == [0, 1, 2]
            assert {e.value: e.origin for e in got} == {i: r.id for i, r in enumerate(relays)}
        for r in relays:
            r.close()
        await asyncio.gather(*tasks)
    run(main())


def test_forward_into_reliable_target_with_backpressure(relay_core):
    async def main():
        tx, rx = Relay.channel(1024)
        target = Relay(4, mode="reliable")
        sub = target.subscribe(int)
        task = rx.forward(target)
        for i in range(200):
            tx.send_nowait(i)
        tx.close()
        got = []
        async for value in sub:
            got.append(value)
            if len(got) == 200:
                break
        await task
        assert got == list(range(200))
        assert not target.closed
        assert rx.dropped == 0
    run(main())


def test_forward_accepts_sender_weak_sender_and_relay(relay_core):
    async def main():
        tx, rx = Relay.channel()
        targets = [Relay.channel(), Relay.channel(), Relay()]
        senders = [targets[0][0], targets[1][0].weak(), targets[2]]
        receivers = [targets[0][1], targets[1][1], targets[2]]
        subs = [r.subscribe() for r in receivers]
        tasks = [rx.forward(s) for s in senders]
        tx.send_nowait(1)
        tx.close()
        await asyncio.gather(*tasks)
        assert [drained(s) for s in subs] == [[1], [1], [1]]
    run(main())


def test_forward_ends_when_target_closes_and_when_cancelled(relay_core):
    async def main():
        tx, rx = Relay.channel()
        ring = rx._hub.ring
        target = Relay()
        task = rx.forward(target)
        target.close()                       # the source stays idle
        await task
        assert ring.reader_count == 0
        other = Relay()
        cancelled = rx.forward(other)
        cancelled.cancel()                   # before its first step
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert ring.reader_count == 0 and rx._hub.drain_waits == []
        assert not tx.closed
    run(main())


def test_forward_is_untracked(relay_core):
    async def main():
        tx, rx = Relay.channel()
        target = Relay()
        gate = asyncio.Event()

        async def slow(x):
            await gate.wait()

        target.sink(int, slow)
        rx.forward(target)
        await tx.send(1)                     # does not wait for target's sink
        gate.set()
    run(main())


# -- merge -------------------------------------------------------------------------

def test_merge_carries_all_inputs_and_closes_when_all_closed(relay_core):
    async def main():
        tx1, rx1 = Relay.channel()
        tx2, rx2 = Relay.channel()
        merged = merge(rx1, rx2)
        sub = merged.subscribe(envelopes=True)
        tx1.send_nowait(1)
        tx2.send_nowait("a")
        tx1.send_nowait(2)
        tx1.close()
        got = [await sub.recv() for _ in range(3)]
        assert [e.value for e in got if e.origin == tx1.id] == [1, 2]
        assert [e.value for e in got if e.origin == tx2.id] == ["a"]
        await settle()
        assert not merged.closed             # one input is still open
        tx2.send_nowait("b")
        tx2.close()
        assert [e.value for e in await collect(sub)] == ["b"]
        assert merged.closed
    run(main())


def test_merge_inherits_from_first_input(relay_core):
    async def main():
        _, rx1 = Relay.channel(8, mode="reliable")
        _, rx2 = Relay.channel(16)
        merged = merge(rx1, rx2)
        assert (merged._hub.capacity, merged._hub.mode.value) == (8, "reliable")
        own = merge(rx1, rx2, capacity=32, mode="observable")
        assert (own._hub.capacity, own._hub.mode.value) == (32, "observable")
    run(main())


def test_derived_relays_inherit_capacity_and_mode(relay_core):
    async def main():
        _, rx = Relay.channel(8, mode="reliable")
        derived = rx.map(int, str)
        assert (derived._hub.capacity, derived._hub.mode.value) == (8, "reliable")
        own = rx.filter(int, bool, capacity=100, mode="observable")
        assert (own._hub.capacity, own._hub.mode.value) == (100, "observable")
        chained = own.batch(int, 2)
        assert (chained._hub.capacity, chained._hub.mode.value) == (100, "observable")
    run(main())


# -- no leak -----------------------------------------------------------------------

def test_discarded_transformations_release_everything(relay_core):
    async def main():
        tx, rx = Relay.channel()
        hub = rx._hub
        keep = rx.subscribe()
        base_readers = hub.ring.reader_count
        base_tasks = len(asyncio.all_tasks())
        makers = [
            lambda: rx.filter(int, bool),
            lambda: rx.map(int, str),
            lambda: rx.batch(int, 3, timeout=1),
            lambda: rx.exclude(str),
            lambda: rx.only(int).map(int, abs).filter(int, bool),
            lambda: merge(rx, rx),
        ]
        hubs = []
        for i in range(200):
            derived = makers[i % len(makers)]()
            hubs.append(weakref.ref(derived._hub))
            if i % 2:
                tx.send_nowait(i)            # some with traffic in flight
            del derived
        await settle(lambda: hub.ring.reader_count == base_readers
                     and len(asyncio.all_tasks()) == base_tasks)
        assert hub.children == [] and hub.drain_waits == []
        gc.collect()
        assert [r for r in hubs if r() is not None] == []
        assert len(drained(keep)) == 100     # the parent itself is unaffected
    run(main())


def test_chain_lives_while_its_end_is_referenced_or_subscribed(relay_core):
    async def main():
        tx, rx = Relay.channel()
        ring = rx._hub.ring
        end = rx.filter(int, lambda x: x > 0).map(int, lambda x: -x)
        gc.collect()
        await settle()
        sub = end.subscribe()
        tx.send_nowait(1)
        assert await sub.recv() == -1
        del end                                  # still subscribed: keeps working
        gc.collect()
        await settle()
        tx.send_nowait(2)
        assert await sub.recv() == -2
        assert ring.reader_count == 1
        sub.close()                              # the last reader: the chain stops
        await settle(lambda: ring.reader_count == 0)

        sub = rx.map(int, str).subscribe()       # handle discarded at once
        gc.collect()
        tx.send_nowait(3)
        assert await sub.recv() == "3"
        del sub                                  # a collected subscription counts too
        gc.collect()
        await settle(lambda: ring.reader_count == 0)
    run(main())


def test_discarded_relay_with_handler_keeps_running(relay_core):
    async def main():
        tx, rx = Relay.channel()
        seen = []
        rx.map(int, lambda x: x * 3).sink(int, seen.append)     # Handler discarded too
        gc.collect()
        await settle()
        for i in range(3):
            tx.send_nowait(i)
        await settle(lambda: len(seen) == 3)
        assert seen == [0, 3, 6]
        assert rx._hub.ring.reader_count == 1
    run(main())


def test_forward_into_discarded_derived_relay_ends(relay_core):
    async def main():
        tx, rx = Relay.channel()
        other_tx, other_rx = Relay.channel()
        task = other_rx.forward(rx.map(int, str))     # nobody reads the derived relay
        await settle(lambda: rx._hub.ring.reader_count == 0)
        await task
        assert other_rx._hub.ring.reader_count == 0
    run(main())


# -- bad arguments -------------------------------------------------------------------

def test_bad_arguments_name_the_argument(relay_core):
    async def main():
        tx, rx = Relay.channel()
        checks = [
            (lambda: rx.filter(int, 3), TypeError, "pred"),
            (lambda: rx.map(int, None), TypeError, "fn"),
            (lambda: rx.filter_map(int, "f"), TypeError, "fn"),
            (lambda: rx.map("int", str), TypeError, "T"),
            (lambda: rx.only(3), TypeError, "T"),
            (lambda: rx.exclude(()), TypeError, "T"),
            (lambda: rx.map(int, str, on_error="ignore"), ValueError, "on_error"),
            (lambda: rx.batch(int, 0), ValueError, "size"),
            (lambda: rx.batch(int, 2.5), TypeError, "size"),
            (lambda: rx.batch(int, True), TypeError, "size"),
            (lambda: rx.batch(int, 2, timeout=-1), ValueError, "timeout"),
            (lambda: rx.batch(int, 2, timeout=float("nan")), ValueError, "timeout"),
            (lambda: rx.batch(int, 2, timeout="1"), TypeError, "timeout"),
            (lambda: rx.batch(int, 2, on_error=None), ValueError, "on_error"),
            (lambda: rx.map(int, str, capacity=0), ValueError, "capacity"),
            (lambda: rx.map(int, str, mode="lossy"), ValueError, "mode"),
            (lambda: rx.forward(rx), TypeError, "target"),
            (lambda: rx.forward(42), TypeError, "target"),
            (lambda: merge(), ValueError, "receiver"),
            (lambda: merge(rx, tx), TypeError, "receivers"),
        ]
        for make, error, name in checks:
            with pytest.raises(error, match=name):
                make()
        loopback = Relay()
        with pytest.raises(ValueError, match="itself"):
            loopback.forward(loopback)
        assert rx._hub.ring.reader_count == 0 and loopback._hub.ring.reader_count == 0
    run(main())


def test_transformations_need_a_running_loop(relay_core):
    tx, rx = Relay.channel()
    for make in (lambda: rx.map(int, str), lambda: rx.batch(int, 2),
                 lambda: rx.forward(Relay()), lambda: merge(rx)):
        with pytest.raises(RuntimeError, match="running event loop"):
            make()
    assert rx._hub.ring.reader_count == 0


class _Halt(BaseException):
    """A BaseException that is not an Exception."""


def test_base_exception_in_fn_stops_the_feed_and_says_which(relay_core):
    # The feed stops, its derived relay closes, and the loop's exception
    # handler hears which feed stopped (no bare "never retrieved" report).
    async def main():
        loop = asyncio.get_running_loop()
        reports = []
        loop.set_exception_handler(lambda _loop, context: reports.append(context["message"]))
        tx, rx = Relay.channel()

        def halt(value):
            raise _Halt()
        mapped = rx.map(int, halt)
        out = mapped.subscribe()
        await tx.send(1)
        assert [v async for v in out] == []
        assert mapped.closed
        assert len(reports) == 1 and "map feed" in reports[0]
    run(main())
