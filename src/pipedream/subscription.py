"""``Subscription``: an untracked, typed reader of one relay, for asyncio.

The core decides what a subscription gets and in which order; this module only
parks a task when nothing is buffered and wakes it when something is.
"""

import asyncio

from . import _backend
from ._sentinels import CLOSED, EMPTY
from .errors import Empty, RelayClosed
from .events import Envelope

__all__ = ["Subscription", "Waiters", "check_count", "wake_future"]

# With the Cython core built, __anext__ is its compiled twin of the method below.
_compiled_next = getattr(_backend.core, "subscription_next", None)

_get_running_loop = asyncio.get_running_loop
_current_loop = asyncio._get_running_loop   # None outside a loop, never raises


def check_count(n, name="n"):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError("%s must be an int, got %s" % (name, type(n).__name__))
    if n < 1:
        raise ValueError("%s must be >= 1, got %d" % (name, n))


def _set_done(fut):
    if not fut.done():
        fut.set_result(None)


def wake_future(loop, fut):
    """Resolve ``fut`` (with None) on its ``loop``, from any thread.

    Nothing happens if it is already done, or if that loop is closed
    (nobody can be waiting there any more).
    """
    if _current_loop() is loop:
        if not fut.done():
            fut.set_result(None)
    else:
        try:
            loop.call_soon_threadsafe(_set_done, fut)
        except RuntimeError:        # that loop is closed
            pass


class Waiters:
    """Tasks parked on one core reader, woken together.

    The core calls ``wake`` (from any thread) once something is ready: every
    parked task wakes and pops again; a task that finds nothing parks again.
    Waking is never a hand-over, so a task cancelled after being woken takes
    nothing with it (the next receive gets the message), as in
    ``asyncio.Queue.get``.
    """

    __slots__ = ("_reader", "_futures", "_loop")

    def __init__(self, reader):
        self._reader = reader
        self._futures = []
        self._loop = None

    async def wait(self):
        """Return once the reader has something (or is closed). Consumes nothing."""
        loop = _get_running_loop()
        if self._futures and self._loop is not loop:
            raise RuntimeError("a subscription can only be awaited from one event loop at a time")
        self._loop = loop
        fut = loop.create_future()
        self._futures.append(fut)
        try:
            if self._reader.park(self.wake):
                await fut
        except BaseException:       # cancelled: take back the waker if unused
            self._futures.remove(fut)
            if not self._futures:
                self._reader.unpark()
            raise
        # Woken (the core dropped the waker when it called it) or not parked.
        self._futures.remove(fut)

    def wake(self):
        # Called by the core after a write, a notice or a close, possibly from
        # another thread; never with a core lock held.
        loop = self._loop
        if loop is None:
            return
        if _current_loop() is loop:
            for fut in self._futures:      # wake_all(), inlined: once per burst
                if not fut.done():
                    fut.set_result(None)
        else:
            try:
                loop.call_soon_threadsafe(self.wake_all)
            except RuntimeError:    # that loop is closed: nobody waits there
                pass

    def wake_all(self):
        for fut in self._futures:
            _set_done(fut)


