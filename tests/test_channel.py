"""The channel API (issue 2): senders, receivers, subscriptions, on both cores."""

import asyncio
import copy
import gc
import pickle
import threading
import weakref

import pytest

import pipedream
from pipedream import (DeliveryMode, Dropped, Empty, Envelope, Relay, RelayClosed,
                       RelayReceiver, RelaySender, SendError, WeakSender)

from conftest import run

pytestmark = pytest.mark.usefixtures("relay_core")


# -- construction ---------------------------------------------------------------

def test_channel_returns_sender_and_receiver():
    tx, rx = Relay.channel()
    assert isinstance(tx, RelaySender) and isinstance(rx, RelayReceiver)
    assert tx.id == rx.id
    assert not tx.closed and not rx.closed
    assert tx.handler_count == 0


def test_capacity_positional_and_mode():
    tx, rx = Relay.channel(4096)
    assert tx._hub.capacity == 4096
    tx2, _ = Relay.channel(16, mode="reliable")
    assert tx2._hub.mode is DeliveryMode.RELIABLE
    tx3, _ = Relay.channel(16, mode=DeliveryMode.OBSERVABLE)
    assert tx3._hub.mode is DeliveryMode.OBSERVABLE


@pytest.mark.parametrize("bad", [0, -1, -65536])
def test_bad_capacity_value(bad):
    with pytest.raises(ValueError, match="capacity"):
        Relay.channel(bad)


@pytest.mark.parametrize("bad", [1.5, "8", None, True, [8]])
def test_bad_capacity_type(bad):
    with pytest.raises(TypeError, match="capacity"):
        Relay.channel(bad)


def test_bad_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="observable.*reliable"):
        Relay.channel(8, mode="lossy")


def test_relay_ids_are_unique():
    ids = {Relay.channel()[0].id for _ in range(50)}
    assert len(ids) == 50


def test_sender_is_not_copyable_or_picklable():
    tx, _ = Relay.channel()
    with pytest.raises(TypeError):
        copy.copy(tx)
    with pytest.raises(TypeError):
        copy.deepcopy(tx)
    with pytest.raises(TypeError):
        pickle.dumps(tx)


@pytest.mark.parametrize("bad", [42, "str", [int], (), (int, 3)])
def test_bad_subscribe_type(bad):
    _, rx = Relay.channel()
    with pytest.raises(TypeError, match="T"):
        rx.subscribe(bad)


# -- sending and receiving ------------------------------------------------------

def test_send_returns_increasing_ids_matching_envelopes():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe(envelopes=True)
        ids = [await tx.send(i) for i in range(5)]
        ids.append(tx.send_nowait("x"))
        assert ids == sorted(ids) and len(set(ids)) == 6
        envs = [await sub.recv() for _ in range(6)]
        assert [e.msg_id for e in envs] == ids
        assert [e.value for e in envs] == [0, 1, 2, 3, 4, "x"]
        assert all(e.origin == tx.id and e.relay_id == tx.id for e in envs)
        assert isinstance(envs[0], Envelope)
    run(main())


def test_any_type_including_none():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        values = [None, 0, "", b"b", [1], {"k": 1}, object(), 1.5, Dropped]
        for v in values:
            await tx.send(v)
        got = [sub.recv_nowait() for _ in values]
        assert all(a is b for a, b in zip(got, values))
    run(main())


def test_subscriber_gets_the_object_itself():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe(list)
        payload = [1, 2]
        tx.send_nowait(payload)
        assert (await sub.recv()) is payload
    run(main())


def test_typed_subscriptions_and_subclasses():
    class Base: pass
    class Child(Base): pass

    async def main():
        tx, rx = Relay.channel()
        ints = rx.subscribe(int)
        strs = rx.subscribe(str)
        bases = rx.subscribe(Base)
        both = rx.subscribe((int, str))
        everything = rx.subscribe(object)
        c = Child()
        for v in [1, "a", c, 2.5, True]:
            tx.send_nowait(v)
        assert await ints.recv_many(10) == [1, True]     # bool is an int
        assert await strs.recv_many(10) == ["a"]
        assert await bases.recv_many(10) == [c]
        assert await both.recv_many(10) == [1, "a", True]
        assert len(await everything.recv_many(10)) == 5
    run(main())


def test_subscription_sees_only_later_messages():
    async def main():
        tx, rx = Relay.channel()
        tx.send_nowait(1)
        sub = rx.subscribe()
        tx.send_nowait(2)
        assert await sub.recv_many(10) == [2]
    run(main())


