"""Tracked handlers (sink, tap), within, completion tracking, errors, never hang.

Every test runs on both cores (``relay_core``) and every async test through
``run(..., timeout)`` so that a hang fails instead of blocking the suite.
No timing assertions: order, counts, events and identities only.
"""

import asyncio
import contextvars
import functools
import gc
import logging
import threading
import warnings

import pytest

from conftest import run
from pipedream import Dropped, HandlerDetached, Relay, RelayClosed, RelayError
from pipedream import handlers as handlers_module
from pipedream import Handler

pytestmark = pytest.mark.usefixtures("relay_core")


# -- helpers --------------------------------------------------------------------

def record_loop_errors():
    """Route the running loop's exception handler into a list (for 'no noise')."""
    calls = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: calls.append(ctx))
    return calls


def drain_nowait(sub):
    out = []
    while True:
        try:
            out.append(sub.recv_nowait())
        except Exception:
            return out


async def until(predicate, limit=2000):
    """Yield to the loop until ``predicate()`` holds (bounded by ``run``'s timeout)."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    while not predicate():
        await asyncio.sleep(0.001)


def handler_task(tx, handler):
    """The task of ``handler`` (internal: the deadlock guard's table)."""
    for task, h in tx._hub.tasks.items():
        if h is handler:
            return task
    return None


class LoopThread:
    """An event loop in another thread, ended with ``asyncio.run``'s shutdown."""

    def __enter__(self):
        started = threading.Event()

        def target():
            async def main():
                self.loop = asyncio.get_running_loop()
                self.stop = asyncio.Event()
                self.errors = record_loop_errors()
                started.set()
                await self.stop.wait()
            asyncio.run(main())

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert started.wait(5)
        return self

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on that loop (inside a coroutine) and return its result."""
        async def call():
            return fn(*args)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.loop))

    def close(self):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop.set)
            self.thread.join(5)

    def __exit__(self, *exc):
        self.close()


# -- completion -----------------------------------------------------------------

def test_send_waits_for_a_sync_sink():
    async def main():
        tx, rx = Relay.channel()
        seen = []
        handler = rx.sink(int, seen.append)
        assert isinstance(handler, Handler)
        ids = [await tx.send(i) for i in range(5)]
        assert seen == [0, 1, 2, 3, 4]
        assert ids == sorted(ids) and len(set(ids)) == 5
    run(main())


def test_send_waits_for_an_async_sink():
    async def main():
        tx, rx = Relay.channel()
        seen = []

        async def slow(x):
            for _ in range(5):
                await asyncio.sleep(0)
            seen.append(x)
        rx.sink(int, slow)
        for i in range(3):
            await tx.send(i)
            assert seen == list(range(i + 1))
    run(main())


def test_wrong_type_handlers_are_neither_waited_for_nor_called():
    async def main():
        tx, rx = Relay.channel()
        never = asyncio.Event()
        calls = []

        async def blocked(x):
            calls.append(x)
            await never.wait()
        rx.sink(int, blocked)
        rx.sink(bytes, calls.append)
        await tx.send("text")       # would hang if the int sink were counted
        await tx.send(1.5)
        await asyncio.sleep(0)
        assert calls == []
    run(main())


def test_tap_returns_the_receiver_for_chaining():
    async def main():
        tx, rx = Relay.channel()
        ints, strs = [], []
        assert rx.tap(int, ints.append).tap(str, strs.append) is rx
        assert tx.handler_count == 2
        await tx.send(1)
        await tx.send("a")
        assert ints == [1] and strs == ["a"]
    run(main())


def test_handler_count_follows_live_tracked_handlers():
    async def main():
        tx, rx = Relay.channel()
        assert tx.handler_count == 0
        a = rx.sink(int, lambda x: None)
        rx.tap(str, lambda x: None)
        rx.subscribe(int)           # untracked: not counted
        assert tx.handler_count == 2
        a.close()
        assert a.closed and tx.handler_count == 1
        await tx.aclose()
        assert tx.handler_count == 0
    run(main())


def test_subclasses_and_tuples_match():
    async def main():
        tx, rx = Relay.channel()
        seen = []
        rx.sink((int, str), seen.append)
        await tx.send(True)         # bool is an int
        await tx.send("s")
        await tx.send(1.0)
        assert seen == [True, "s"]
    run(main())


def test_send_nowait_reaches_handlers_without_waiting():
    async def main():
        tx, rx = Relay.channel()
        gate = asyncio.Event()
        seen = []

        async def slow(x):
            await gate.wait()
            seen.append(x)
        rx.sink(int, slow)
        tx.send_nowait(1)
        tx.send_nowait(2)
        assert seen == []
        gate.set()
        await until(lambda: seen == [1, 2])
    run(main())


def test_a_lambda_sink_survives_garbage_collection():
    async def main():
        tx, rx = Relay.channel()
        box = []
        rx.sink(int, lambda x: box.append(x))   # the Handler object is dropped too
        gc.collect()
        await tx.send(7)
        assert box == [7]
    run(main())


def test_sync_fn_returning_an_awaitable_is_awaited():
    async def main():
        tx, rx = Relay.channel()
        done = []

        async def later(x):
            await asyncio.sleep(0)
            done.append(x)
        rx.sink(int, lambda x: later(x))
        await tx.send(1)
        assert done == [1]
        await tx.send(2)
        assert done == [1, 2]
    run(main())


def test_async_callables_are_detected():
    async def main():
        tx, rx = Relay.channel()
        done = []

        class Callable:
            async def __call__(self, x):
                await asyncio.sleep(0)
                done.append(("obj", x))

        async def tagged(tag, x):
            await asyncio.sleep(0)
            done.append((tag, x))
        rx.sink(int, Callable(), timeout=5)             # timeout= accepted: it is async
        rx.sink(int, functools.partial(tagged, "partial"), timeout=5)
        await tx.send(1)
        assert sorted(done) == [("obj", 1), ("partial", 1)]
    run(main())


# -- snapshot and wiring --------------------------------------------------------

def test_concurrent_sends_right_after_registration_are_all_counted():
    async def main():
        tx, rx = Relay.channel()
        seen = []

        async def sink(x):
            await asyncio.sleep(0)
            seen.append(x)
        rx.sink(int, sink)
        sends = [tx.send(i) for i in range(50)]             # no await in between
        await asyncio.gather(*sends)
        assert seen == list(range(50))
        ids = await asyncio.gather(*(tx.send(i) for i in range(50, 100)))
        assert seen == list(range(100)) and len(set(ids)) == 50
    run(main())


def test_a_handler_registered_after_a_send_is_not_counted_for_it():
    async def main():
        tx, rx = Relay.channel()
        gate = asyncio.Event()
        first, late = [], []

        async def slow(x):
            await gate.wait()
            first.append(x)
        rx.sink(int, slow)
        sent = tx.send(1)                   # written now, counts only `slow`
        rx.sink(int, late.append)
        gate.set()
        await sent
        assert first == [1] and late == []
        await tx.send(2)
        assert first == [1, 2] and late == [2]
    run(main())


def test_a_handler_added_mid_dispatch_starts_with_the_next_message():
    async def main():
        tx, rx = Relay.channel()
        added = []

        def adder(x):
            if x == 1:
                rx.sink(int, added.append)
        rx.sink(int, adder)
        await tx.send(1)
        assert added == []
        await tx.send(2)
        assert added == [2]
    run(main())


def test_a_handler_closed_mid_dispatch_releases_what_it_counted():
    async def main():
        tx, rx = Relay.channel()
        errors = rx.subscribe(RelayError)
        victim_seen = []
        box = {}

        def closer(x):
            if x == 1:
                box["victim"].close()
        rx.sink(int, closer)
        box["victim"] = rx.sink(int, victim_seen.append)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert isinstance(info.value.error, HandlerDetached)
        assert info.value.error.handler is box["victim"]
        assert info.value.error.reason == "closed"
        assert victim_seen == []
        assert await tx.send(2) > 0
        assert victim_seen == [] and tx.handler_count == 1
        assert drain_nowait(errors) == []       # detaching is not a failure
    run(main())


# -- errors ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("source", ["sink", "tap"])
def test_errors_reach_the_sender_and_the_relay(kind, source):
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        boom = ValueError("boom")
        seen = []

        def sync_fn(x):
            seen.append(x)
            if x == 2:
                raise boom

        async def async_fn(x):
            await asyncio.sleep(0)
            sync_fn(x)
        fn = sync_fn if kind == "sync" else async_fn
        getattr(rx, source)(int, fn)
        ok = await tx.send(1)
        sent = tx.send(2)
        with pytest.raises(RelayError) as info:
            await sent
        err = info.value
        assert err.msg_id == sent.msg_id == ok + 1
        assert err.source == source
        assert err.error is boom and err.__cause__ is boom
        event = events.recv_nowait()
        assert event.msg_id == err.msg_id and event.source == source and event.error is boom
        # the handler survives its own error
        assert await tx.send(3) == ok + 2
        assert seen == [1, 2, 3]
        assert drain_nowait(events) == []
    run(main())


def test_first_error_wins_sync():
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)

        def fail(tag):
            def fn(x):
                raise RuntimeError(tag)
            return fn
        rx.sink(int, fail("first"))
        rx.sink(int, fail("second"))
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert str(info.value.error) == "first"
        assert sorted(str(e.error) for e in drain_nowait(events)) == ["first", "second"]
    run(main())


def test_first_error_wins_is_first_in_time():
    async def main():
        tx, rx = Relay.channel()
        early_failed = asyncio.Event()

        async def late(x):
            await early_failed.wait()
            raise RuntimeError("late")

        async def early(x):
            early_failed.set()
            raise RuntimeError("early")
        rx.sink(int, late)          # registered first, fails second
        rx.sink(int, early)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert str(info.value.error) == "early"
    run(main())


def test_send_raises_only_after_every_counted_handler_finished():
    async def main():
        tx, rx = Relay.channel()
        gate = asyncio.Event()
        finished = []

        def fail(x):
            raise ValueError(x)

        async def slow(x):
            await gate.wait()
            finished.append(x)
        rx.sink(int, fail)
        rx.sink(int, slow)
        task = asyncio.ensure_future(tx.send(1))
        await asyncio.sleep(0)
        assert not task.done()
        gate.set()
        with pytest.raises(RelayError):
            await task
        assert finished == [1]
    run(main())


def test_a_handler_failing_on_a_relay_event_is_logged_not_republished(caplog):
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        seen = []

        def fail_int(x):
            raise ValueError("int")

        def fail_event(event):
            seen.append(event)
            raise ValueError("event")
        rx.sink(int, fail_int)
        rx.sink(RelayError, fail_event)
        with pytest.raises(RelayError):
            await tx.send(1)
        await until(lambda: seen)
        await asyncio.sleep(0)
        assert len(drain_nowait(events)) == 1       # no error about the error
        assert len(seen) == 1
    with caplog.at_level(logging.ERROR, logger="pipedream"):
        run(main())
    assert any("relay event" in r.getMessage() for r in caplog.records)


class Stop(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt)."""


def test_base_exceptions_propagate_inline_and_release_sends():
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)

        def fn(x):
            raise Stop()
        handler = rx.sink(int, fn)
        with pytest.raises(Stop):
            tx.send(1)              # ran inline, in the sender's call
        assert handler.closed and tx.handler_count == 0
        await tx.send(2)            # no longer counted
        assert drain_nowait(events) == []
    run(main())