class Subscription:
    """Untracked, typed subscription to one relay (``rx.subscribe(T)``).

    Receives, in send order, every message of a matching type sent after it
    was created, plus the ``Dropped``/``RelayError`` events the relay publishes
    if it matches them. It is not waited for by ``send()`` (untracked).

    In observable mode a subscription that falls ``capacity`` messages behind
    loses the oldest ones: ``dropped`` counts them, a ``Dropped`` event
    announces each, and receiving simply continues with the oldest message
    still held. Lag never raises.

    After the relay closes, a subscription still receives everything sent
    before the close, then ``recv`` raises ``RelayClosed`` and ``async for``
    ends. ``close()`` (or leaving ``with``, or garbage collection) unsubscribes
    and releases its claim on the buffer.
    """

    __slots__ = ("_reader", "_relay_id", "_envelopes", "_waiters", "_on_close",
                 "__weakref__")

    def __init__(self, ring, types, envelopes, on_close=None):
        self._reader = ring.reader(types, False)
        self._relay_id = ring.relay_id
        self._envelopes = bool(envelopes)
        self._waiters = Waiters(self._reader)
        # Called once after the reader closes (a derived relay that nothing
        # references any more stops when its last reader goes).
        self._on_close = on_close

    # -- receiving ------------------------------------------------------------

    def _wrap(self, value):
        reader = self._reader
        return Envelope(value, reader.msg_id, reader.origin, self._relay_id)

    def _end(self):
        if self._reader.closed:
            return RelayClosed("subscription is closed")
        return RelayClosed("relay %d is closed" % self._relay_id)

    def recv_nowait(self):
        """The next message if one is buffered.

        Raises ``Empty`` if none is, ``RelayClosed`` once the relay is closed
        and drained (or the subscription is closed).
        """
        value = self._reader.pop()
        if value is EMPTY:
            raise Empty("nothing buffered")
        if value is CLOSED:
            raise self._end()
        return self._wrap(value) if self._envelopes else value

    async def recv(self):
        """Wait for the next message and return it.

        Raises ``RelayClosed`` once the relay is closed and everything sent
        before the close was received. If cancelled while waiting, no message
        is consumed: the next receive gets it.
        """
        reader = self._reader
        value = reader.pop()
        while value is EMPTY:
            await self._waiters.wait()
            value = reader.pop()
        if value is CLOSED:
            raise self._end()
        return self._wrap(value) if self._envelopes else value

    async def recv_many(self, n=256):
        """Wait for at least one message; return a list of 1..``n`` buffered ones.

        The throughput path: one wake-up and one call for many messages.
        Raises ``RelayClosed`` at the end, like ``recv``; cancellation while
        waiting consumes nothing.
        """
        if type(n) is not int or n < 1:
            check_count(n)          # raises the right error
        reader = self._reader
        if self._envelopes:
            # pop_many keeps only the last message's metadata: take envelopes singly.
            out = [await self.recv()]
            while len(out) < n:
                value = reader.pop()
                if value is EMPTY or value is CLOSED:
                    break
                out.append(self._wrap(value))
            return out
        values = reader.pop_many(n)
        while values is EMPTY:
            await self._waiters.wait()
            values = reader.pop_many(n)
        if values is CLOSED:
            raise self._end()
        return values

    def __aiter__(self):
        return self

    async def _anext_py(self):
        # __anext__ of the pure-Python build (and the reference for the
        # compiled one): nothing is taken until the coroutine runs.
        reader = self._reader
        value = reader.pop()
        while value is EMPTY:
            await self._waiters.wait()
            value = reader.pop()
        if value is CLOSED:
            raise StopAsyncIteration
        return self._wrap(value) if self._envelopes else value

    # The compiled twin (see _core.pyx) when the extension is built.
    __anext__ = _anext_py if _compiled_next is None else _compiled_next

    # -- state ----------------------------------------------------------------

    @property
    def dropped(self):
        """Messages (and unread relay events) this subscription lost to lag."""
        return self._reader.dropped

    @property
    def closed(self):
        """True once ``close()`` was called (not when the relay closes)."""
        return self._reader.closed

    @property
    def pending(self):
        """Messages buffered for this subscription right now."""
        return self._reader.pending

    def close(self):
        """Unsubscribe. Idempotent. Tasks waiting in ``recv`` get ``RelayClosed``."""
        was_open = not self._reader.closed
        self._reader.close()
        self._waiters.wake()
        if was_open and self._on_close is not None:
            self._on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        self.close()

    def __del__(self):
        try:
            reader = self._reader
        except AttributeError:      # __init__ failed
            return
        if not reader.closed:
            reader.close()
            on_close = getattr(self, "_on_close", None)
            if on_close is not None:
                on_close()

    def __repr__(self):
        reader = self._reader
        types = reader.types
        name = "all" if types is None else getattr(types, "__qualname__", repr(types))
        state = " closed" if reader.closed else ""
        return "<Subscription relay=%d types=%s dropped=%d%s>" % (
            self._relay_id, name, reader.dropped, state)
