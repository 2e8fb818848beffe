"""The channel API: ``Relay``, ``RelaySender``, ``WeakSender``, ``RelayReceiver``.

Each relay is one ``Hub``: its ring (from the core), its tracked handlers and
its derived relays. The public classes are thin handles on a hub:

* ``RelaySender`` owns the relay: closing it, or losing it to garbage
  collection, closes the relay.
* ``WeakSender`` sends without keeping the relay open.
* ``RelayReceiver`` subscribes, registers handlers and builds
  transformations; it does not keep the relay open either.
* ``Relay`` is both at once (loopback); derived relays are ``Relay``\\ s.
"""

import asyncio
import itertools
import threading

from . import _backend
from .errors import RelayClosed, RelayError, RelayFull
from .events import DeliveryMode, Dropped, type_name
from .subscription import Subscription, wake_future

__all__ = ["Relay", "RelaySender", "WeakSender", "RelayReceiver", "Hub", "check_types"]

try:
    from types import UnionType as _UnionType      # int | str (Python 3.10+)
except ImportError:                                 # pragma: no cover (3.9)
    _UnionType = None

_relay_ids = itertools.count(1)
_WATCHDOG_S = 1.0   # how often a waiting send() checks for handlers on closed loops
_current_loop = asyncio._get_running_loop
_current_task = asyncio.current_task
_get_ident = threading.get_ident


def check_types(types, name="T"):
    """Normalize a type filter: None/object -> None (all), a class, or a tuple of classes.

    ``int | str`` (a union of classes) is taken as ``(int, str)``.
    """
    if types is None or types is object:
        return None
    if _UnionType is not None and isinstance(types, _UnionType):
        types = types.__args__
    if isinstance(types, type):
        return types
    if isinstance(types, tuple) and types and all(isinstance(t, type) for t in types):
        return None if object in types else types
    raise TypeError("%s must be a class or a non-empty tuple of classes, got %r" % (name, types))