def test_base_exceptions_in_the_task_are_not_swallowed():
    async def main():
        errors = record_loop_errors()
        tx, rx = Relay.channel()

        async def fn(x):
            await asyncio.sleep(0)
            raise Stop()
        handler = rx.sink(int, fn)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert isinstance(info.value.error, Stop)
        await until(lambda: errors)
        assert isinstance(errors[0]["exception"], Stop)
        assert handler.closed
        await tx.send(2)
    run(main())


# -- within ---------------------------------------------------------------------

def test_within_errors_are_published():
    async def main():
        loop_errors = record_loop_errors()
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        boom = KeyError("k")

        async def worker():
            await asyncio.sleep(0)
            raise boom
        task = rx.within(worker)
        assert isinstance(task, asyncio.Task)
        event = await events.recv()
        assert event.source == "within" and event.msg_id == 0 and event.error is boom
        with pytest.raises(KeyError):
            await task
        del task
        gc.collect()
        assert loop_errors == []
    run(main())


def test_within_forgotten_task_reports_without_noise():
    async def main():
        loop_errors = record_loop_errors()
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)

        async def worker():
            raise ValueError("v")
        rx.within(worker)           # task dropped at once: still runs, still reported
        gc.collect()
        event = await events.recv()
        assert isinstance(event.error, ValueError)
        gc.collect()
        await asyncio.sleep(0)
        assert loop_errors == []
    run(main())


