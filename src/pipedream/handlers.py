"""Tracked handlers (``rx.sink``, ``rx.tap``), ``rx.within`` and ``aclose``'s drain.

A ``Handler`` owns one tracked core reader and one task on the event loop that
was running when it was registered. It takes its messages one at a time, in
send order: pop, call ``fn``, finish the message's completion (so the
``send()`` that wrote it can return), repeat; with nothing buffered it parks
the reader and its task sleeps.

Fast path: when a sync handler is parked (nothing buffered, not running) and
a message is written on the handler's own loop thread, the core's wake-up
call runs the handler right there, inside the sender's ``write``, instead of
waking the task: same order, same error handling, same context. So ``await
tx.send(x)`` with one sync sink finishes without a task switch.

Failures travel two ways (``RelayError``): to the ``send()`` of that message
(first error wins, kept by the core's ``Completion``) and as an event
published on the relay. Stopping is not failing: a handler that is closed,
cancelled, or whose loop went away finishes every message it still owed with
``RelayError(error=HandlerDetached(...))``, raised to the waiting senders but
not published.
"""

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import threading

from ._sentinels import CLOSED, EMPTY
from .channel import check_types
from .errors import HandlerDetached, RelayError
from .subscription import wake_future

__all__ = ["Handler", "register", "within", "drain"]

_log = logging.getLogger("pipedream")
_current_loop = asyncio._get_running_loop     # None outside a loop, never raises
_current_task = asyncio.current_task
_get_ident = threading.get_ident
_CancelledError = asyncio.CancelledError

#: A handler handles at most this many messages in a row before letting the
#: loop run (task path) or handing over to its task (inline path), so a long
#: backlog, or a handler that feeds itself, cannot starve the loop or a sender.
_RUN_LIMIT = 64

# Why a run of messages stopped (see Handler._run_sync).
_PARKED, _CLOSED, _HANDOFF, _LIMIT = "parked", "closed", "handoff", "limit"


_isawaitable = inspect.isawaitable


def cancel_requested():
    """True if the current task is being cancelled (``task.cancel()`` was called).

    Tells a ``CancelledError`` that stops the task (closing, shutdown) from one
    that user code raised on its own (e.g. leaked from an inner task): the
    latter is a failure like any other. Python 3.9/3.10 cannot tell them
    apart, so there every ``CancelledError`` counts as a cancellation.
    """
    task = _current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _is_async(fn):
    """True for ``async def`` functions, partials of them, and objects whose
    ``__call__`` is ``async def``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False
    return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))


def _check_fn(fn):
    if not callable(fn):
        raise TypeError("fn must be a function or an async function, got %r" % (fn,))
    return _is_async(fn)


def _check_timeout(timeout, is_async):
    """Validate ``timeout``: None, or a number of seconds > 0 for an async fn."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, got %r" % (timeout,))
    if math.isnan(timeout) or timeout <= 0:
        raise ValueError("timeout must be > 0 seconds, got %r" % (timeout,))
    if not is_async:
        raise TypeError("timeout applies to async handlers only: a running plain "
                        "function cannot be interrupted (got timeout=%r with a plain "
                        "function)" % (timeout,))
    return None if math.isinf(timeout) else float(timeout)


def _describe_types(types):
    if types is None:
        return "object"
    if isinstance(types, tuple):
        return "(%s)" % ", ".join(t.__qualname__ for t in types)
    return types.__qualname__


def _describe_fn(fn):
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None)
    if name is None:
        name = type(fn).__qualname__
    return name


# -- timeouts -------------------------------------------------------------------

def _timeout_error(seconds):
    return TimeoutError("the call took longer than timeout=%s s" % seconds)