def test_order_per_subscriber():
    async def main():
        tx, rx = Relay.channel(64)
        subs = [rx.subscribe(int) for _ in range(3)]
        seen = [[] for _ in subs]

        async def consume(i):
            async for v in subs[i]:
                seen[i].append(v)
        tasks = [asyncio.ensure_future(consume(i)) for i in range(3)]
        for i in range(500):
            tx.send_nowait(i)
            if i % 7 == 0:
                await asyncio.sleep(0)
        tx.close()
        await asyncio.gather(*tasks)
        for s in seen:
            assert s == list(range(500))
    run(main())


def test_recv_nowait_empty_then_value():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        with pytest.raises(Empty):
            sub.recv_nowait()
        tx.send_nowait(5)
        assert sub.recv_nowait() == 5
    run(main())


def test_recv_many_returns_between_one_and_n():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        for i in range(10):
            tx.send_nowait(i)
        assert await sub.recv_many(4) == [0, 1, 2, 3]
        assert await sub.recv_many(100) == [4, 5, 6, 7, 8, 9]
        waiter = asyncio.ensure_future(sub.recv_many(3))
        await asyncio.sleep(0)
        assert not waiter.done()
        tx.send_nowait("late")
        assert await waiter == ["late"]
    run(main())


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.0, TypeError),
                                     ("2", TypeError)])
def test_recv_many_bad_n(bad, exc):
    async def main():
        _, rx = Relay.channel()
        with pytest.raises(exc, match="n"):
            await rx.subscribe().recv_many(bad)
    run(main())


def test_recv_many_envelopes():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe(envelopes=True)
        ids = [tx.send_nowait(v) for v in "abc"]
        envs = await sub.recv_many(10)
        assert [(e.value, e.msg_id) for e in envs] == list(zip("abc", ids))
    run(main())


def test_subscription_is_its_own_async_iterator():
    _, rx = Relay.channel()
    sub = rx.subscribe()
    assert sub.__aiter__() is sub


def test_waiting_recv_wakes_on_send_and_on_close():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        waiter = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        tx.send_nowait("hello")
        assert await waiter == "hello"
        waiter = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        tx.close()
        with pytest.raises(RelayClosed):
            await waiter
    run(main())


def test_recv_not_woken_by_other_types():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe(str)
        waiter = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        for i in range(10):
            tx.send_nowait(i)
        await asyncio.sleep(0)
        assert not waiter.done()
        tx.send_nowait("s")
        assert await waiter == "s"
    run(main())


# -- cancellation -----------------------------------------------------------------

@pytest.mark.parametrize("how", ["recv", "recv_many", "anext"])
def test_cancelled_wait_consumes_nothing(how):
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        call = {"recv": sub.recv, "recv_many": sub.recv_many,
                "anext": sub.__anext__}[how]
        waiter = asyncio.ensure_future(call())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        tx.send_nowait(1)
        assert await sub.recv() == 1
    run(main())


def test_cancel_after_wakeup_before_pop_keeps_message():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        waiter = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        tx.send_nowait("m")     # wakes the waiter: it has not run yet
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert sub.recv_nowait() == "m"
    run(main())


def test_two_tasks_on_one_subscription_each_value_once():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        got = []

        async def worker():
            try:
                while True:
                    got.append(await sub.recv())
            except RelayClosed:
                pass
        tasks = [asyncio.ensure_future(worker()) for _ in range(2)]
        await asyncio.sleep(0)
        for i in range(100):
            tx.send_nowait(i)
            await asyncio.sleep(0)
        tx.close()
        await asyncio.gather(*tasks)
        assert sorted(got) == list(range(100))
    run(main())


# -- eager send -------------------------------------------------------------------

def test_forgotten_await_still_delivers():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        tx.send("not awaited")
        assert sub.recv_nowait() == "not awaited"
    run(main())


def test_send_without_handlers_does_not_yield():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        other = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        await tx.send(1)
        # Had send() yielded to the loop, the waiting receiver would have run.
        assert not other.done()
        assert await other == 1
    run(main())


# -- close --------------------------------------------------------------------------

def test_close_then_drain_then_end():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        for i in range(3):
            tx.send_nowait(i)
        tx.close()
        assert tx.closed and rx.closed
        assert [v async for v in sub] == [0, 1, 2]
        with pytest.raises(RelayClosed):
            await sub.recv()
        with pytest.raises(RelayClosed):
            sub.recv_nowait()
        with pytest.raises(RelayClosed):
            await sub.recv_many(3)
    run(main())