def test_within_cancellation_is_not_a_failure():
    async def main():
        loop_errors = record_loop_errors()
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        task = rx.within(asyncio.Event().wait)
        ok = rx.within(asyncio.sleep(0, result="done"))     # a coroutine object works too
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await ok == "done"
        assert drain_nowait(events) == []
        assert loop_errors == []
    run(main())


def test_within_rejects_non_async_functions():
    async def main():
        tx, rx = Relay.channel()
        with pytest.raises(TypeError, match="async_fn"):
            rx.within(42)
        with pytest.raises(TypeError, match="async_fn"):
            rx.within(lambda: None)
    run(main())


# -- detach, cancel, close: never hang -----------------------------------------

def test_close_releases_in_flight_and_queued_sends():
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        started = asyncio.Event()
        cancelled = []

        async def blocked(x):
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(x)
                raise
        handler = rx.sink(int, blocked)
        first = asyncio.ensure_future(tx.send(1))
        queued = [asyncio.ensure_future(tx.send(i)) for i in (2, 3)]
        await started.wait()
        handler.close()
        handler.close()             # idempotent
        for task in [first] + queued:
            with pytest.raises(RelayError) as info:
                await task
            assert isinstance(info.value.error, HandlerDetached)
            assert info.value.error.reason == "closed"
            assert info.value.source == "sink"
        await until(lambda: cancelled)
        assert cancelled == [1]     # the in-flight call was cancelled, nothing else ran
        assert handler.closed and tx.handler_count == 0
        assert drain_nowait(events) == []
        assert await tx.send(4) > 0
    run(main())