async def _await_with_cancel_timer(awaitable, seconds):
    """Await ``awaitable`` in this task; past ``seconds`` cancel it and raise
    ``TimeoutError``. The call is over when this returns or raises.

    For Python < 3.11 (no ``asyncio.timeout``): a timer cancels the task, and
    the ``CancelledError`` it causes becomes the ``TimeoutError``.
    """
    task = _current_task()
    expired = False

    def expire():
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await awaitable
    except _CancelledError:
        if expired:
            raise _timeout_error(seconds) from None
        raise
    finally:
        timer.cancel()


async def _await_with_asyncio_timeout(awaitable, seconds):
    """The same with ``asyncio.timeout`` (Python >= 3.11), which also tells its
    own cancellation apart from one that comes from outside."""
    cm = asyncio.timeout(seconds)
    try:
        async with cm:
            return await awaitable
    except TimeoutError:
        if cm.expired():
            raise _timeout_error(seconds) from None
        raise


_await_with_timeout = (_await_with_asyncio_timeout if hasattr(asyncio, "timeout")
                       else _await_with_cancel_timer)


# -- handlers -------------------------------------------------------------------

class Handler:
    """A tracked handler (``rx.sink`` / ``rx.tap``) on one relay.

    It runs ``fn`` for every message of its type sent after it was created,
    one at a time, in send order, on the loop that was running when it was
    registered; each ``send()`` that counted it waits until ``fn`` returned
    (or its awaitable finished). A plain function that returns an awaitable
    has it awaited (by the handler's task) as part of the same message.
    ``fn`` runs in a copy of the context of the registration: contextvars set
    before ``sink()``/``tap()`` are visible to it, and what it sets stays for
    its next call (not for the sender). The relay holds the handler strongly:
    dropping this object does not detach it; ``close()`` does, and so does
    the relay closing (after the handler has drained what it was sent).
    """

    __slots__ = ("_hub", "source", "_types", "_fn", "_sync", "_timeout", "_loop",
                 "_loop_has_thread_id", "_context", "_run_in_context", "_reader",
                 "_waker", "_task", "_wake_fut", "_busy", "_in_call", "_cancel_is_close",
                 "_current", "_handoff", "_closed", "_ended", "_end_waiters", "_lock")

    def __init__(self, hub, source, types, fn, timeout, is_async, loop):
        self._hub = hub
        self.source = source
        self._types = types
        self._fn = fn
        self._sync = not is_async
        self._timeout = timeout
        self._loop = loop
        # "Is the writer on this handler's loop, running now?" is asked on every
        # wake-up. asyncio's own loops answer it with their _thread_id (set
        # while run_forever runs, None otherwise) several times faster than
        # asyncio._get_running_loop() does; other loops use the latter.
        self._loop_has_thread_id = isinstance(loop, asyncio.BaseEventLoop)
        # Sync calls run in this context on both paths (task and inline), so
        # contextvars set when registering are visible to fn, and what fn sets
        # stays for its next call.
        self._context = contextvars.copy_context()
        self._run_in_context = self._context.run
        self._reader = None
        # What the core calls when something is ready for the parked reader.
        self._waker = self._on_ready if is_async else self._run_sync
        self._task = None
        self._wake_fut = None
        self._busy = True           # the task is awake, or an inline run is going on
        self._in_call = False       # the task is awaiting fn (or what fn returned)
        self._cancel_is_close = False
        self._current = None        # completion of the message being handled
        self._handoff = None        # (msg_id, value, awaitable) for the task to await
        self._closed = False
        self._ended = False
        self._end_waiters = []
        self._lock = threading.Lock()

    def _start(self):
        hub = self._hub
        # Counted from here on: hub.send() allocates completions only while
        # hub.handlers is not empty, so this goes in before the reader exists.
        hub.handlers[self] = None
        try:
            self._reader = hub.ring.reader(self._types, True)
        except BaseException:
            del hub.handlers[self]
            raise
        if hub.ring.closed:         # nothing can ever reach this handler
            self._detach("relay closed")
            return
        loop = self._loop
        self._wake_fut = loop.create_future()
        task = self._task = loop.create_task(self._run())
        hub.tasks[task] = self
        task.add_done_callback(self._task_done)
        # Parked now, so a send right after registration runs the inline path
        # and a closed loop is noticed by the next write.
        if self._reader.park(self._waker):
            self._busy = False
        else:
            self._wake_task()

    # -- public ------------------------------------------------------------------

    @property
    def closed(self):
        """True once the handler stopped: ``close()``, cancelled, or relay closed and drained."""
        return self._closed

    def close(self):
        """Detach the handler. Idempotent; safe from any thread.

        Messages it was counted for and has not finished (the one in flight,
        if any, and the queued ones) are released at once: their ``send()``
        raises ``RelayError`` whose ``error`` is ``HandlerDetached``; nothing
        is published. An in-flight async call is cancelled (unless ``close()``
        is called from inside that call itself). ``aclose()`` does not wait
        for a detached handler.
        """
        if not self._detach("closed"):
            return
        if _current_loop() is self._loop:
            self._stop("closed")
        else:
            try:
                self._loop.call_soon_threadsafe(self._stop, "closed")
            except RuntimeError:    # its loop is closed: nothing runs there any more
                self._release_current("closed")

    def counts(self, value):
        """True if this live handler would be counted for a message like ``value``."""
        reader = self._reader
        return not self._closed and reader is not None and reader.matches(value)

    def __str__(self):
        return "%s(%s, %s) on relay %d" % (self.source, _describe_types(self._types),
                                           _describe_fn(self._fn), self._hub.id)

    def __repr__(self):
        return "<Handler %s%s>" % (self, " closed" if self._closed else "")

    # -- waking --------------------------------------------------------------------

    def _on_ready(self):
        # The waker of async handlers, and the slow path of sync ones: called
        # by the core once per park (after a matching write, notice or close)
        # from the writer's thread, with no core lock held.
        loop = self._loop
        if _current_loop() is not loop:
            try:
                loop.call_soon_threadsafe(self._wake_task)
            except RuntimeError:    # the handler's loop is closed
                self._loop_gone()
        else:
            self._wake_task()

    def _wake_task(self):
        # Loop thread only.
        self._busy = True
        fut = self._wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- handling messages ---------------------------------------------------------------

    def _run_sync(self, in_task=False):
        """Handle the ready messages with a sync ``fn``, in order (loop thread).

        The one code path of sync handlers. The task calls it with
        ``in_task=True``; it is also their waker, which the core calls with no
        argument: then, if the handler is idle and the writer runs on the
        handler's loop thread, it handles the messages right here, inside the
        writer's call (the fast path), and leaves the task asleep; otherwise it
        wakes the task. Either way fn runs in ``self._context``.

        Returns ``_PARKED`` (nothing more is ready: the reader is parked again
        and ``_busy`` is False), ``_CLOSED`` (relay closed and drained, or
        handler detached), ``_HANDOFF`` (fn returned an awaitable, now in
        ``self._handoff`` for the task to await) or ``_LIMIT`` (``_RUN_LIMIT``
        messages handled: time to let the loop run). Inline, any of these but
        ``_PARKED`` wakes the task to carry on.
        """
        hub = None
        if not in_task:
            # Inline only inside a send() running on the handler's loop thread
            # (hub.inline holds the thread id of the send() now writing).
            loop = self._loop
            hub = self._hub
            ident = _get_ident()
            if self._busy or hub.inline != ident or (
                    loop._thread_id != ident if self._loop_has_thread_id
                    else _current_loop() is not loop):
                self._on_ready()
                return None
            self._busy = True
            hub.inline = 0      # what fn sends itself runs no other handler inline
        reader = self._reader
        run = self._run_in_context
        fn = self._fn
        left = _RUN_LIMIT
        status = _LIMIT
        try:
            while left:
                left -= 1
                value = reader.pop()
                if value is CLOSED:
                    status = _CLOSED
                    break
                if value is not EMPTY:
                    completion = reader.completion
                    if completion is not None:
                        self._current = completion
                    try:
                        result = run(fn, value)
                    except Exception as exc:
                        self._failed(reader.msg_id, value, exc)
                    except BaseException as exc:
                        self._aborted(reader.msg_id, exc)
                        raise
                    else:
                        if result is not None and _isawaitable(result):
                            self._handoff = (reader.msg_id, value, result)
                            status = _HANDOFF
                            break
                        # (close() during the call already released it)
                        if completion is not None and self._current is completion:
                            self._current = None
                            completion.finish()
                # Parking also says whether more is ready: no pop just to see EMPTY.
                if reader.park(self._waker):
                    self._busy = False
                    return _PARKED
        except BaseException:
            if not in_task:
                self._wake_task()   # the task carries on from here
            raise
        finally:
            if hub is not None:
                hub.inline = ident  # the send() goes on waking other readers
        if not in_task:
            self._wake_task()
        return status

    async def _run(self):
        loop = self._loop
        sync = self._sync
        try:
            while True:
                await self._wake_fut                # parked, asleep
                while True:                         # awake: _busy is True
                    if self._handoff is not None:
                        msg_id, value, awaitable = self._handoff
                        self._handoff = None
                        await self._await_result(msg_id, value, awaitable)
                    if sync:
                        status = self._run_sync(True)
                    else:
                        status = await self._run_async()
                    if status is _PARKED:
                        # No code runs on this thread between park() and this
                        # line, so no wake-up can have come in between.
                        self._wake_fut = loop.create_future()
                        break
                    if status is _CLOSED:
                        return
                    if status is _LIMIT:
                        await asyncio.sleep(0)      # let the rest of the loop run
        except _CancelledError:
            if not self._cancel_is_close:
                # Cancelled from outside (e.g. asyncio.run shutting down).
                self._detach("cancelled")
                self._release_current("cancelled")
                raise
            # Cancelled by close(), which already released everything.

    async def _run_async(self):
        """``_run_sync`` for an async ``fn``: same statuses (never ``_HANDOFF``)."""
        reader = self._reader
        waker = self._waker
        left = _RUN_LIMIT
        while left:
            left -= 1
            value = reader.pop()
            if value is CLOSED:
                return _CLOSED
            if value is not EMPTY:
                await self._call_async(value)
            if reader.park(waker):
                self._busy = False
                return _PARKED
        return _LIMIT

    def _task_done(self, task):
        self._hub.tasks.pop(task, None)
        if task.cancelled():
            reason = "cancelled"
        else:
            exc = task.exception()
            if exc is None:
                reason = "relay closed"     # drained: nothing is owed
            else:
                reason = "stopped by %s" % type(exc).__name__
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    # Not an error of fn (those are caught): a BaseException from
                    # fn, or a bug here. Say so instead of dying silently.
                    self._loop.call_exception_handler({
                        "message": "pipedream: %s stopped" % self,
                        "exception": exc, "task": task})
        self._detach(reason)
        self._release_current(reason)

    # -- one message (task path) ---------------------------------------------------------

    async def _call_async(self, value):
        reader = self._reader
        self._current = reader.completion
        timeout = self._timeout
        fn = self._fn
        if timeout is None:
            await self._settle(reader.msg_id, value, lambda: fn(value))
        else:
            await self._settle(reader.msg_id, value,
                               lambda: _await_with_timeout(fn(value), timeout))

    async def _await_result(self, msg_id, value, awaitable):
        """Await what a sync fn returned, as part of that message's call."""
        if self._closed and self._current is None:
            # Detached before the task got to it (the message was released):
            # do not run it, and close it so it is not reported as never awaited.
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
            return
        await self._settle(msg_id, value, lambda: awaitable)

    async def _settle(self, msg_id, value, call):
        """Await ``call()`` as message ``msg_id``'s call; settle the message.

        Success finishes its completion; an ``Exception`` (or a
        ``CancelledError`` that the call raised on its own) is a failure,
        reported both ways; a cancellation of the handler propagates; any
        other ``BaseException`` detaches the handler and propagates.
        """
        self._in_call = True
        try:
            await call()
        except _CancelledError as exc:
            if self._closed or cancel_requested():
                raise
            self._failed(msg_id, value, exc)    # raised by the call itself: a failure
            return
        except Exception as exc:
            self._failed(msg_id, value, exc)
            return
        except BaseException as exc:
            self._aborted(msg_id, exc)
            raise
        finally:
            self._in_call = False
        self._finish_current()

    def _finish_current(self):
        completion = self._current
        if completion is not None:
            self._current = None
            completion.finish()

    def _failed(self, msg_id, value, exc):
        """fn raised: publish the RelayError, then finish the message with it."""
        error = RelayError(msg_id, self.source, exc)
        try:
            if msg_id:
                self._hub.publish(error)
            else:
                # A relay event (Dropped, RelayError): publishing the failure
                # could feed this handler again, so log it instead.
                _log.error("%s failed on relay event %r", self, value,
                           exc_info=(type(exc), exc, exc.__traceback__))
        finally:
            completion = self._current
            if completion is not None:
                self._current = None
                completion.finish(error)

    def _aborted(self, msg_id, exc):
        """fn raised a BaseException that is not an Exception: it propagates and
        the handler stops; nothing it owes is left hanging."""
        completion = self._current
        if completion is not None:
            self._current = None
            completion.finish(RelayError(msg_id, self.source, exc))
        reason = "stopped by %s" % type(exc).__name__
        self._detach(reason)

    # -- stopping ---------------------------------------------------------------------

    def _detached_error(self, msg_id, reason):
        return RelayError(msg_id, self.source, HandlerDetached(self, reason))

    def _detach(self, reason):
        """Stop taking messages (any thread). Returns False if already stopped.

        Releases every queued message that counted this handler; the message
        in flight is the loop thread's business (``_release_current``).
        """
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        hub = self._hub
        hub.handlers.pop(self, None)
        reader = self._reader
        if reader is not None:
            for completion in reader.close():
                completion.finish(self._detached_error(completion.msg_id, reason))
            hub.reader_closed()     # a derived relay nobody reads any more may stop
        self._notify_ended()
        return True

    def _release_current(self, reason):
        """Finish the in-flight message (if any) as not handled."""
        completion = self._current
        if completion is not None:
            self._current = None
            completion.finish(self._detached_error(completion.msg_id, reason))

    def _stop(self, reason):
        """After ``_detach``, on the loop thread: release the in-flight message and
        end the task (cancelling an async call in progress)."""
        self._release_current(reason)
        task = self._task
        if task is None or task.done():
            return
        if self._in_call and _current_task() is not task:
            self._cancel_is_close = True
            task.cancel()
        else:
            self._wake_task()       # it pops CLOSED and returns

    def check_loop(self):
        """Detach if this handler's loop is closed (see Hub.wait_for_handlers)."""
        if not self._closed and self._loop.is_closed():
            self._loop_gone()

    def _loop_gone(self):
        # Its loop is closed: nothing will ever run there.
        if self._detach("loop closed"):
            self._release_current("loop closed")
            # Its task can never run now; what it owed is released, so its
            # eventual collection is not worth a "Task was destroyed" report.
            task = self._task
            if task is not None and not task.done():
                try:
                    task._log_destroy_pending = False
                except AttributeError:      # pragma: no cover (not an asyncio.Task)
                    pass

    # -- drain support ----------------------------------------------------------------

    def _notify_ended(self):
        with self._lock:
            self._ended = True
            waiters, self._end_waiters = self._end_waiters, []
        for loop, fut in waiters:
            wake_future(loop, fut)

    def _ended_future(self, loop):
        """A future on ``loop`` resolved when this handler has stopped, or None."""
        if not self._ended and self._loop.is_closed():
            self._loop_gone()
        with self._lock:
            if self._ended:
                return None
            fut = loop.create_future()
            self._end_waiters.append((loop, fut))
            return fut