class Hub:
    """Everything one relay owns. Internal: the public handles point here."""

    def __init__(self, capacity=65536, mode=DeliveryMode.OBSERVABLE):
        self.mode = DeliveryMode.parse(mode)
        self.id = next(_relay_ids)
        self.core = _backend.core
        self.ring = self.core.Ring(capacity, self.mode is DeliveryMode.RELIABLE,
                                   self.id, self._on_drop)
        self.ring.waiter = self.wait_for_handlers
        self.capacity = capacity
        # Reliable mode: the FIFO of writes waiting for room (see reliable.py).
        self.space = None
        if self.mode is DeliveryMode.RELIABLE:
            from .reliable import SpaceQueue
            self.space = SpaceQueue(self)
        self.handlers = {}      # live tracked Handler -> None (insertion order)
        self.inline = 0         # thread id of the send() writing now (see Hub.send)
        self.tasks = {}         # running handler task -> Handler (deadlock guard)
        self.children = []      # derived hubs, for aclose()
        self.drain_waits = []   # awaitables aclose() waits for (handler/forwarder ends)
        self.on_release = None  # derived relays: called when no handle remains
        self.on_reader_closed = None    # derived relays: called after a reader closed
        self.on_close = {}      # callback -> None, run once after close (feeds into it)

    @property
    def closed(self):
        return self.ring.closed

    def _on_drop(self, msg_id, value, readers):
        # Called by the core after a write evicted an unread message.
        if isinstance(value, Dropped):
            return      # never announce the loss of a Dropped
        self.ring.publish(Dropped(msg_id, self.id, type_name(type(value)), readers))

    def publish(self, event):
        """Deliver a relay event (``RelayError``...) out of band."""
        self.ring.publish(event)

    def close(self):
        self.ring.close()
        if self.space is not None:
            self.space.close()      # queued sends: RelayClosed now, nothing written
        if self.on_close:
            callbacks = list(self.on_close)
            self.on_close.clear()
            for callback in callbacks:
                callback()

    def reader_closed(self):
        """Called after a reader of this relay closed (any thread): lets a derived
        relay that no handle references stop once nothing reads it."""
        callback = self.on_reader_closed
        if callback is not None:
            callback()

    # -- sending ----------------------------------------------------------------

    def write(self, value, origin=0):
        """``send_nowait``: write without waiting for handlers; return the msg id.

        Any thread. Reliable mode: ``RelayFull`` (nothing written) if the ring
        is full or sends are queued for room (it never jumps that queue).
        """
        space = self.space
        if space is None or not space.queue:    # (offer(), inlined: the hot path)
            msg_id = self.ring.write(value, origin, None)
        else:
            msg_id = self.core.WRITE_CLOSED if self.ring.closed else self.core.WRITE_FULL
        if msg_id > 0:
            return msg_id
        if msg_id == self.core.WRITE_FULL:
            raise RelayFull("relay %d is full (reliable mode, capacity %d)"
                            % (self.id, self.capacity))
        raise RelayClosed("relay %d is closed" % self.id)

    def offer(self, value, origin=0):
        """Untracked write that never waits: the msg id, ``WRITE_FULL`` or ``WRITE_CLOSED``.

        Any thread. Reliable mode: ``WRITE_FULL`` (nothing written) also while
        sends are queued for room, so it never jumps that queue. Forwarders
        use it (or ``put()``) instead of writing to the ring directly.
        """
        space = self.space
        if space is not None and space.queue:
            return self.core.WRITE_CLOSED if self.ring.closed else self.core.WRITE_FULL
        return self.ring.write(value, origin, None)

    def send(self, value, origin=0):
        """``send``: write now (or queue for room); return the awaitable."""
        space = self.space
        if space is not None and space.queue:
            return space.send(value, origin)    # behind earlier sends, in order
        completion = self.core.Completion()
        if self.handlers:
            # Only a send() may run idle sync handlers inline, inside this
            # call (handlers.Handler._run_sync); send_nowait() never runs one.
            # (A send() nested in such a handler ends the window early: later
            # handlers of the outer write then simply run on their tasks.)
            self.inline = _get_ident()
            try:
                msg_id = self.ring.write(value, origin, completion)
            finally:
                self.inline = 0
        else:
            msg_id = self.ring.write(value, origin, completion)
        if msg_id > 0:
            if self.tasks and completion.remaining:
                self.guard_send(completion)     # (an async handler is running)
            return completion       # awaitable: see Completion.__await__
        if msg_id == self.core.WRITE_FULL:
            return space.send(value, origin)
        raise RelayClosed("relay %d is closed" % self.id)

    def send_threadsafe(self, value, origin=0):
        """``send_threadsafe``: a ``concurrent.futures.Future`` of the msg id."""
        from .reliable import send_threadsafe
        return send_threadsafe(self, value, origin)

    async def put(self, value, origin=0):
        """Write ``value``, waiting for room in reliable mode; untracked.

        For forwarders (transformations, ``forward``, ``merge``): it never
        waits for handlers, and it waits for room in the same queue as
        ``send()`` (in order, nobody starves). Returns the msg id; raises
        ``RelayClosed`` (nothing written). Cancelled while waiting: nothing
        is written.
        """
        msg_id = self.offer(value, origin)
        if msg_id > 0:
            return msg_id
        if msg_id != self.core.WRITE_FULL:
            raise RelayClosed("relay %d is closed" % self.id)
        return await self.space.put(value, origin)

    async def room(self):
        """Return once a write queued now would have its turn and room (or at close).

        Observable mode: at once. It reserves nothing; ``put()`` does.
        """
        if self.space is not None:
            await self.space.room()

    async def wait_for_handlers(self, completion):
        """The ring's ``waiter``: how awaiting ``send()`` waits for the tracked
        handlers still owing ``completion`` (see ``Completion.__await__``).

        Any number of tasks, on any loops, may await the same send. Raises
        the deadlock guard's ``RelayError`` at once when the send was made,
        or is awaited, by a handler that would itself have to handle the
        message. Cancelling only stops this task's waiting.
        """
        waiting = completion.layer
        if waiting is not None and waiting.guard is not None:
            raise waiting.guard
        error = self.self_send_error(completion)
        if error is not None:
            raise error
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        entry = (loop, fut)
        with _waiting_lock:
            waiting = completion.layer
            if waiting is None:
                waiting = completion.layer = _Waiting()
            if waiting.resolved:
                return
            waiting.futures.append(entry)
            first = not waiting.registered
            waiting.registered = True
        if first and not completion.when_done(_resolve_waiting):
            _resolve_waiting(completion)    # finished in between
        watch = [None]              # the pending watchdog timer (it re-arms itself)
        watch[0] = loop.call_later(_WATCHDOG_S, self._watch, fut, watch)
        try:
            await fut
        finally:
            watch[0].cancel()
            if not fut.done() or fut.cancelled():
                with _waiting_lock:
                    if entry in waiting.futures:
                        waiting.futures.remove(entry)

    def _watch(self, fut, watch):
        # A handler whose loop was stopped and then closed without its tasks
        # being cancelled gets no signal at all: look for such handlers now
        # and then while a send waits, so that the send cannot hang.
        if fut.done():
            return
        for handler in list(self.handlers):
            handler.check_loop()
        if not fut.done():
            watch[0] = fut.get_loop().call_later(_WATCHDOG_S, self._watch, fut, watch)

    def guard_send(self, completion):
        """At ``send()``: if a tracked handler of this relay sends a message it
        would itself have to handle, remember the guard's error on the
        completion, so that awaiting it raises at once even from another task
        (``wait_for``, ``gather`` and ``shield`` wrap the await in one)."""
        error = self.self_send_error(completion)
        if error is not None:
            with _waiting_lock:
                if completion.layer is None:
                    completion.layer = _Waiting()
                completion.layer.guard = error

    def self_send_error(self, sent):
        """The deadlock guard: a ``RelayError`` if the awaiting task is a tracked
        handler of this relay that would itself have to handle ``sent``."""
        if not self.tasks:
            return None
        handler = self.tasks.get(_current_task())
        if handler is None or not handler.counts(sent.value):
            return None
        return RelayError(sent.msg_id, handler.source, RuntimeError(
            "deadlock: this %s awaits send() on its own relay for a message it must "
            "handle itself, so the send could never complete. The message was already "
            "written and the handler will still get it. Tracked handlers only send "
            "forward: use send_nowait() here, or send to a derived or another relay."
            % handler))