def test_close_from_another_thread():
    async def main():
        tx, rx = Relay.channel()
        started = asyncio.Event()

        async def blocked(x):
            started.set()
            await asyncio.Event().wait()
        handler = rx.sink(int, blocked)
        sends = [asyncio.ensure_future(tx.send(i)) for i in range(3)]
        await started.wait()
        threads = [threading.Thread(target=handler.close) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        for task in sends:
            with pytest.raises(RelayError) as info:
                await task
            assert isinstance(info.value.error, HandlerDetached)
        assert tx.handler_count == 0
    run(main())


def test_a_sync_handler_closing_itself_releases_its_message():
    async def main():
        tx, rx = Relay.channel()
        box = {}
        seen = []

        def fn(x):
            seen.append(x)
            box["h"].close()
        box["h"] = rx.sink(int, fn)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert isinstance(info.value.error, HandlerDetached)
        await tx.send(2)
        assert seen == [1]
    run(main())


def test_close_before_the_task_awaits_a_handed_over_awaitable():
    async def main():
        tx, rx = Relay.channel()
        ran = []

        async def later(x):
            ran.append(x)
        box = {}

        def fn(x):
            box["h"].close()        # detached while its awaitable is pending
            return later(x)
        box["h"] = rx.sink(int, fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RelayError) as info:
                await tx.send(1)
            assert isinstance(info.value.error, HandlerDetached)
            await until(lambda: not tx._hub.tasks)
            gc.collect()
        assert ran == []
        assert [w for w in caught if "never awaited" in str(w.message)] == []
    run(main())


def test_cancelling_the_handler_task_detaches_it():
    async def main():
        loop_errors = record_loop_errors()
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        started = asyncio.Event()

        async def blocked(x):
            started.set()
            await asyncio.Event().wait()
        handler = rx.sink(int, blocked)
        sends = [asyncio.ensure_future(tx.send(i)) for i in range(3)]
        await started.wait()
        handler_task(tx, handler).cancel()
        for task in sends:
            with pytest.raises(RelayError) as info:
                await task
            assert info.value.error.reason == "cancelled"
        await until(lambda: not tx._hub.tasks)
        assert handler.closed and tx.handler_count == 0
        assert drain_nowait(events) == []
        assert loop_errors == []
    run(main())


def test_relay_close_lets_handlers_drain_what_they_counted():
    async def main():
        tx, rx = Relay.channel()
        gate = asyncio.Event()
        seen = []

        async def slow(x):
            await gate.wait()
            seen.append(x)
        handler = rx.sink(int, slow)
        sends = [asyncio.ensure_future(tx.send(i)) for i in range(4)]
        await asyncio.sleep(0)
        tx.close()
        with pytest.raises(RelayClosed):
            tx.send(9)
        gate.set()
        assert await asyncio.gather(*sends) == [1, 2, 3, 4]
        assert seen == [0, 1, 2, 3]
        await until(lambda: handler.closed)
        assert tx.handler_count == 0
    run(main())


def test_a_sender_on_another_loop_gets_detached_when_the_handler_loop_ends():
    async def main():
        with LoopThread() as other:
            tx, rx = Relay.channel()
            started = threading.Event()

            async def blocked(x):
                started.set()
                await asyncio.Event().wait()
            await other.call(rx.sink, int, blocked)
            sends = [asyncio.ensure_future(tx.send(i)) for i in range(2)]
            await asyncio.sleep(0)
            other.close()           # asyncio.run in that thread cancels the handler
            for task in sends:
                with pytest.raises(RelayError) as info:
                    await task
                assert isinstance(info.value.error, HandlerDetached)
            assert started.is_set()
            assert tx.handler_count == 0
            assert other.errors == []
    run(main())


def test_a_closed_handler_loop_never_makes_sends_hang(caplog):
    tx, rx = Relay.channel()
    loop = asyncio.new_event_loop()
    seen = []

    async def register():
        return rx.sink(int, seen.append)
    handler = loop.run_until_complete(asyncio.wait_for(register(), 10))
    loop.close()                    # its task never ran; nothing will run there again

    async def main():
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert info.value.error.reason == "loop closed"
        assert handler.closed and tx.handler_count == 0
        assert await tx.send(2) > 0
    with caplog.at_level(logging.WARNING):
        run(main())
        del handler
        gc.collect()
    assert seen == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- no noise -------------------------------------------------------------------

def test_closing_or_cancelling_while_handlers_are_busy_makes_no_noise(caplog):
    loop_errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: loop_errors.append(ctx))
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        started = asyncio.Event()

        async def busy(x):
            started.set()
            await asyncio.sleep(3600)
        rx.sink(int, busy)
        rx.tap(int, lambda x: None)
        sender = asyncio.ensure_future(tx.send(1))
        await started.wait()
        sender.cancel()             # the sender stops waiting; not a failure
        with pytest.raises(asyncio.CancelledError):
            await sender
        tx.send_nowait(2)
        tx.close()                  # handlers busy: they drain (the run ends first)
        assert drain_nowait(events) == []
        # leaving: asyncio.run cancels the busy handler; that is no failure either
    with caplog.at_level(logging.DEBUG):
        run(main())
    gc.collect()
    assert loop_errors == []
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == []


# -- deadlock guard -------------------------------------------------------------

def test_the_deadlock_guard_fires_at_once():
    async def main():
        tx, rx = Relay.channel()
        caught = []
        seen = []

        async def loops_back(x):
            seen.append(x)
            if x == 1:
                try:
                    await tx.send(2)        # it would have to handle 2 itself
                except RelayError as exc:
                    caught.append(exc)
        rx.sink(int, loops_back)
        await tx.send(1)
        assert len(caught) == 1
        err = caught[0]
        text = str(err.error)
        assert "deadlock" in text and "forward" in text and "send_nowait" in text
        await until(lambda: seen == [1, 2])     # written already: it still arrives
    run(main())