def register(hub, source, T, fn, timeout=None):
    """Create and start a tracked handler on ``hub``; return it.

    Raises ``TypeError`` naming ``T``, ``fn`` or ``timeout``, ``ValueError``
    for a timeout <= 0, and ``RuntimeError`` when no event loop is running.
    """
    types = check_types(T)
    is_async = _check_fn(fn)
    timeout = _check_timeout(timeout, is_async)
    loop = _current_loop()
    if loop is None:
        raise RuntimeError("rx.%s() needs a running event loop: call it from async code "
                           "(the handler runs on the loop that is running then)" % source)
    handler = Handler(hub, source, types, fn, timeout, is_async, loop)
    handler._start()
    return handler


# -- within ---------------------------------------------------------------------

# within() tasks, held until they end: the loop only keeps weak references.
_within_tasks = set()


def within(hub, async_fn):
    """Run ``async_fn()`` (or a coroutine object) as an untracked task; return it.

    If it raises an ``Exception``, ``RelayError(0, "within", exc)`` is published
    on the relay (and awaiting the task still raises the exception).
    Cancellation is not a failure.
    """
    coro = None
    if inspect.iscoroutine(async_fn):
        coro = async_fn
    elif not callable(async_fn) or not _is_async(async_fn):
        raise TypeError("async_fn must be an async function or a coroutine, got %r"
                        % (async_fn,))
    loop = _current_loop()
    if loop is None:
        if coro is not None:
            coro.close()
        raise RuntimeError("rx.within() needs a running event loop: call it from async code")
    if coro is None:
        coro = async_fn()
    task = loop.create_task(coro)
    _within_tasks.add(task)
    task.add_done_callback(functools.partial(_within_done, hub))
    return task