def test_capacity_one_close_keeps_unread_message():
    async def main():
        tx, rx = Relay.channel(1)
        sub = rx.subscribe()
        tx.send_nowait("only")
        tx.close()
        assert [v async for v in sub] == ["only"]
        assert sub.dropped == 0
    run(main())


def test_send_after_close_raises_at_call():
    tx, rx = Relay.channel()
    weak = tx.weak()
    tx.close()
    tx.close()      # idempotent
    with pytest.raises(RelayClosed):
        tx.send(1)              # at the call, not at the await
    with pytest.raises(RelayClosed):
        tx.send_nowait(1)
    with pytest.raises(RelayClosed):
        weak.send_nowait(1)
    assert issubclass(RelayClosed, SendError)


def test_context_managers_close():
    async def main():
        with Relay.channel()[0] as tx:
            pass
        assert tx.closed
        async with Relay.channel()[0] as tx2:
            pass
        assert tx2.closed
    run(main())


def test_garbage_collected_sender_closes_relay():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        tx.send_nowait(1)
        del tx
        gc.collect()
        assert rx.closed
        assert [v async for v in sub] == [1]
    run(main())


def test_weak_sender_does_not_keep_relay_open():
    async def main():
        tx, rx = Relay.channel()
        weak = tx.weak()
        assert isinstance(weak, WeakSender)
        sub = rx.subscribe()
        await weak.send("w")
        assert weak.id == tx.id
        del tx
        gc.collect()
        assert weak.closed
        with pytest.raises(RelayClosed):
            weak.send("after")
        assert [v async for v in sub] == ["w"]
    run(main())


def test_subscribe_to_closed_relay_ends_at_once():
    async def main():
        tx, rx = Relay.channel()
        tx.close()
        sub = rx.subscribe()
        assert [v async for v in sub] == []
    run(main())


def test_closed_subscription():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        tx.send_nowait(1)
        sub.close()
        sub.close()     # idempotent
        assert sub.closed
        with pytest.raises(RelayClosed, match="subscription"):
            await sub.recv()
        with pytest.raises(RelayClosed):
            sub.recv_nowait()
        assert [v async for v in sub] == []
    run(main())


def test_closing_subscription_wakes_its_waiter():
    async def main():
        _, rx = Relay.channel()
        sub = rx.subscribe()
        waiter = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        sub.close()
        with pytest.raises(RelayClosed):
            await waiter
    run(main())


def test_subscription_context_manager():
    async def main():
        tx, rx = Relay.channel()
        with rx.subscribe(int) as sub:
            tx.send_nowait(1)
            assert sub.recv_nowait() == 1
        assert sub.closed
        async with rx.subscribe() as sub2:
            pass
        assert sub2.closed
    run(main())


def test_loopback_relay():
    async def main():
        relay = Relay()
        sub = relay.subscribe()
        assert await relay.send(1) == 1
        relay.send_nowait(2)
        relay.close()
        assert [v async for v in sub] == [1, 2]
    run(main())


# -- observable delivery: drops ------------------------------------------------------

def test_capacity_8_nine_sends_loses_only_the_oldest():
    async def main():
        tx, rx = Relay.channel(8)
        stalled = rx.subscribe(int)
        drops = rx.subscribe(Dropped)
        ids = [tx.send_nowait(i) for i in range(9)]
        assert await stalled.recv_many(100) == list(range(1, 9))   # newest survives
        assert stalled.dropped == 1
        assert tx.dropped == 1
        (d,) = await drops.recv_many(100)
        assert d == Dropped(ids[0], tx.id, "builtins.int", 1)
        assert drops.dropped == 0
    run(main())


def test_lag_never_raises_and_counts_exactly():
    async def main():
        tx, rx = Relay.channel(16)
        sub = rx.subscribe(int)
        fast = rx.subscribe(int)
        got = []
        for i in range(1000):
            tx.send_nowait(i)
            got.append(fast.recv_nowait())
        received = [v async for v in _drain(sub)]
        assert received == list(range(984, 1000))
        assert sub.dropped == 984
        assert fast.dropped == 0 and got == list(range(1000))
    run(main())


async def _drain(sub):
    while True:
        try:
            yield sub.recv_nowait()
        except (Empty, RelayClosed):
            return


