"""Producers on other threads: ``send_nowait`` and ``send_threadsafe`` (issue 5).

Each racy test repeats its scenario many times in one test. Threads are
daemons and every wait is bounded (``run()``'s timeout, ``.result(timeout)``,
``join(timeout)``), so a bug fails a test instead of hanging the suite. No
timing assertions.
"""

import asyncio
import concurrent.futures
import threading
import time

import pytest

from conftest import run
from pipedream import Dropped, Relay, RelayClosed, RelayError, RelayFull

THREADS = 4
RESULT_TIMEOUT = 5      # seconds a worker may block on a future before the test fails


def start(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


async def join(threads):
    """Wait for threads without blocking the loop (bounded by run()'s timeout)."""
    while any(t.is_alive() for t in threads):
        await asyncio.sleep(0.001)


def send_retrying(send_nowait, values):
    """Reliable mode: send each value in order, retrying while the ring is full."""
    for value in values:
        while True:
            try:
                send_nowait(value)
                break
            except RelayFull:
                time.sleep(0)       # let the consumer run


def check_per_thread_order(received, per_thread):
    by_thread = {}
    for tid, i in received:
        by_thread.setdefault(tid, []).append(i)
    for tid, seq in by_thread.items():
        assert seq == sorted(seq), "thread %d out of order" % tid
        assert len(set(seq)) == len(seq), "thread %d duplicated" % tid
        assert all(0 <= i < per_thread for i in seq)
    return by_thread


async def collect(sub, out, many=None):
    if many:
        while True:
            try:
                out.extend(await sub.recv_many(many))
            except RelayClosed:
                return
    async for v in sub:
        out.append(v)


# -- reliable: exactly once, per-thread order ----------------------------------------

@pytest.mark.parametrize("weak", [False, True])
def test_reliable_threads_every_message_once_in_order(relay_core, weak):
    per_thread = 300

    async def once():
        tx, rx = Relay.channel(8, mode="reliable")
        sender = tx.weak() if weak else tx
        subs = [rx.subscribe(tuple), rx.subscribe(tuple)]
        got = [[], []]
        readers = [asyncio.create_task(collect(subs[0], got[0])),
                   asyncio.create_task(collect(subs[1], got[1], many=64))]
        threads = [start(send_retrying, sender.send_nowait,
                         [(tid, i) for i in range(per_thread)]) for tid in range(THREADS)]
        await join(threads)
        tx.close()
        await asyncio.gather(*readers)
        for out in got:
            assert len(out) == THREADS * per_thread
            by_thread = check_per_thread_order(out, per_thread)
            assert all(seq == list(range(per_thread)) for seq in by_thread.values())
        assert tx.dropped == 0

    async def main():
        for _ in range(20):
            await once()
    run(main(), timeout=120)


def test_reliable_send_threadsafe_queues_in_order(relay_core):
    per_thread = 200

    async def once():
        tx, rx = Relay.channel(4, mode="reliable")
        sub = rx.subscribe(tuple)
        got = []
        reader = asyncio.create_task(collect(sub, got, many=16))
        futures = [[] for _ in range(THREADS)]

        def produce(tid):
            for i in range(per_thread):     # no waiting: later ones queue for room
                futures[tid].append(tx.send_threadsafe((tid, i)))

        threads = [start(produce, tid) for tid in range(THREADS)]
        await join(threads)
        all_futures = [f for fs in futures for f in fs]
        done, pending = await asyncio.to_thread(
            concurrent.futures.wait, all_futures, RESULT_TIMEOUT)
        assert not pending
        for fs in futures:
            ids = [f.result() for f in fs]
            assert ids == sorted(ids)
        tx.close()
        await reader
        assert len(got) == THREADS * per_thread
        by_thread = check_per_thread_order(got, per_thread)
        assert all(seq == list(range(per_thread)) for seq in by_thread.values())

    async def main():
        for _ in range(20):
            await once()
    run(main(), timeout=120)


# -- observable: drops counted exactly ---------------------------------------------------

def test_observable_threads_drops_are_counted_exactly(relay_core):
    per_thread = 250
    total = THREADS * per_thread

    async def once(read_while_sending):
        tx, rx = Relay.channel(16)
        sub = rx.subscribe(tuple, envelopes=True)
        drops = rx.subscribe(Dropped)
        got, events = [], []
        drop_reader = asyncio.create_task(collect(drops, events, many=64))
        reader = None
        if read_while_sending:
            reader = asyncio.create_task(collect(sub, got, many=8))
        threads = [start(send_retrying, tx.send_nowait,
                         [(tid, i) for i in range(per_thread)]) for tid in range(THREADS)]
        await join(threads)
        tx.close()
        if reader is None:
            reader = asyncio.create_task(collect(sub, got, many=8))
        await asyncio.gather(reader, drop_reader)

        values = [env.value for env in got]
        check_per_thread_order(values, per_thread)
        assert len(got) + sub.dropped == total
        assert tx.dropped == sub.dropped        # one subscriber: each loss is its loss
        if not read_while_sending:
            assert sub.dropped == total - 16    # it keeps exactly the last 16
            assert [env.msg_id for env in got] == list(range(total - 15, total + 1))
        # Every loss is announced (or, if the Dropped reader lagged, counted there).
        assert len(events) + drops.dropped == tx.dropped
        assert all(e.subscribers == 1 and e.type_name == "builtins.tuple" for e in events)
        lost_ids = {e.msg_id for e in events}
        kept_ids = {env.msg_id for env in got}
        assert len(lost_ids) == len(events) and not lost_ids & kept_ids
        if drops.dropped == 0:
            assert lost_ids | kept_ids == set(range(1, total + 1))

    async def main():
        for i in range(20):
            await once(read_while_sending=bool(i % 2))
    run(main(), timeout=120)


def test_sends_racing_with_close_are_delivered_or_refused(relay_core):
    async def once(mode):
        tx, rx = Relay.channel(1 << 12, mode=mode)
        sub = rx.subscribe(int, envelopes=True)
        got = []
        reader = asyncio.create_task(collect(sub, got, many=64))
        accepted = [[] for _ in range(THREADS)]
        go = threading.Event()

        def produce(tid):
            go.wait(RESULT_TIMEOUT)
            for i in range(10_000):
                try:
                    accepted[tid].append(tx.send_nowait(i))
                except RelayFull:
                    time.sleep(0)
                except RelayClosed:
                    return

        threads = [start(produce, tid) for tid in range(THREADS)]
        go.set()
        await asyncio.sleep(0.002)
        tx.close()
        await join(threads)
        await reader
        ids = sorted(i for ids in accepted for i in ids)
        got_ids = [env.msg_id for env in got]
        if mode == "reliable":
            assert got_ids == ids           # every accepted one, once, in order
            assert sub.dropped == 0
        else:                               # fast threads: some lost, all counted
            assert got_ids == sorted(set(got_ids)) and set(got_ids) <= set(ids)
            assert len(got_ids) + sub.dropped == len(ids)

    async def main():
        for i in range(20):
            await once("reliable" if i % 2 else "observable")
    run(main(), timeout=120)


# -- waking the loop from other threads ---------------------------------------------------

def test_parked_subscriber_is_woken_from_another_thread(relay_core):
    async def main():
        tx, rx = Relay.channel(64)
        sub = rx.subscribe()
        for i in range(50):
            recv = asyncio.ensure_future(sub.recv())
            await asyncio.sleep(0)          # parked now
            thread = start(tx.send_nowait, i)
            assert await recv == i
            await join([thread])
    run(main())


def test_busy_subscriber_gets_no_wakeup_per_message(relay_core):
    """Wake-ups cross threads only when the subscriber is actually parked."""
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            nonlocal wakeups
            if getattr(callback, "__name__", "") == "wake_all":
                wakeups += 1
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        try:
            n = 20_000
            tx, rx = Relay.channel(1 << 16)
            sub = rx.subscribe(int)
            # 1. Parked once, then not running while a thread sends n messages:
            # exactly one cross-thread wake-up.
            first = asyncio.ensure_future(sub.recv_many(512))
            await asyncio.sleep(0)          # parked now
            thread = start(lambda: [tx.send_nowait(i) for i in range(n)])
            thread.join(RESULT_TIMEOUT)     # blocks the loop on purpose
            got = len(await first)
            while got < n:
                got += len(await sub.recv_many(512))
            assert got == n and wakeups == 1
            # 2. Reading while the thread sends: at most one wake-up per park,
            # and it parks at most once per recv_many call.
            wakeups = calls = got = 0
            thread = start(lambda: [tx.send_nowait(i) for i in range(n)])
            while got < n:
                got += len(await sub.recv_many(512))
                calls += 1
            await join([thread])
            assert wakeups <= calls + 1
        finally:
            del loop.call_soon_threadsafe
    run(main())


def test_room_freed_on_another_thread_wakes_the_waiting_sender(relay_core):
    async def main():
        for _ in range(30):
            tx, rx = Relay.channel(1, mode="reliable")
            stalled = rx.subscribe()
            tx.send_nowait(0)
            waiting = asyncio.ensure_future(tx.send(1))
            await asyncio.sleep(0)
            assert not waiting.done()
            closer = start(stalled.close)     # frees the room from a thread with no loop
            assert await waiting == 2
            await join([closer])
    run(main())


# -- send_threadsafe --------------------------------------------------------------------------

def test_send_threadsafe_round_trip_and_error(relay_core):
    async def main():
        tx, rx = Relay.channel()
        seen = []

        def sink(v):
            if v == "bad":
                raise ValueError("bad value")
            seen.append(v)

        rx.sink(str, sink)
        errors = rx.subscribe(RelayError)
        results = {}

        def worker():
            future = tx.send_threadsafe("a")
            results["a"] = (future.result(RESULT_TIMEOUT), list(seen))
            try:
                tx.send_threadsafe("bad").result(RESULT_TIMEOUT)
            except RelayError as exc:
                results["bad"] = exc
            results["int"] = tx.send_threadsafe(7).result(RESULT_TIMEOUT)  # nobody tracks ints

        await join([start(worker)])
        assert results["a"] == (1, ["a"])       # the sink had run before result()
        error = results["bad"]
        assert error.msg_id == 2 and error.source == "sink"
        assert isinstance(error.error, ValueError)
        assert results["int"] == 3
        event = await errors.recv()
        assert event.msg_id == 2 and isinstance(event.error, ValueError)
        # From the loop's own thread it is awaitable too.
        assert await asyncio.wrap_future(tx.send_threadsafe("b")) == 4
        assert seen == ["a", "b"]
        tx.close()
        with pytest.raises(RelayClosed):
            tx.send_threadsafe("late").result(RESULT_TIMEOUT)
    run(main())


def test_send_threadsafe_waits_for_room_and_close_releases_it(relay_core):
    async def once():
        tx, rx = Relay.channel(2, mode="reliable")
        sub = rx.subscribe()
        results = []
        blocked = threading.Event()

        def worker():
            futures = [tx.send_threadsafe(i) for i in range(5)]
            blocked.set()
            for future in futures:
                try:
                    results.append(future.result(RESULT_TIMEOUT))
                except RelayClosed:
                    results.append("closed")
                except concurrent.futures.TimeoutError:
                    results.append("timeout")

        thread = start(worker)
        while not blocked.is_set():
            await asyncio.sleep(0.001)
        assert sub.recv_nowait() == 0       # room for one: 2 goes in
        while sub.pending < 2:
            await asyncio.sleep(0.001)
        tx.close()                          # 3 and 4 still wait: RelayClosed, at once
        await join([thread])
        assert results == [1, 2, 3, "closed", "closed"]
        assert [v async for v in sub] == [1, 2]

    async def main():
        for _ in range(25):
            await once()
    run(main(), timeout=60)


def test_cancelling_a_queued_send_threadsafe_writes_nothing(relay_core):
    async def main():
        tx, rx = Relay.channel(1, mode="reliable")
        sub = rx.subscribe()
        tx.send_nowait("first")
        doomed = tx.send_threadsafe("doomed")
        kept = tx.send_threadsafe("kept")
        assert not doomed.done()
        assert doomed.cancel()
        assert sub.recv_nowait() == "first"
        assert await asyncio.wrap_future(kept) == 2
        assert not kept.cancel()            # written: too late to cancel
        tx.close()
        assert [v async for v in sub] == ["kept"]
    run(main())


def test_send_threadsafe_and_send_nowait_keep_one_threads_order(relay_core):
    async def once():
        tx, rx = Relay.channel(4, mode="reliable")
        sub = rx.subscribe(tuple)
        got = []
        reader = asyncio.create_task(collect(sub, got, many=3))

        def produce(tid):
            futures = []
            for i in range(100):
                if i % 3 == 0:
                    futures.append(tx.send_threadsafe((tid, i)))
                else:
                    send_retrying(tx.send_nowait, [(tid, i)])
            for f in futures:
                f.result(RESULT_TIMEOUT)

        threads = [start(produce, tid) for tid in range(THREADS)]
        await join(threads)
        tx.close()
        await reader
        by_thread = check_per_thread_order(got, 100)
        assert all(seq == list(range(100)) for seq in by_thread.values())

    async def main():
        for _ in range(20):
            await once()
    run(main(), timeout=120)