def test_the_deadlock_guard_error_reaches_the_outer_send_when_not_caught():
    async def main():
        tx, rx = Relay.channel()

        async def loops_back(x):
            if x == 1:
                await tx.send(2)
        rx.sink(int, loops_back)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        inner = info.value.error
        assert isinstance(inner, RelayError) and "deadlock" in str(inner.error)
    run(main())


def test_the_deadlock_guard_allows_its_neighbours():
    async def main():
        tx, rx = Relay.channel()
        other_tx, other_rx = Relay.channel()
        forwarded, strs, ints = [], [], []
        other_rx.sink(int, forwarded.append)
        rx.sink(str, strs.append)

        async def neighbour(x):
            ints.append(x)
            if x == 1:
                await other_tx.send(10)     # another relay: fine
                tx.send_nowait(2)           # send_nowait on its own relay: fine
                await tx.send("s")          # a type it does not take: fine
                tx.send(3)                  # forgotten await: delivered, no warning
        rx.sink(int, neighbour)
        await tx.send(1)
        assert forwarded == [10] and strs == ["s"]
        await until(lambda: ints == [1, 2, 3])
    run(main())


# -- fast path (inline) and task path ---------------------------------------------

def test_inline_path_runs_in_the_senders_call():
    async def main():
        tx, rx = Relay.channel()
        where = []
        rx.sink(int, lambda x: where.append(asyncio.current_task()))
        me = asyncio.current_task()
        tx.send(1)                  # not awaited: already handled
        assert where == [me]
        await tx.send(2)
        assert where == [me, me]
    run(main())


def test_inline_path_with_a_loop_that_is_not_an_asyncio_base_loop():
    async def main():
        tx, rx = Relay.channel()
        where = []
        handler = rx.sink(int, lambda x: where.append(asyncio.current_task()))
        handler._loop_has_thread_id = False     # as for a third-party loop
        await tx.send(1)
        assert where == [asyncio.current_task()]
    run(main())


def test_a_send_on_the_handler_thread_with_its_loop_stopped_waits_for_the_loop():
    tx, rx = Relay.channel()
    loop = asyncio.new_event_loop()
    seen = []

    async def register():
        return rx.sink(int, seen.append)
    try:
        handler = loop.run_until_complete(asyncio.wait_for(register(), 10))
        tx.send_nowait(1)       # same thread, loop not running: not run here
        assert seen == []
        loop.run_until_complete(asyncio.wait_for(until(lambda: seen), 10))
        assert seen == [1]
        tx.close()
        loop.run_until_complete(asyncio.wait_for(until(lambda: handler.closed), 10))
    finally:
        tx.close()
        loop.close()


def test_task_path_for_sends_from_another_thread():
    async def main():
        tx, rx = Relay.channel()
        where = []
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        handler = rx.sink(int, lambda x: (where.append((x, asyncio.current_task())),
                                          x == 2 and loop.call_soon(done.set)))
        thread = threading.Thread(target=lambda: [tx.send_nowait(i) for i in (1, 2)])
        thread.start()
        await done.wait()
        thread.join()
        task = handler_task(tx, handler)
        assert [x for x, _ in where] == [1, 2]
        assert all(t is task for _, t in where)
    run(main())


def test_task_path_while_the_handler_is_busy_keeps_order_and_errors():
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        gate = asyncio.Event()
        where = []
        me = asyncio.current_task()

        def fn(x):
            where.append((x, asyncio.current_task() is me))
            if x == 1:
                return gate.wait()          # an awaitable: the task finishes it
            if x == 3:
                raise ValueError(3)
        handler = rx.sink(int, fn)
        first = tx.send(1)                  # inline, handed to the task
        queued = [tx.send(i) for i in (2, 3, 4)]    # backlog: the task runs them
        gate.set()
        await first
        await queued[0]
        with pytest.raises(RelayError) as info:
            await queued[1]
        assert info.value.msg_id == queued[1].msg_id
        await queued[2]
        assert [x for x, _ in where] == [1, 2, 3, 4]
        assert where[0][1] and not any(inline for _, inline in where[1:])
        assert [e.msg_id for e in drain_nowait(events)] == [queued[1].msg_id]
        # back to idle: the next send runs inline again
        await until(lambda: handler._busy is False)
        await tx.send(5)
        assert where[-1] == (5, True)
    run(main())


def test_a_self_feeding_handler_hands_over_to_its_task():
    async def main():
        tx, rx = Relay.channel()
        seen = []
        me = asyncio.current_task()

        def fn(x):
            seen.append((x, asyncio.current_task() is me))
            if x < 200:
                tx.send_nowait(x + 1)
        rx.sink(int, fn)
        tx.send(0)                  # the sender's call does not run all 201 messages
        inline_count = len(seen)
        assert 0 < inline_count < 201
        await until(lambda: len(seen) == 201)
        assert [x for x, _ in seen] == list(range(201))
        assert not any(inline for _, inline in seen[inline_count:])
    run(main())


CV = contextvars.ContextVar("CV", default="unset")
COUNT = contextvars.ContextVar("COUNT", default=0)