def test_slow_str_subscriber_never_drops_ints():
    async def main():
        tx, rx = Relay.channel(4)
        ints = rx.subscribe(int)
        strs = rx.subscribe(str)     # never read
        for i in range(50):
            tx.send_nowait(i)
            tx.send_nowait(str(i))
            assert ints.recv_nowait() == i
        assert ints.dropped == 0
        assert strs.dropped > 0
    run(main())


def test_no_dropped_event_about_dropped():
    async def main():
        tx, rx = Relay.channel(2)
        sub = rx.subscribe()        # everything, never read: sees notices too
        for i in range(10):
            tx.send_nowait(Dropped(i, 0, "x", 1))
        events = rx.subscribe(Dropped)
        tx.send_nowait(Dropped(99, 0, "x", 1))
        tx.send_nowait(Dropped(100, 0, "x", 1))
        # The user-sent Dropped objects are ordinary messages; their loss is
        # counted but never announced.
        assert [e.msg_id for e in await events.recv_many(10)] == [99, 100]
        assert sub.dropped > 0
    run(main())


def test_unsubscribe_releases_claim():
    async def main():
        tx, rx = Relay.channel(4)
        sub = rx.subscribe()
        drops = rx.subscribe(Dropped)
        tx.send_nowait(1)
        sub.close()
        for i in range(20):
            tx.send_nowait(i)
        assert tx.dropped == 0
        with pytest.raises(Empty):
            drops.recv_nowait()
    run(main())


def test_garbage_collected_subscription_unsubscribes():
    async def main():
        tx, rx = Relay.channel(4)
        sub = rx.subscribe()
        ref = weakref.ref(sub)
        del sub
        gc.collect()
        assert ref() is None
        for i in range(20):
            tx.send_nowait(i)
        assert tx.dropped == 0
        assert tx._hub.ring.reader_count == 0
    run(main())


def test_dropped_subscriber_has_notices_bounded():
    async def main():
        tx, rx = Relay.channel(4)
        slow = rx.subscribe()        # matches ints and the Dropped events
        for i in range(100):
            tx.send_nowait(i)
        values = [v async for v in _drain(slow)]
        notices = [v for v in values if isinstance(v, Dropped)]
        ints = [v for v in values if isinstance(v, int)]
        assert len(notices) <= 4 and ints == [96, 97, 98, 99]
        # Every int lost was counted, and every notice lost too.
        assert slow.dropped == 96 + (96 - len(notices))
    run(main())


# -- threads -------------------------------------------------------------------------

def test_send_nowait_from_other_thread_wakes_subscriber():
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        waiter = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        t = threading.Thread(target=tx.send_nowait, args=("from thread",))
        t.start()
        assert await waiter == "from thread"
        t.join(5)
    run(main())


def test_core_name_is_reported():
    assert pipedream.core_name in ("cython", "python")


def test_anext_awaitable_protocol():
    # __anext__ returns an awaitable; when a message is buffered it is already
    # done (compiled core: a small done awaitable, no coroutine).
    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe()
        for v in [(1, 2), None, StopIteration]:
            tx.send_nowait(v)
        assert await sub.__anext__() == (1, 2)          # a tuple stays a tuple
        assert await sub.__anext__() is None
        step = sub.__anext__().__await__()
        with pytest.raises(StopIteration) as stop:      # the plain iterator protocol
            next(step)
        assert stop.value.value is StopIteration
        tx.close()
        with pytest.raises(StopAsyncIteration):
            await sub.__anext__()
    run(main())


@pytest.mark.parametrize("variant", ["built", "python"])
def test_anext_takes_nothing_until_awaited(variant):
    # An __anext__() never awaited, or cancelled before it ran, consumes
    # nothing: with the compiled awaitable and with the pure-Python method.
    from pipedream.subscription import Subscription
    anext = Subscription.__anext__ if variant == "built" else Subscription._anext_py

    async def main():
        tx, rx = Relay.channel()
        sub = rx.subscribe(int)
        for i in range(3):
            tx.send_nowait(i)
        pending = anext(sub)                  # never awaited
        task = asyncio.ensure_future(anext(sub))
        task.cancel()                         # cancelled before its first step
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(sub), 0)
        assert sub.pending == 3
        assert [await anext(sub) for _ in range(3)] == [0, 1, 2]
        if hasattr(pending, "close"):
            pending.close()
    run(main())