_waiting_lock = threading.Lock()   # guards every _Waiting (they are tiny)


class _Waiting:
    """The asyncio side of one tracked send (kept in ``Completion.layer``):
    the futures of the tasks awaiting it, resolved together when the last
    counted handler finishes; and the deadlock guard's error, if any."""

    __slots__ = ("futures", "registered", "resolved", "guard")

    def __init__(self):
        self.futures = []       # (loop, future) of each awaiting task
        self.registered = False
        self.resolved = False
        self.guard = None


def _resolve_waiting(completion):
    # The completion callback: wake every awaiting task, each on its loop.
    with _waiting_lock:
        waiting = completion.layer
        waiting.resolved = True
        futures, waiting.futures = waiting.futures, []
    for loop, fut in futures:
        _resolver(loop, fut)(completion)


def _resolver(loop, fut):
    """A completion callback that resolves ``fut`` on ``loop``, from any thread."""
    return lambda _completion: wake_future(loop, fut)


_SEND_DOC = """send(value): send ``value`` (any object, ``None`` included); ``await`` it for the id.

Eager: the message is written when ``send()`` is called (in reliable mode
with a full ring it is queued in order for room), so a forgotten ``await``
still delivers it. Awaiting returns the msg id once every tracked handler
(sink, tap) of a matching type has finished it, or raises ``RelayError``
(first failure). With no tracked handler to wait for, the await completes
without suspending. An idle sync handler on this thread's loop is run inside
the call (the fast path). Raises ``RelayClosed`` at the call if the relay is
closed.
"""

_SEND_NOWAIT_DOC = """send_nowait(value): write ``value`` now and return its msg id.

Never waits for handlers (they still get the message, on their own tasks:
unlike ``send()``, it never runs a handler inside the call). Safe from any
thread. Raises ``RelayClosed`` after close and, in reliable mode when the
ring is full or sends are queued for room, ``RelayFull`` (nothing written).
"""


class _Handle:
    """What every handle on a relay tells about it."""

    __slots__ = ()

    @property
    def id(self):
        """This relay's id (also the ``origin`` of messages sent into it)."""
        return self._hub.id

    @property
    def closed(self):
        """True once the relay is closed."""
        return self._hub.ring.closed