def _within_done(hub, task):
    _within_tasks.discard(task)
    if task.cancelled():
        return
    exc = task.exception()          # retrieved: the relay reports it
    if exc is None:
        return
    if isinstance(exc, Exception):
        hub.publish(RelayError(0, "within", exc))
    elif not isinstance(exc, (KeyboardInterrupt, SystemExit)):
        task.get_loop().call_exception_handler({
            "message": "pipedream: within() task stopped", "exception": exc, "task": task})


# -- drain ----------------------------------------------------------------------

def _hubs(hub):
    """``hub`` and every hub derived from it, depth first."""
    stack = [hub]
    seen = set()
    while stack:
        h = stack.pop()
        if id(h) in seen:
            continue
        seen.add(id(h))
        yield h
        stack.extend(h.children)


async def drain(hub):
    """Return once every handler of ``hub`` and of its derived hubs has stopped,
    and everything in their ``drain_waits`` is done.

    Called by ``aclose()`` after closing. Detached handlers are not waited
    for; a failed handler keeps draining, so failures do not delay this.
    A handler that calls it (an async ``fn`` awaiting ``aclose()``) is not
    waited for either: it can only end after that call returns.
    Cancelling it only stops the waiting.
    """
    loop = asyncio.get_running_loop()
    me = _current_task()
    awaited = {}
    while True:
        pending = []
        for h in list(_hubs(hub)):
            caller = h.tasks.get(me)
            for handler in list(h.handlers):
                if handler is caller:
                    continue
                fut = handler._ended_future(loop)
                if fut is not None:
                    pending.append(fut)
            for waitable in list(h.drain_waits):
                if id(waitable) not in awaited:
                    awaited[id(waitable)] = waitable
                    pending.append(asyncio.ensure_future(waitable))
        if not pending:
            return
        # wait(), not gather(): cancelling the drain must not cancel what it waits for.
        await asyncio.wait(pending)
