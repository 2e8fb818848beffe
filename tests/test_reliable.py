"""Reliable delivery mode: no loss, backpressure, the queue for room, close and
cancellation of waiting sends, the deadlock guard (issue 5).

Every test runs on both cores (``relay_core``) and through ``run()`` so that
nothing can hang. No timing assertions: "still waiting" is checked after
letting the loop run a fixed number of rounds.
"""

import asyncio
import gc

import pytest

from conftest import run
from pipedream import (DeliveryMode, Dropped, Empty, Relay, RelayClosed, RelayError,
                       RelayFull)


async def spin(rounds=20):
    """Let the loop run callbacks and tasks for a while (no wall-clock time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def queued(sent):
    """True while a send() waits for room (a plain Sent is already written)."""
    return getattr(sent, "queued", False)


def reliable(capacity):
    return Relay.channel(capacity, mode="reliable")


# -- mode ---------------------------------------------------------------------------

def test_mode_is_validated_and_both_spellings_work(relay_core):
    with pytest.raises(ValueError) as info:
        Relay.channel(4, mode="lossless")
    assert "'observable'" in str(info.value) and "'reliable'" in str(info.value)
    assert "lossless" in str(info.value)
    for mode in ("reliable", DeliveryMode.RELIABLE):
        tx, rx = Relay.channel(1, mode=mode)
        sub = rx.subscribe()
        tx.send_nowait(1)
        with pytest.raises(RelayFull):
            tx.send_nowait(2)
        assert sub.recv_nowait() == 1
    relay = Relay(2, mode=DeliveryMode.RELIABLE)
    sub = relay.subscribe()
    relay.send_nowait(1)
    relay.send_nowait(2)
    with pytest.raises(RelayFull):
        relay.send_nowait(3)


# -- no loss, backpressure ----------------------------------------------------------

def test_slow_subscriber_loses_nothing(relay_core):
    async def main():
        tx, rx = reliable(4)
        fast, slow = rx.subscribe(int), rx.subscribe(int)
        got_fast, got_slow = [], []

        async def read(sub, out, pause):
            async for v in sub:
                out.append(v)
                for _ in range(pause):
                    await asyncio.sleep(0)

        readers = [asyncio.create_task(read(fast, got_fast, 0)),
                   asyncio.create_task(read(slow, got_slow, 3))]
        ids = [await tx.send(i) for i in range(300)]
        tx.close()
        await asyncio.gather(*readers)
        assert got_fast == got_slow == list(range(300))
        assert ids == list(range(1, 301))
        assert fast.dropped == slow.dropped == tx.dropped == 0
    run(main())


def test_send_waits_for_room_and_resumes(relay_core):
    async def main():
        tx, rx = reliable(2)
        sub = rx.subscribe()
        assert await tx.send("a") == 1
        assert await tx.send("b") == 2
        waiting = asyncio.ensure_future(tx.send("c"))
        await spin()
        assert not waiting.done()
        assert sub.recv_nowait() == "a"
        assert await waiting == 3
        assert [sub.recv_nowait(), sub.recv_nowait()] == ["b", "c"]
    run(main())


def test_send_nowait_when_full_raises_and_writes_nothing(relay_core):
    async def main():
        tx, rx = reliable(2)
        sub = rx.subscribe()
        tx.send_nowait(1)
        tx.send_nowait(2)
        for attempt in range(3):
            with pytest.raises(RelayFull):
                tx.send_nowait(99)
            with pytest.raises(RelayFull):
                tx.weak().send_nowait(99)
        assert sub.pending == 2
        assert sub.recv_nowait() == 1
        assert tx.send_nowait(3) == 3       # no id was used up by the refusals
        assert [sub.recv_nowait(), sub.recv_nowait()] == [2, 3]
        with pytest.raises(Empty):
            sub.recv_nowait()
        assert tx.dropped == 0 and sub.dropped == 0
    run(main())


def test_waiting_sends_are_served_in_order(relay_core):
    async def main():
        tx, rx = reliable(3)
        sub = rx.subscribe()
        for i in range(3):
            tx.send_nowait(i)
        waiting = [asyncio.ensure_future(tx.send(i)) for i in range(3, 20)]
        forgotten = tx.send(20)             # never awaited: still written, in its turn
        assert queued(forgotten)
        await spin()
        assert not any(w.done() for w in waiting)
        got = []
        while len(got) < 21:
            got.extend(await sub.recv_many(2))
        assert got == list(range(21))
        assert [await w for w in waiting] == list(range(4, 21))
        assert forgotten.msg_id == 21 and not queued(forgotten)
    run(main())


def test_queued_sends_are_never_overtaken(relay_core):
    async def main():
        tx, rx = reliable(1)
        sub = rx.subscribe()
        tx.send_nowait("a")
        b = tx.send("b")                    # queued: the ring is full
        assert sub.recv_nowait() == "a"     # room now; the drain is not run yet
        with pytest.raises(RelayFull):      # send_nowait never jumps the queue...
            tx.send_nowait("x")
        c = tx.send("c")                    # ...and send() queues behind b
        assert queued(c)
        assert await sub.recv() == "b"
        assert await sub.recv() == "c"
        assert (await b, await c) == (2, 3)
    run(main())


def test_a_send_that_had_to_queue_is_eager(relay_core):
    async def main():
        tx, rx = reliable(1)
        sub = rx.subscribe()
        tx.send_nowait(0)
        tx.send(1)                          # never awaited
        tx.send(2)
        assert await sub.recv() == 0
        assert await sub.recv() == 1
        assert await sub.recv() == 2
    run(main())


# -- close and cancellation ------------------------------------------------------------

def test_close_wakes_waiting_senders_with_relay_closed(relay_core):
    async def main():
        tx, rx = reliable(2)
        sub = rx.subscribe()
        tx.send_nowait(1)
        tx.send_nowait(2)
        waiting = [asyncio.ensure_future(tx.send(i)) for i in (3, 4, 5)]
        forgotten = tx.send(6)
        await spin()
        tx.close()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, RelayClosed) for r in results), results
        with pytest.raises(RelayClosed):
            await forgotten
        with pytest.raises(RelayClosed):
            tx.send(7)                      # at the call
        assert [v async for v in sub] == [1, 2]     # nothing written for them
    run(main())


def test_cancelling_a_queued_send_writes_nothing(relay_core):
    async def main():
        tx, rx = reliable(1)
        a, b = rx.subscribe(), rx.subscribe()
        tx.send_nowait("first")
        doomed = asyncio.ensure_future(tx.send("doomed"))
        timed_out = tx.send("timed out")
        after = tx.send("after")
        await spin()
        doomed.cancel()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(timed_out, 0.01)
        assert a.recv_nowait() == b.recv_nowait() == "first"
        assert await after == 2             # the cancelled ones took no id either
        tx.close()
        assert [v async for v in a] == [v async for v in b] == ["after"]
        with pytest.raises(asyncio.CancelledError):
            await doomed
    run(main())


def test_cancelling_after_the_write_only_stops_waiting(relay_core):
    async def main():
        tx, rx = reliable(1)
        sub = rx.subscribe()
        release = asyncio.Event()
        seen = []

        async def slow_sink(v):
            seen.append(v)
            await release.wait()

        rx.sink(str, slow_sink)
        tx.send_nowait(0)                   # int: the sink does not count it
        waiting = asyncio.ensure_future(tx.send("x"))
        await spin()
        assert sub.recv_nowait() == 0       # room: "x" is written, the sink has it
        while not seen:
            await asyncio.sleep(0)
        waiting.cancel()
        await spin()
        assert sub.recv_nowait() == "x"
        release.set()
        tx.close()
    run(main())


# -- who holds the writer back ------------------------------------------------------------

def test_idle_subscriber_of_another_type_never_blocks(relay_core):
    async def main():
        tx, rx = reliable(2)
        idle = rx.subscribe(str)            # nothing of its type is ever sent
        ints = rx.subscribe(int)
        for i in range(50):
            tx.send_nowait(i)
            assert ints.recv_nowait() == i
        for i in range(50):                 # nobody reads ints at all now
            rx.subscribe(bytes)             # (readers come and go; still no claim)
        ints.close()
        for i in range(50):
            assert await tx.send(i) > 0
        assert idle.pending == 0
    run(main())


def test_subscriber_with_nothing_unread_never_blocks(relay_core):
    async def main():
        tx, rx = reliable(3)
        subs = [rx.subscribe() for _ in range(5)]
        for i in range(40):
            tx.send_nowait(i)
            for sub in subs:
                assert sub.recv_nowait() == i
    run(main())


def test_stalled_reader_gates_the_writer_once_the_ring_wraps_to_it(relay_core):
    async def main():
        tx, rx = reliable(4)
        stalled = rx.subscribe(str)
        ints = rx.subscribe(int)
        tx.send_nowait("unread")
        for i in range(3):                  # fits while the ring has not wrapped
            tx.send_nowait(i)
            assert ints.recv_nowait() == i
        with pytest.raises(RelayFull):      # wrapped to the unread "unread"
            tx.send_nowait(3)
        waiting = asyncio.ensure_future(tx.send(3))
        await spin()
        assert not waiting.done() and ints.pending == 0
        assert stalled.recv_nowait() == "unread"
        assert await waiting == 5
        for i in range(4, 7):               # room for a full ring again
            tx.send_nowait(i)
        assert await ints.recv_many(10) == [3, 4, 5, 6]
    run(main())


def test_closing_a_subscriber_releases_its_claim(relay_core):
    async def main():
        tx, rx = reliable(2)
        stalled = rx.subscribe()
        other = rx.subscribe()
        tx.send_nowait(1)
        tx.send_nowait(2)
        assert other.recv_nowait() == 1
        waiting = asyncio.ensure_future(tx.send(3))
        await spin()
        assert not waiting.done()
        stalled.close()
        assert await waiting == 3
        assert await other.recv_many(5) == [2, 3]
    run(main())


def test_garbage_collected_subscriber_releases_its_claim(relay_core):
    async def main():
        tx, rx = reliable(2)
        stalled = rx.subscribe()
        tx.send_nowait(1)
        tx.send_nowait(2)
        waiting = asyncio.ensure_future(tx.send(3))
        await spin()
        assert not waiting.done()
        del stalled
        gc.collect()
        assert await waiting == 3
    run(main())


def test_no_subscriber_means_no_backpressure(relay_core):
    async def main():
        tx, rx = reliable(1)
        for i in range(10):
            assert tx.send_nowait(i) == 2 * i + 1
            assert await tx.send(i) > 0
    run(main())


# -- forwarders share the queue --------------------------------------------------------------

def test_put_and_send_share_one_queue_in_order(relay_core):
    async def main():
        relay = Relay(1, mode="reliable")
        hub = relay._hub
        sub = relay.subscribe()
        relay.send_nowait("a")
        b = relay.send("b")
        c = asyncio.ensure_future(hub.put("c"))
        await spin()
        d = relay.send("d")
        e = asyncio.ensure_future(hub.put("e"))
        await spin()
        assert queued(b) and queued(d) and not c.done() and not e.done()
        got = [await sub.recv() for _ in range(5)]
        assert got == ["a", "b", "c", "d", "e"]
        assert (await b, await c, await d, await e) == (2, 3, 4, 5)
    run(main())


def test_put_waits_for_room_is_cancellable_and_fails_at_close(relay_core):
    async def main():
        relay = Relay(1, mode="reliable")
        hub = relay._hub
        sub = relay.subscribe()
        assert await hub.put("a") == 1      # room: written at once
        cancelled = asyncio.ensure_future(hub.put("cancelled"))
        closed = asyncio.ensure_future(hub.put("closed"))
        await spin()
        cancelled.cancel()
        await spin()
        assert not closed.done()
        relay.close()
        with pytest.raises(RelayClosed):
            await closed
        with pytest.raises(RelayClosed):
            await hub.put("late")
        assert [v async for v in sub] == ["a"]
    run(main())


def test_room_waits_for_its_turn(relay_core):
    async def main():
        observable = Relay(1)
        await observable._hub.room()        # never waits in observable mode
        relay = Relay(1, mode="reliable")
        hub = relay._hub
        sub = relay.subscribe()
        await hub.room()                    # room now
        relay.send_nowait(1)
        room = asyncio.ensure_future(hub.room())
        await spin()
        assert not room.done()
        assert sub.recv_nowait() == 1
        await room
        relay.close()
        await hub.room()                    # closed: returns at once
    run(main())


def test_many_waiting_forwarders_and_senders_all_get_through(relay_core):
    async def main():
        relay = Relay(2, mode="reliable")
        hub = relay._hub
        sub = relay.subscribe()
        puts = [asyncio.ensure_future(hub.put(("put", i))) for i in range(30)]
        sends = [relay.send(("send", i)) for i in range(30)]
        got = []
        while len(got) < 60:
            got.extend(await sub.recv_many(7))
        assert sorted(got) == sorted([("put", i) for i in range(30)]
                                     + [("send", i) for i in range(30)])
        assert [v for v in got if v[0] == "put"] == [("put", i) for i in range(30)]
        assert [v for v in got if v[0] == "send"] == [("send", i) for i in range(30)]
        await asyncio.gather(*puts)
        for s in sends:
            await s
    run(main())


# -- relay events never wait -------------------------------------------------------------------

def test_full_reliable_relay_still_reports_handler_errors(relay_core):
    async def main():
        tx, rx = reliable(2)
        stalled = rx.subscribe(int)         # keeps the ring full
        errors = rx.subscribe(RelayError)

        def boom(v):
            raise ValueError("bad %s" % v)

        rx.sink(str, boom)
        tx.send_nowait(1)
        with pytest.raises(RelayError) as info:
            await tx.send("x")              # fills the ring; the sink fails on it
        assert isinstance(info.value.error, ValueError)
        with pytest.raises(RelayFull):
            tx.send_nowait(2)
        event = await errors.recv()         # out of band: no slot needed
        assert isinstance(event, RelayError) and event.msg_id == 2
        assert event.source == "sink" and isinstance(event.error, ValueError)
        assert stalled.pending == 1
    run(main())


def test_dropped_never_happens_in_reliable_mode(relay_core):
    async def main():
        tx, rx = reliable(1)
        drops = rx.subscribe(Dropped)
        sub = rx.subscribe(int)
        for i in range(20):
            s = tx.send(i)
            if queued(s):
                assert sub.recv_nowait() == i - 1
            await s
        assert drops.pending == 0 and tx.dropped == 0
    run(main())


# -- deadlock guard ---------------------------------------------------------------------------

def test_handler_waiting_for_room_only_it_can_free_gets_relay_error(relay_core):
    async def main():
        tx, rx = reliable(2)
        go = asyncio.Event()
        outcome = asyncio.get_running_loop().create_future()
        strs = rx.subscribe(str)

        async def handle(v):
            if v == 1:
                await go.wait()
                try:
                    await tx.send("from handler")   # a str: the handler does not count it
                except RelayError as exc:
                    outcome.set_result(exc)
                else:
                    outcome.set_result(None)

        rx.sink(int, handle)
        tx.send_nowait(1)
        tx.send_nowait(2)
        third = tx.send(3)                  # queued until the handler takes 1
        while queued(third):
            await asyncio.sleep(0)
        go.set()                            # ring: [2, 3], both unread by the handler
        error = await outcome
        assert isinstance(error, RelayError) and error.source == "sink"
        assert "deadlock" in str(error.error) and "send_nowait" in str(error.error)
        assert await third == 3             # the handler goes on
        assert await strs.recv() == "from handler"  # and the queued message went in
    run(main())


def test_handler_waiting_for_room_others_hold_just_waits(relay_core):
    async def main():
        tx, rx = reliable(2)
        stalled = rx.subscribe(str)
        done = asyncio.get_running_loop().create_future()

        async def handle(v):
            done.set_result(await tx.send("y"))   # room depends on `stalled`, not on us

        rx.sink(int, handle)
        tx.send_nowait("x")
        tx.send_nowait(1)                   # ring [x, 1]; handler takes 1 -> slot of x held
        await spin()
        assert not done.done()
        assert stalled.recv_nowait() == "x"
        assert await done == 3
        assert stalled.recv_nowait() == "y"
    run(main())


# -- derived relays: forwarders and direct senders share the queue ---------------------------

def test_forwarder_and_direct_senders_into_a_full_derived_relay(relay_core):
    async def main():
        tx, rx = reliable(4)
        doubled = rx.map(int, lambda v: v * 2)      # inherits reliable mode, capacity 4
        sub = doubled.subscribe(int)
        got = []

        async def slow_reader():
            async for v in sub:
                got.append(v)
                await spin(2)

        reader = asyncio.create_task(slow_reader())

        async def direct():
            for i in range(100):
                await doubled.send(-1 - i)          # negative: sent straight into it

        sender = asyncio.create_task(direct())
        for i in range(100):
            await tx.send(i)                        # forwarded: doubled
        await sender
        while len(got) < 200:
            await asyncio.sleep(0)
        assert [v for v in got if v >= 0] == [2 * i for i in range(100)]
        assert [v for v in got if v < 0] == [-1 - i for i in range(100)]
        assert sub.dropped == 0 and doubled.dropped == 0
        tx.close()
        await reader
    run(main(), timeout=30)


def test_a_queued_write_that_raises_fails_only_its_own_send(relay_core):
    class Bad:
        pass

    class Meta(type):
        def __subclasscheck__(cls, sub):
            if sub is Bad:
                raise RuntimeError("type check failed")
            return False

    class Picky(metaclass=Meta):
        pass

    async def main():
        tx, rx = reliable(1)
        sub = rx.subscribe(int)
        picky = rx.subscribe(Picky)
        with pytest.raises(RuntimeError, match="type check failed"):
            tx.send(Bad())                  # room: written (and failing) at the call
        tx.send_nowait(0)
        first = tx.send(1)                  # the ring is full: queued
        bad = tx.send(Bad())                # queued behind; its type check will raise
        good = tx.send(2)
        assert sub.recv_nowait() == 0
        assert await first == 2
        assert sub.recv_nowait() == 1
        with pytest.raises(RuntimeError, match="type check failed"):
            await bad
        assert await good == 3              # the queue went on; bad took no id
        assert sub.recv_nowait() == 2
        assert picky.pending == 0
    run(main())


def test_two_tasks_awaiting_one_queued_send_and_one_cancels(relay_core):
    async def main():
        tx, rx = reliable(1)
        sub = rx.subscribe()
        tx.send_nowait(0)
        sent = tx.send(1)

        async def wait():
            return await sent

        first, second = asyncio.ensure_future(wait()), asyncio.ensure_future(wait())
        await spin()
        first.cancel()
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)  # nobody hangs
        assert sub.recv_nowait() == 0
        assert await tx.send(2) == 2
        assert sub.recv_nowait() == 2
    run(main())


# -- the core query behind the deadlock guard -------------------------------------------------

def test_reader_headroom(core):
    ring = core.Ring(4, True, 1, None)
    ints, strs = ring.reader(int), ring.reader(str)
    assert ints.headroom() == strs.headroom() == 4      # nothing unread
    ring.write(1)
    ring.write("a")
    assert ints.headroom() == 2         # its oldest unread (1) is 2 slots from the head
    assert strs.headroom() == 3         # its oldest unread ("a") is 1 slot from the head
    assert ints.pop() == 1
    assert ints.headroom() == 4
    ring.write(2)
    ring.write(3)
    ring.write(4)
    assert ring.write(5) == core.WRITE_FULL
    assert strs.headroom() == 0         # the ring waits for this reader alone
    assert ints.headroom() == 1
    strs.close()
    assert strs.headroom() == 4
    assert ring.write(5) > 0