class _SendAPI(_Handle):
    """Sending, shared by ``RelaySender``, ``WeakSender`` and ``Relay``."""

    # send and send_nowait are the hottest calls of the library, so they are
    # instance attributes bound to the code that does the work, saving a
    # Python frame per message: send is Hub.send; send_nowait is the core's
    # Ring.send_nowait when nothing can queue (observable mode), else
    # Hub.write, which keeps the queue of sends waiting for room in order.
    __slots__ = {"_hub": "the relay's Hub", "send": _SEND_DOC,
                 "send_nowait": _SEND_NOWAIT_DOC}

    def __init__(self, hub):
        self._hub = hub
        self.send = hub.send
        self.send_nowait = hub.ring.send_nowait if hub.space is None else hub.write

    def send_threadsafe(self, value):
        """Send ``value`` from any thread; return a ``concurrent.futures.Future``.

        The future resolves to the msg id once every tracked handler of a
        matching type has finished the message, or raises what ``send()``
        would: ``RelayClosed`` (nothing written), ``RelayError``. The message
        is written at the call (one thread's sends stay in order) or, in
        reliable mode with a full ring, queued for room in the same order as
        ``send()``; closing the relay fails such a queued send at once with
        ``RelayClosed``. Needs no event loop. ``future.cancel()`` succeeds only
        while nothing is written. Do not block on ``.result()`` in the thread
        that runs the handlers' event loop: that loop could never finish them.
        """
        return self._hub.send_threadsafe(value)

    @property
    def handler_count(self):
        """Live tracked handlers (sinks and taps) on this relay."""
        return len(self._hub.handlers)

    @property
    def dropped(self):
        """Messages this relay lost to lag (each counted once, however many lost it)."""
        return self._hub.ring.dropped

    def weak(self):
        """A ``WeakSender``: same sending API, does not keep the relay open."""
        return WeakSender(self._hub)


class _CloseAPI:
    """Closing, for the handles that own a relay (``RelaySender``, ``Relay``)."""

    __slots__ = ()

    def close(self):
        """Close the relay. Idempotent.

        Later sends raise ``RelayClosed``; subscribers still receive everything
        sent before, then end; handlers drain and stop; derived relays drain,
        flush and close.
        """
        self._hub.close()

    async def aclose(self):
        """Close, then wait until handlers here and on derived relays have drained."""
        from .handlers import drain
        self._hub.close()
        await drain(self._hub)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()

    def __copy__(self):
        raise TypeError("%s cannot be copied: it is the single owner of its relay; "
                        "use weak() for more senders" % type(self).__name__)

    def __deepcopy__(self, memo):
        self.__copy__()

    def __reduce__(self):
        raise TypeError("%s cannot be pickled" % type(self).__name__)


class _ReceiveAPI(_Handle):
    """Subscribing, handlers and transformations, shared by ``RelayReceiver`` and ``Relay``."""

    __slots__ = ()

    def subscribe(self, T=None, envelopes=False):
        """An untracked ``Subscription`` to messages of type ``T`` (None: all types).

        ``T`` is a class or a tuple of classes, matched with ``isinstance``.
        With ``envelopes=True`` it yields ``Envelope(value, msg_id, origin,
        relay_id)``. It sees only messages sent after it was created.
        """
        hub = self._hub
        return Subscription(hub.ring, check_types(T), envelopes, hub.reader_closed)

    # Handlers (see handlers.py)

    def sink(self, T, fn, timeout=None):
        """Register a tracked terminal handler; return its ``Handler``."""
        from .handlers import register
        return register(self._hub, "sink", T, fn, timeout)

    def tap(self, T, fn, timeout=None):
        """Register a tracked observing handler; return this receiver, for chaining."""
        from .handlers import register
        register(self._hub, "tap", T, fn, timeout)
        return self

    def within(self, async_fn):
        """Run ``async_fn()`` as an untracked task; its exception becomes a ``RelayError``."""
        from .handlers import within
        return within(self._hub, async_fn)

    # Transformations (see transforms.py): each returns a derived Relay that
    # inherits this relay's capacity and mode unless given its own. They need
    # a running event loop (each derived relay is fed by a task on it).

    def filter(self, T, pred, on_error="close", *, capacity=None, mode=None):
        """A derived relay of the ``T`` messages for which ``pred(msg)`` is true.

        ``pred`` may be sync or async. If it raises, ``RelayError(source="filter")``
        is published here and the derived relay closes (``on_error="skip"``:
        that message is dropped instead).
        """
        from .transforms import derive
        return derive(self._hub, "filter", T, pred, on_error, capacity=capacity, mode=mode)

    def map(self, T, fn, on_error="close", *, capacity=None, mode=None):
        """A derived relay of ``fn(msg)`` for each ``T`` message (``None`` results too).

        ``fn`` may be sync or async; its failures are handled as in ``filter``.
        """
        from .transforms import derive
        return derive(self._hub, "map", T, fn, on_error, capacity=capacity, mode=mode)

    def filter_map(self, T, fn, on_error="close", *, capacity=None, mode=None):
        """Like ``map``, but a ``None`` result is dropped (``0`` and ``""`` are kept)."""
        from .transforms import derive
        return derive(self._hub, "filter_map", T, fn, on_error, capacity=capacity, mode=mode)

    def only(self, T, *, capacity=None, mode=None):
        """A derived relay of the ``T`` messages."""
        from .transforms import derive
        return derive(self._hub, "only", T, capacity=capacity, mode=mode)

    def exclude(self, T, *, capacity=None, mode=None):
        """A derived relay of every message that is not a ``T``."""
        from .transforms import derive
        return derive(self._hub, "exclude", T, capacity=capacity, mode=mode)

    def split(self, T, *, capacity=None, mode=None):
        """``(only(T), exclude(T))``."""
        return (self.only(T, capacity=capacity, mode=mode),
                self.exclude(T, capacity=capacity, mode=mode))

    def batch(self, T, size, timeout=None, on_error="close", *, capacity=None, mode=None):
        """A derived relay of lists of up to ``size`` ``T`` messages.

        With ``timeout`` (seconds) a partial list is sent once its first item
        has waited that long; the last partial list is sent at close.
        """
        from .transforms import batch
        return batch(self._hub, T, size, timeout, on_error, capacity=capacity, mode=mode)

    def forward(self, target):
        """Copy every message into ``target`` (sender, weak sender or relay).

        Wired at the call; returns the running ``asyncio.Task``, which ends when
        this relay has closed and was drained, or when ``target`` closes.
        Never closes ``target``; never delivers a message into the relay it
        entered at (so ``a->b`` plus ``b->a`` does not loop); untracked.
        """
        from .transforms import forward
        return forward(self._hub, target)