def test_contextvars_are_the_same_on_both_paths():
    async def main():
        CV.set("registered")
        tx, rx = Relay.channel()
        seen = []
        me = asyncio.current_task()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def fn(x):
            COUNT.set(COUNT.get() + 1)
            seen.append((x, CV.get(), COUNT.get(), asyncio.current_task() is me))
            if x == 4:
                loop.call_soon_threadsafe(done.set)
        rx.sink(int, fn)
        CV.set("changed after")
        await tx.send(1)                                    # inline
        t = threading.Thread(target=tx.send_nowait, args=(2,))  # task path
        t.start()
        t.join()
        await until(lambda: len(seen) == 2)
        await tx.send(3)                                    # inline again
        t = threading.Thread(target=tx.send_nowait, args=(4,))
        t.start()
        t.join()
        await done.wait()
        assert seen == [(1, "registered", 1, True), (2, "registered", 2, False),
                        (3, "registered", 3, True), (4, "registered", 4, False)]
        assert COUNT.get() == 0 and CV.get() == "changed after"   # sender untouched
    run(main())


def test_contextvars_of_async_handlers_persist_between_calls():
    async def main():
        CV.set("registered")
        tx, rx = Relay.channel()
        seen = []

        async def fn(x):
            await asyncio.sleep(0)
            COUNT.set(COUNT.get() + 1)
            seen.append((CV.get(), COUNT.get()))
        rx.sink(int, fn, timeout=30)
        CV.set("later")
        await tx.send(1)
        await tx.send(2)
        assert seen == [("registered", 1), ("registered", 2)]
    run(main())


def test_inline_and_task_paths_report_errors_the_same_way():
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        boom = ValueError("boom")
        loop = asyncio.get_running_loop()

        def fn(x):
            raise boom
        rx.sink(int, fn)
        with pytest.raises(RelayError) as inline:
            await tx.send(1)                # inline

        other_error = []

        def from_other_loop():
            async def send():
                try:
                    await tx.send(2)
                except RelayError as exc:
                    other_error.append(exc)
            asyncio.run(send())
        t = threading.Thread(target=from_other_loop)
        t.start()
        await loop.run_in_executor(None, t.join)
        (task_path,) = other_error
        for err, msg_id in ((inline.value, 1), (task_path, 2)):
            assert (err.msg_id, err.source, err.error) == (msg_id, "sink", boom)
        assert [(e.msg_id, e.error) for e in drain_nowait(events)] == [(1, boom), (2, boom)]
    run(main())


# -- loops and threads ---------------------------------------------------------------

def test_completion_across_loops():
    async def main():
        with LoopThread() as other:
            tx, rx = Relay.channel()
            where = []

            def fn(x):
                where.append((x, threading.get_ident()))
            handler = await other.call(rx.sink, int, fn)
            assert tx.handler_count == 1
            for i in range(3):
                assert await tx.send(i) == i + 1
                assert where[-1][0] == i            # done before send() returned
            assert {ident for _, ident in where} == {other.thread.ident}

            async def fail(x):
                raise ValueError(x)
            await other.call(rx.tap, str, fail)
            with pytest.raises(RelayError) as info:
                await tx.send("s")
            assert info.value.source == "tap"
            handler.close()
        assert other.errors == []
    run(main())


def test_registering_needs_a_running_loop():
    tx, rx = Relay.channel()
    with pytest.raises(RuntimeError, match="running event loop"):
        rx.sink(int, print)
    with pytest.raises(RuntimeError, match="running event loop"):
        rx.within(asyncio.sleep(0))
    assert tx.handler_count == 0


def test_a_handler_on_a_closed_relay_is_closed_at_once():
    async def main():
        tx, rx = Relay.channel()
        tx.close()
        handler = rx.sink(int, print)
        assert handler.closed and tx.handler_count == 0
        await tx.aclose()
    run(main())


# -- observable mode lag ----------------------------------------------------------

def test_a_lagging_tracked_handler_never_makes_sends_hang():
    async def main():
        tx, rx = Relay.channel(4)
        drops = rx.subscribe(Dropped)
        gate = asyncio.Event()
        started = asyncio.Event()
        seen = []

        async def slow(x):
            started.set()
            await gate.wait()
            seen.append(x)
        rx.sink(int, slow)
        first = tx.send(0)
        await started.wait()                # 0 is in flight, off the ring
        rest = [tx.send(i) for i in range(1, 20)]
        gate.set()
        ids = [await first] + [await s for s in rest]
        assert len(ids) == 20
        assert seen == [0, 16, 17, 18, 19]
        assert tx.dropped == 15             # messages 2..16, lost by the handler alone
        lost = drain_nowait(drops)          # (this subscription keeps the newest 4)
        assert len(lost) + drops.dropped == 15
        assert [d.msg_id for d in lost] == list(range(17 - len(lost), 17))
        assert all(d.subscribers == 1 for d in lost)
    run(main())


# -- aclose -------------------------------------------------------------------------

def test_aclose_waits_for_slow_handlers():
    async def main():
        tx, rx = Relay.channel()
        seen = []

        async def slow(x):
            for _ in range(10):
                await asyncio.sleep(0)
            seen.append(x)
        handler = rx.sink(int, slow)
        for i in range(5):
            tx.send_nowait(i)
        await tx.aclose()
        assert seen == [0, 1, 2, 3, 4]
        assert handler.closed and tx.handler_count == 0
    run(main())


def test_aclose_completes_after_handler_failures():
    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)

        async def fail(x):
            await asyncio.sleep(0)
            raise ValueError(x)
        rx.sink(int, fail)
        rx.tap(int, lambda x: 1 / 0)
        for i in range(10):
            tx.send_nowait(i)
        async with tx:
            pass
        assert len(drain_nowait(events)) == 20
    run(main())


def test_aclose_does_not_wait_for_detached_handlers():
    async def main():
        tx, rx = Relay.channel()
        started = asyncio.Event()

        async def stuck(x):
            started.set()
            await asyncio.Event().wait()
        handler = rx.sink(int, stuck)
        tx.send_nowait(1)
        await started.wait()
        handler.close()
        await tx.aclose()
    run(main())


def test_a_handler_may_aclose_its_own_relay():
    async def main():
        tx, rx = Relay.channel()
        seen, others = [], []

        async def closer(x):
            seen.append(x)
            if x == 1:
                await tx.aclose()       # does not wait for this very call
        handler = rx.sink(int, closer)
        rx.tap(int, others.append)
        tx.send_nowait(1)
        tx.send_nowait(2)               # sent before the close: still handled
        await until(lambda: handler.closed)
        assert seen == [1, 2] and others == [1, 2]
        assert tx.closed and tx.handler_count == 0
    run(main())


def test_aclose_waits_for_handlers_on_other_loops():
    async def main():
        with LoopThread() as other:
            tx, rx = Relay.channel()
            seen = []
            await other.call(rx.sink, int, seen.append)
            for i in range(3):
                tx.send_nowait(i)
            await tx.aclose()
            assert seen == [0, 1, 2] and tx.handler_count == 0
    run(main())


# -- timeout ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["default", "cancel_timer"])
def test_timeout_cancels_the_call_and_fails_the_send(impl, monkeypatch):
    if impl == "cancel_timer":
        monkeypatch.setattr(handlers_module, "_await_with_timeout",
                            handlers_module._await_with_cancel_timer)

    async def main():
        tx, rx = Relay.channel()
        events = rx.subscribe(RelayError)
        log = []

        async def slow(x):
            if x == 1:
                try:
                    await asyncio.sleep(3600)
                    log.append("finished")
                except asyncio.CancelledError:
                    log.append("cancelled")
                    raise
            log.append(x)
        rx.sink(int, slow, timeout=0.05)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert isinstance(info.value.error, TimeoutError)
        assert "timeout" in str(info.value.error)
        assert log == ["cancelled"]
        assert await tx.send(2) == 2        # the handler goes on
        assert log == ["cancelled", 2]
        assert [e.msg_id for e in drain_nowait(events)] == [1]
    run(main())


def test_a_timeout_error_raised_by_fn_itself_is_kept():
    async def main():
        tx, rx = Relay.channel()
        own = TimeoutError("mine")

        async def fn(x):
            raise own
        rx.sink(int, fn, timeout=30)
        with pytest.raises(RelayError) as info:
            await tx.send(1)
        assert info.value.error is own
    run(main())


# -- arguments ----------------------------------------------------------------------------

def test_bad_arguments_name_the_argument():
    async def main():
        tx, rx = Relay.channel()

        async def afn(x):
            pass
        with pytest.raises(TypeError, match="timeout"):
            rx.sink(int, print, timeout=1)
        for bad in (0, -1, float("nan")):
            with pytest.raises(ValueError, match="timeout"):
                rx.sink(int, afn, timeout=bad)
        for bad in ("1", True, [1]):
            with pytest.raises(TypeError, match="timeout"):
                rx.sink(int, afn, timeout=bad)
        for bad in (42, None, "fn"):
            with pytest.raises(TypeError, match="fn"):
                rx.sink(int, bad)
            with pytest.raises(TypeError, match="fn"):
                rx.tap(int, bad)
        for bad in (42, "int", (), (int, 3)):
            with pytest.raises(TypeError, match="T"):
                rx.sink(bad, print)
        assert tx.handler_count == 0
        assert not tx._hub.tasks
    run(main())


def test_handler_repr_names_source_type_and_function():
    async def main():
        tx, rx = Relay.channel()

        def on_int(x):
            pass
        handler = rx.sink(int, on_int)
        assert "sink(int, " in str(handler) and "on_int" in str(handler)
        assert "relay %d" % tx.id in str(handler)
        handler.close()
        assert "closed" in repr(handler)
    run(main())