class RelaySender(_SendAPI, _CloseAPI):
    """The single owner of a relay: sends, and closes it.

    The relay closes when ``close()`` is called, when a ``with``/``async with``
    block ends, or when this object is garbage-collected. Not copyable: use
    ``weak()`` for more senders.
    """

    __slots__ = ("__weakref__",)

    def __del__(self):
        hub = getattr(self, "_hub", None)
        if hub is not None:
            hub.close()

    def __repr__(self):
        return "<RelaySender relay=%d%s>" % (self._hub.id, " closed" if self.closed else "")


class WeakSender(_SendAPI):
    """Sends into a relay without keeping it open (``tx.weak()``).

    Once the owner closes the relay, sends raise ``RelayClosed``.
    """

    __slots__ = ()

    def __repr__(self):
        return "<WeakSender relay=%d%s>" % (self._hub.id, " closed" if self.closed else "")


class RelayReceiver(_ReceiveAPI):
    """The observing side of a relay; freely shared; does not keep it open."""

    __slots__ = ("_hub", "__weakref__")

    def __init__(self, hub):
        self._hub = hub

    @property
    def dropped(self):
        return self._hub.ring.dropped

    def __repr__(self):
        return "<RelayReceiver relay=%d%s>" % (self._hub.id, " closed" if self.closed else "")


class Relay(_SendAPI, _CloseAPI, _ReceiveAPI):
    """A relay with both the sending and the receiving API (loopback).

    ``Relay.channel()`` is the usual entry point; ``Relay()`` is for tests,
    and every transformation returns a derived ``Relay``. A ``Relay()`` is
    closed when garbage-collected, like a ``RelaySender``; a derived relay is
    closed with its parent instead, and stops its forwarding when it is
    garbage-collected with nothing subscribed to it.
    """

    __slots__ = ("__weakref__",)

    def __init__(self, capacity=65536, mode="observable", *, _hub=None):
        super().__init__(_hub if _hub is not None else Hub(capacity, mode))

    @classmethod
    def channel(cls, capacity=65536, mode="observable"):
        """Create a relay; return ``(RelaySender, RelayReceiver)``.

        ``capacity``: ring slots (an int >= 1); memory grows with the backlog,
        not with the capacity. ``mode``: ``"observable"`` (default: a lagging
        subscriber loses the oldest messages, counted and announced as
        ``Dropped``) or ``"reliable"`` (nothing is lost; a full ring makes
        ``send()`` wait and ``send_nowait()`` raise ``RelayFull``).
        """
        hub = Hub(capacity, mode)
        return RelaySender(hub), RelayReceiver(hub)

    def __del__(self):
        hub = getattr(self, "_hub", None)
        if hub is None:
            return
        if hub.on_release is not None:
            hub.on_release()
        else:
            hub.close()

    def __repr__(self):
        return "<Relay %d%s>" % (self._hub.id, " closed" if self.closed else "")