class _Stop(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt)."""


def test_base_exception_inline_does_not_strand_parked_subscribers(relay_core):
    # The sink runs inline inside send() and raises a BaseException: it
    # propagates to the sender, but every other reader woken by that write is
    # still woken (none is left parked with its message unread).
    async def main():
        tx, rx = Relay.channel()

        def explode(value):
            raise _Stop()
        rx.sink(int, explode)           # its reader comes first: woken first
        await asyncio.sleep(0)
        sub = rx.subscribe(int)
        waiting = asyncio.ensure_future(sub.recv())
        await asyncio.sleep(0)
        with pytest.raises(_Stop):
            tx.send(0)                  # send() runs the idle sync sink inline
        assert await waiting == 0
    run(main())


def test_send_nowait_never_runs_a_handler_in_the_callers_call(relay_core):
    async def main():
        tx, rx = Relay.channel()
        me = asyncio.current_task()
        where = []
        rx.sink(int, lambda v: where.append(asyncio.current_task() is me))
        await asyncio.sleep(0)
        tx.send_nowait(1)
        assert where == []              # not yet: it runs on the handler's task
        await tx.send(2)                # the task is already woken: it takes both
        assert where == [False, False]
        await tx.send(3)                # idle again: send() runs it inline
        assert where == [False, False, True]
    run(main())


def test_send_does_not_hang_when_the_handlers_loop_is_closed_without_cancelling(relay_core):
    # A worker loop stopped and closed by hand: its handler task never runs
    # again and gets no signal. The waiting send is released (HandlerDetached).
    tx, rx = Relay.channel()
    worker = asyncio.new_event_loop()

    async def setup():
        rx.sink(int, lambda v: None)
    worker.run_until_complete(setup())

    async def main():
        sent = tx.send(1)           # queued for the worker's task, which never runs
        worker.close()
        with pytest.raises(RelayError) as info:
            await sent
        assert isinstance(info.value.error, HandlerDetached)
        assert info.value.error.reason == "loop closed"
        assert tx.handler_count == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(main(), timeout=10)


@pytest.mark.skipif(not hasattr(asyncio.Task, "cancelling"),
                    reason="Python < 3.11 cannot tell a raised CancelledError from a cancel")
def test_cancelled_error_raised_by_user_code_is_a_failure(relay_core):
    # A CancelledError that fn raises itself (leaked from an inner task, say)
    # is reported like any failure; the sink and the map feed go on.
    async def main():
        tx, rx = Relay.channel()
        errors = rx.subscribe(RelayError)

        async def fn(v):
            if v == 1:
                raise asyncio.CancelledError()
            return v
        out = rx.map(int, fn, on_error="skip").subscribe()
        seen = []

        async def h(v):
            if v == 1:
                raise asyncio.CancelledError()
            seen.append(v)
        rx.sink(int, h)
        failed = []
        for i in range(3):
            try:
                await tx.send(i)
            except RelayError as err:
                failed.append((err.msg_id, err.source, type(err.error)))
        tx.close()
        assert [v async for v in out] == [0, 2]
        assert seen == [0, 2]
        assert failed == [(2, "sink", asyncio.CancelledError)]
        sources = sorted(e.source for e in await errors.recv_many(10))
        assert sources == ["map", "sink"]
    run(main())


def test_several_tasks_may_await_one_send(relay_core):
    async def main():
        tx, rx = Relay.channel()

        async def slow(n):
            await asyncio.sleep(0.05)
        rx.sink(int, slow)
        sent = tx.send(1)
        first, second = asyncio.ensure_future(sent), asyncio.ensure_future(sent)
        assert await first == 1 and await second == 1
        third = asyncio.ensure_future(tx.send(2))
        fourth = asyncio.ensure_future(asyncio.shield(third))
        assert await fourth == 2
    run(main())


@pytest.mark.parametrize("wrap", ["wait_for", "gather", "shield"])
def test_deadlock_guard_holds_when_the_await_is_wrapped(relay_core, wrap):
    # wait_for/gather/shield await the send from a task of their own: the
    # guard still fires at once (it was recorded when the handler sent).
    async def main():
        tx, rx = Relay.channel()
        weak = tx.weak()
        outcome = []

        async def handler(n):
            if n == 0:
                sent = weak.send(1)
                wrapped = {"wait_for": lambda: asyncio.wait_for(sent, 5),
                           "gather": lambda: asyncio.gather(sent),
                           "shield": lambda: asyncio.shield(sent)}[wrap]()
                try:
                    await wrapped
                except RelayError as err:
                    outcome.append("deadlock" in str(err.error))
        rx.sink(int, handler)
        await tx.send(0)
        assert outcome == [True]
    run(main())


def test_a_slow_send_leaves_no_timer_behind(relay_core):
    async def main():
        loop = asyncio.get_running_loop()
        tx, rx = Relay.channel()

        async def slow(n):
            await asyncio.sleep(1.2)            # longer than the watchdog period
        rx.sink(int, slow)
        await tx.send(1)
        pending = [h for h in loop._scheduled if not h.cancelled()]
        assert not [h for h in pending if "_watch" in repr(h)]
    run(main())


def test_send_nowait_inside_an_inline_handler_runs_no_handler_inline(relay_core):
    async def main():
        tx, rx = Relay.channel()
        weak = tx.weak()
        log = []

        def on_int(n):
            weak.send_nowait("s")
            log.append("after send_nowait")
        rx.sink(int, on_int)
        rx.sink(str, lambda s: log.append("str ran"))
        await asyncio.sleep(0)
        await tx.send(1)                    # on_int runs inline here
        await asyncio.sleep(0.01)
        assert log == ["after send_nowait", "str ran"]
    run(main())
