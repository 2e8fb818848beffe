"""The relay core in pure Python: the twin of ``_core.pyx``.

Same names, same interface, same results as the Cython core; it exists so the
package works without a compiler and so the two can be tested against each
other (a difference between them is a bug in one of them).

What lives here (and nothing else; no asyncio):

* ``Ring``: one per relay. A bounded broadcast ring. A message is written once
  whatever the number of readers. Each slot keeps the object, its type key and
  the number of matching readers that still have to read it. Message ids are
  ``seq + 1``: unique and strictly increasing per relay.
* ``Reader``: one cursor into a ring, for a subscription or a handler. It only
  matches (and is only charged for) the types it asked for.
* ``Completion``: how many tracked handlers still owe one message, and the
  first error any of them reported.

Rules that keep it safe to call from several threads: every change to shared
state happens under ``Ring._lock``, and no user code runs while that lock is
held (no ``issubclass`` on user classes, no callbacks, no last reference to a
user object dropped). Callbacks (wakers, ``on_drop``, space waiters,
completion callbacks) are called after the lock is released.

The locked sections also allocate no garbage-collected object (no tuple, no
list or iterator, no slot object): such an allocation can start the cycle
collector, whose finalizers (a subscription's ``__del__`` closing its reader,
a user's ``__del__`` sending a message) would then run under the lock and
deadlock on it. Everything a locked section needs is allocated before it,
and everything it releases is dropped after it. (On Python 3.12+ the
collector may also start at any bytecode boundary, which pure Python cannot
prevent; the Cython core runs no bytecode under its lock.)

A callback that raises ``Exception`` is logged (logger ``pipedream``) and the
core carries on: by then the core's own work is done (a message popped, a
write made), and letting the error escape would lose that message or skip
the wakers after it, leaving tasks parked forever.
"""

import logging
import operator
import threading
from collections import deque

from ._sentinels import CLOSED, EMPTY
from .errors import RelayClosed, RelayFull

__all__ = ["Ring", "Reader", "Completion", "EMPTY", "CLOSED",
           "WRITE_CLOSED", "WRITE_FULL", "check_capacity"]


#: ``Ring.write`` results that are not message ids.
WRITE_CLOSED = 0
WRITE_FULL = -1

# Guards every Completion's counter. Completions are finished from whichever
# thread runs the handler, so they need a lock of their own; one shared lock
# is enough because each critical section is a few operations long.
_completion_lock = threading.Lock()

_log = logging.getLogger("pipedream")

# Proves that a Reader comes from Ring.reader(): a reader that is not
# registered with its ring has no type flags and no cursor.
_READER_TOKEN = object()


def _callback_failed(callback):
    # Called from an ``except`` block: logs the exception being handled.
    _log.exception("pipedream core: callback %r raised", callback)


def _call(callback, *args):
    """Run a callback given to the core; an ``Exception`` is logged, not raised."""
    try:
        callback(*args)
    except Exception:
        _callback_failed(callback)


def _call_each(callbacks):
    """Call each callback in order (see ``_call``).

    A ``BaseException`` from one of them (a KeyboardInterrupt raised by a
    handler running inline in a waker, say) does not stop the others: each
    waker was taken from its reader, so one left uncalled would leave that
    reader parked forever. The first such exception is raised at the end.
    """
    pending = None
    for callback in callbacks:
        try:
            _call(callback)
        except BaseException as exc:
            if pending is None:
                pending = exc
    if pending is not None:
        raise pending


def check_capacity(capacity):
    """Validate a ring capacity: an int >= 1 (bool is not accepted)."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError("capacity must be an int, got %s" % type(capacity).__name__)
    if capacity < 1:
        raise ValueError("capacity must be >= 1, got %d" % capacity)
    if capacity > 0xFFFFFFFF:
        raise ValueError("capacity must be <= 4294967295, got %d" % capacity)


class Completion:
    """Completion counter of one tracked message.

    The ring sets ``msg_id`` and ``remaining`` (the tracked readers that
    matched the message when it was written). Each of those handlers calls
    ``finish()`` once; the first error passed to ``finish()`` is kept. When
    ``remaining`` reaches zero the callback given to ``when_done()`` runs, in
    the thread that finished last (an exception from it is logged).
    """

    __slots__ = ("msg_id", "remaining", "error", "value", "layer", "_callback", "_waiter")

    def __init__(self):
        self.msg_id = 0
        self.remaining = 0
        self.error = None
        self.value = None       # the message, kept only while tracked
        self.layer = None       # free for the layer above (its waiting state)
        self._callback = None
        self._waiter = None     # the ring's waiter, for __await__

    @property
    def done(self):
        return self.remaining == 0

    def __await__(self):
        """What ``send()`` returns is the message's Completion: awaiting it
        gives the msg id once every tracked handler counted for the message
        has finished it, or raises the first error reported. With nothing to
        wait for it completes without suspending. The waiting itself is the
        ring's ``waiter`` (given by the asyncio layer): no asyncio here."""
        if self.remaining:
            yield from self._waiter(self).__await__()
        if self.error is not None:
            raise self.error
        return self.msg_id

    def finish(self, error=None):
        """One tracked handler is done with the message (``error`` if it failed)."""
        with _completion_lock:
            if self.remaining <= 0:
                return
            if error is not None and self.error is None:
                self.error = error
            self.remaining -= 1
            if self.remaining:
                return
            callback = self._callback
            self._callback = None
        if callback is not None:
            _call(callback, self)

    def when_done(self, callback):
        """Call ``callback(self)`` once ``remaining`` reaches zero.

        Returns False, without keeping ``callback``, if that already happened.
        """
        with _completion_lock:
            if self.remaining <= 0:
                return False
            old = self._callback    # replaced: released after the lock
            self._callback = callback
            return True

    def __repr__(self):
        return "<Completion msg_id=%d remaining=%d>" % (self.msg_id, self.remaining)


class _Slot:
    __slots__ = ("value", "key", "remaining", "origin", "completion")

    def __init__(self, value, key, remaining, origin, completion):
        self.value = value
        self.key = key
        self.remaining = remaining
        self.origin = origin
        self.completion = completion


class Ring:
    """A bounded broadcast ring with per-type readers.

    ``capacity`` is the maximum number of slots; storage grows with the
    backlog. ``reliable`` rings refuse to overwrite an unread slot
    (``write`` returns ``WRITE_FULL``); observable rings evict the oldest slot,
    count the loss for each reader that had not read it, and call
    ``on_drop(msg_id, value, readers)`` after the write.
    """

    def __init__(self, capacity, reliable=False, relay_id=0, on_drop=None):
        check_capacity(capacity)
        self.capacity = capacity
        self.reliable = bool(reliable)
        self.relay_id = relay_id
        self.closed = False
        self.dropped = 0
        self._on_drop = on_drop
        #: waiter(completion) -> awaitable: how a Completion awaits its
        #: handlers (set by the asyncio layer; see Completion.__await__).
        self.waiter = None
        self._lock = threading.Lock()
        # Serializes changes to the type table and the reader list; held while
        # user code (issubclass) runs, so it is reentrant and never taken
        # while _lock is held.
        self._registry = threading.RLock()
        self._keys = {}          # concrete type -> key
        self._key_types = []     # key -> concrete type
        self._match = []         # key -> number of open readers matching it
        self._tracked = []       # key -> number of open tracked readers matching it
        self._readers = []
        self._reader_gen = 0     # readers ever registered (see _register)
        self._slots = {}         # seq -> _Slot, for tail <= seq < head
        self._head = 0           # seq of the next write
        self._tail = 0           # oldest seq still held
        self._n_parked = 0
        self._space_waiter = None

    # -- inspection -------------------------------------------------------

    @property
    def reader_count(self):
        return len(self._readers)

    @property
    def buffered(self):
        """Number of slots in use (messages not yet read by every reader)."""
        return self._head - self._tail

    @property
    def last_msg_id(self):
        return self._head

    def tracked_for(self, value):
        """Tracked readers that would count a message like ``value`` now.

        Registers ``value``'s type if it is new (readers' filters may run).
        """
        key = self._key_of(type(value))
        with self._lock:
            return self._tracked[key]

    # -- types ----------------------------------------------------------------

    def _key_of(self, tp):
        key = self._keys.get(tp)
        if key is None:
            key = self._register(tp)
        return key

    def _register(self, tp):
        with self._registry:
            key = self._keys.get(tp)
            if key is not None:
                return key
            while True:
                gen = self._reader_gen
                readers = list(self._readers)
                flags = [r._wants(tp) for r in readers]   # user code may run here
                with self._lock:
                    # Readers only join under the registry lock, which is held:
                    # one can have joined only from the user code above, on this
                    # thread. It would miss this type's flag; start again.
                    if self._reader_gen != gen:
                        continue
                    key = len(self._key_types)
                    self._key_types.append(tp)
                    match = tracked = 0
                    for i in range(len(readers)):
                        r = readers[i]
                        flag = flags[i] and not r.closed   # closed meanwhile: False
                        r._flags.append(flag)
                        if flag:
                            match += 1
                            tracked += r.tracked
                    self._match.append(match)
                    self._tracked.append(tracked)
                    break
            self._keys[tp] = key
            return key

    def reader(self, types=None, tracked=False):
        """A new reader at the head of the ring.

        ``types``: None for every type, or a class or tuple of classes
        (matched with ``issubclass`` on each concrete type, once per type).
        Raises ``TypeError`` at once if ``issubclass`` rejects ``types``.
        """
        if types is not None:
            issubclass(object, types)   # a bad filter fails here, not in a later write
        r = Reader(self, types, tracked, _READER_TOKEN)
        with self._registry:
            flags = []
            while True:
                key_types = self._key_types
                while len(flags) < len(key_types):      # user code may run here
                    flags.append(r._wants(key_types[len(flags)]))
                with self._lock:
                    # A type registered from the user code above (this thread)
                    # still needs its flag: go round again.
                    if len(flags) != len(self._key_types):
                        continue
                    r._flags = flags
                    r._cursor = self._head
                    r.closed = False
                    self._readers.append(r)
                    self._reader_gen += 1
                    for key in range(len(flags)):
                        if flags[key]:
                            self._match[key] += 1
                            if r.tracked:
                                self._tracked[key] += 1
                    break
        return r

    # -- writing --------------------------------------------------------------

    def write(self, value, origin=0, completion=None):
        """Write ``value``; return its msg id, ``WRITE_CLOSED`` or ``WRITE_FULL``.

        ``origin``: id of the relay where the message entered (0: this one).
        ``completion``: if given, it receives the msg id and the number of
        tracked readers that matched; it is attached to the message when that
        number is not zero.
        """
        key = self._key_of(type(value))
        slot = _Slot(value, key, 0, origin or self.relay_id, None)
        released = []       # slots and objects let go under the lock
        evicted = []        # [msg_id, value, losers, completion, tracked_losers]
        wakers = []
        with self._lock:
            if self.closed:
                return WRITE_CLOSED
            self._advance_tail(released)
            if self._head - self._tail >= self.capacity:
                if self.reliable:
                    return WRITE_FULL
                self._evict(evicted, released)
            seq = self._head
            self._head = seq + 1
            remaining = self._match[key]
            tracked = self._tracked[key]
            if completion is not None:
                completion.msg_id = seq + 1
                completion.remaining = tracked
                if tracked:
                    slot.completion = completion
            slot.remaining = remaining
            if not remaining:
                slot.value = None   # nobody will read it (the caller holds value)
            self._slots[seq] = slot
            if not remaining and seq == self._tail:
                self._advance_tail(released)
            if self._n_parked:
                self._take_wakers(key, wakers)
        del released
        if completion is not None and completion.remaining:
            # What awaiting the send needs if it has to wait (see Completion).
            completion.value = value
            completion._waiter = self.waiter
        if evicted:
            self._report_eviction(*evicted)
        _call_each(wakers)
        return seq + 1

    def send_nowait(self, value):
        """send_nowait(value): write ``value`` now and return its msg id.

        Never waits for handlers (they still get the message, on their own
        tasks). Safe from any thread. Raises ``RelayClosed`` after close and,
        in reliable mode when the ring is full, ``RelayFull`` (nothing written).
        (This is ``RelaySender.send_nowait`` of an observable relay.)
        """
        msg_id = self.write(value, 0, None)
        if msg_id > 0:
            return msg_id
        if msg_id == WRITE_FULL:
            raise RelayFull("relay %s is full (reliable mode, capacity %d)"
                            % (self.relay_id, self.capacity))
        raise RelayClosed("relay %s is closed" % self.relay_id)

    def _advance_tail(self, released):
        # Released slots go to ``released``: a slot may hold the last
        # reference to a Completion (and through it to user objects).
        slots = self._slots
        while self._tail < self._head and slots[self._tail].remaining == 0:
            released.append(slots.pop(self._tail))
            self._tail += 1

    def _evict(self, evicted, released):
        """Lose the oldest slot (it has readers left). Called with the lock held."""
        seq = self._tail
        slot = self._slots.pop(seq)
        released.append(slot)
        self._tail = seq + 1
        losers = tracked_losers = 0
        readers = self._readers
        for i in range(len(readers)):
            r = readers[i]
            if r._cursor <= seq and r._flags[slot.key]:
                r.dropped += 1
                losers += 1
                tracked_losers += r.tracked
        self.dropped += 1
        evicted.append(seq + 1)
        evicted.append(slot.value)
        evicted.append(losers)
        evicted.append(slot.completion)
        evicted.append(tracked_losers)

    def _report_eviction(self, msg_id, value, losers, completion, tracked_losers):
        # A tracked handler that lost the message counts as done with it.
        if completion is not None:
            for _ in range(tracked_losers):
                completion.finish()
        if self._on_drop is not None:
            _call(self._on_drop, msg_id, value, losers)

    def _take_wakers(self, key, wakers):
        # key < 0: every parked reader.
        readers = self._readers
        for i in range(len(readers)):
            r = readers[i]
            if r._waker is not None and (key < 0 or r._flags[key]):
                wakers.append(r._waker)
                r._waker = None
                self._n_parked -= 1

    def publish(self, notice):
        """Deliver ``notice`` out of band to every open reader matching its type.

        It takes no ring slot and never waits; it works after close too (so
        handlers draining a closed relay can still report). Each reader keeps
        at most ``capacity`` unread notices; past that its oldest is lost and
        counted in its ``dropped``. A reader gets a notice after the messages
        written before it and before those written after it.
        """
        key = self._key_of(type(notice))
        wakers = []
        lost = []
        with self._lock:
            stamp = self._head
            readers = self._readers
            for i in range(len(readers)):
                r = readers[i]
                if r._flags[key]:
                    r._notices.append(notice)
                    r._stamps.append(stamp)
                    if len(r._notices) > self.capacity:
                        lost.append(r._notices.popleft())
                        r._stamps.popleft()
                        r.dropped += 1
            if self._n_parked:
                self._take_wakers(key, wakers)
        del lost  # dropped outside the lock
        _call_each(wakers)

    def close(self):
        """Close the ring: no more writes; readers drain, then get CLOSED."""
        wakers = []
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._take_wakers(-1, wakers)
            space = self._space_waiter
            self._space_waiter = None
        _call_each(wakers)
        if space is not None:
            _call(space)

    def wait_space(self, callback):
        """Reliable rings: call ``callback()`` once a slot frees (or on close).

        Returns False, without keeping ``callback``, if a write would fit now
        or the ring is closed. One waiter at a time: a new one replaces the
        previous one.
        """
        released = []
        with self._lock:
            self._advance_tail(released)
            if self.closed or self._head - self._tail < self.capacity:
                return False
            released.append(self._space_waiter)
            self._space_waiter = callback
            return True

    def _take_space_waiter(self, released):
        # Called with the lock held after the tail may have moved.
        if self._space_waiter is not None:
            self._advance_tail(released)
            if self._head - self._tail < self.capacity:
                waiter = self._space_waiter
                self._space_waiter = None
                return waiter
        return None

    def __repr__(self):
        return "<Ring relay=%s capacity=%d buffered=%d readers=%d%s>" % (
            self.relay_id, self.capacity, self.buffered, len(self._readers),
            " closed" if self.closed else "")


class Reader:
    """One reader's cursor into a ring. Single consumer: one task pops at a time.

    Made by ``Ring.reader()`` only. After each ``pop`` that returns a message,
    ``msg_id``, ``origin`` and (tracked readers only) ``completion`` describe
    it. Notices (out-of-band messages from ``Ring.publish``) have ``msg_id`` 0.
    """

    __slots__ = ("_ring", "types", "tracked", "closed", "dropped", "msg_id",
                 "origin", "completion", "_flags", "_cursor", "_notices",
                 "_stamps", "_waker", "__weakref__")

    def __init__(self, ring, types, tracked, _token=None):
        if _token is not _READER_TOKEN:
            raise TypeError("Reader objects are made by Ring.reader()")
        self._ring = ring
        self.types = types
        self.tracked = bool(tracked)
        self.closed = True      # until Ring.reader() has registered it
        self.dropped = 0
        self.msg_id = 0
        self.origin = 0
        self.completion = None
        self._flags = []
        self._cursor = 0
        self._notices = deque()     # unread notices, oldest first
        self._stamps = deque()      # the ring's head when each was published
        self._waker = None

    def _wants(self, tp):
        return self.types is None or issubclass(tp, self.types)

    def matches(self, value):
        """True if messages of ``value``'s type are delivered to this reader."""
        key = self._ring._key_of(type(value))
        return bool(self._flags[key]) if key < len(self._flags) else False

    # Everything below with a leading underscore runs with the ring lock held.

    def _seek(self):
        """Move the cursor to the next matching slot (or the head)."""
        ring = self._ring
        cursor = self._cursor
        if cursor < ring._tail:
            cursor = ring._tail
        head = ring._head
        slots = ring._slots
        flags = self._flags
        while cursor < head and not flags[slots[cursor].key]:
            cursor += 1
        self._cursor = cursor
        return cursor

    def _ready(self):
        if self.closed or self._notices or self._ring.closed:
            return True
        return self._seek() < self._ring._head

    def _take(self, out, released):
        """Take the next item into ``out``; return False if none.

        Appends four items (no tuple: see the module docstring): value,
        msg_id, origin, completion.
        """
        ring = self._ring
        cursor = self._seek()
        notices = self._notices
        if notices and (cursor >= ring._head or self._stamps[0] <= cursor):
            self._stamps.popleft()
            out.append(notices.popleft())
            out.append(0)
            out.append(ring.relay_id)
            out.append(None)
            return True
        if cursor >= ring._head:
            return False
        slot = ring._slots[cursor]
        value = slot.value
        slot.remaining -= 1
        if slot.remaining == 0:
            slot.value = None
        self._cursor = cursor + 1
        out.append(value)
        out.append(cursor + 1)
        out.append(slot.origin)
        out.append(slot.completion if self.tracked else None)
        if slot.remaining == 0 and cursor == ring._tail:
            ring._advance_tail(released)
        return True

    # -- consuming ------------------------------------------------------------

    def pop(self):
        """The next message for this reader, or ``EMPTY``, or ``CLOSED``."""
        ring = self._ring
        out = []
        released = []
        with ring._lock:
            if self.closed:
                return CLOSED
            if not self._take(out, released):
                return CLOSED if ring.closed else EMPTY
            space = ring._take_space_waiter(released)
        del released
        self.msg_id = out[1]
        self.origin = out[2]
        self.completion = out[3]
        if space is not None:
            _call(space)
        return out[0]

    def pop_many(self, n):
        """Up to ``n`` messages as a list (at least one), or ``EMPTY``/``CLOSED``.

        Metadata attributes describe the last message of the list.
        ``n`` is an integer (``operator.index``) >= 1.
        """
        n = operator.index(n)
        if n < 1:
            raise ValueError("n must be >= 1, got %d" % n)
        ring = self._ring
        out = []
        released = []
        limit = 4 * n
        with ring._lock:
            if self.closed:
                return CLOSED
            while len(out) < limit and self._take(out, released):
                pass
            if not out:
                return CLOSED if ring.closed else EMPTY
            space = ring._take_space_waiter(released)
        del released
        self.msg_id = out[-3]
        self.origin = out[-2]
        self.completion = out[-1]
        if space is not None:
            _call(space)
        return out[0::4]

    def park(self, waker):
        """Ask for ``waker()`` once something is ready for this reader.

        Returns False (and keeps nothing) if something is ready now: pop
        instead. The waker may be called from any thread, after a write,
        a notice, or a close; it is called at most once per park.
        """
        ring = self._ring
        with ring._lock:
            if self._ready():
                return False
            old = self._waker       # replaced: released after the lock
            if old is None:
                ring._n_parked += 1
            self._waker = waker
            return True

    def unpark(self):
        """Forget the waker given to ``park`` (if it was not called yet)."""
        ring = self._ring
        with ring._lock:
            old = self._waker       # released after the lock
            if old is not None:
                self._waker = None
                ring._n_parked -= 1

    def headroom(self):
        """Writes that fit before the ring wraps to this reader's oldest unread message.

        ``capacity`` minus the slots from that message to the head, or
        ``capacity`` if this reader has nothing unread (or is closed). In a
        reliable ring, 0 means the ring is full and its oldest slot waits for
        (at least) this reader: no write can succeed until it reads.
        """
        ring = self._ring
        with ring._lock:
            if self.closed:
                return ring.capacity
            return ring.capacity - (ring._head - self._seek())

    @property
    def pending(self):
        """Messages and notices buffered for this reader."""
        ring = self._ring
        with ring._lock:
            if self.closed:
                return 0
            count = len(self._notices)
            cursor = self._cursor
            if cursor < ring._tail:
                cursor = ring._tail
            for seq in range(cursor, ring._head):
                if self._flags[ring._slots[seq].key]:
                    count += 1
            return count

    def close(self):
        """Unsubscribe: release every claim this reader has on the ring.

        Returns the completions of tracked messages this reader had not read
        (a tracked reader owes them), for the caller to finish.
        """
        ring = self._ring
        owed = []
        released = []
        with ring._lock:
            if self.closed:
                return owed
            self.closed = True
            ring._readers.remove(self)
            flags = self._flags
            for key in range(len(flags)):
                if flags[key]:
                    ring._match[key] -= 1
                    if self.tracked:
                        ring._tracked[key] -= 1
            cursor = self._cursor
            if cursor < ring._tail:
                cursor = ring._tail
            for seq in range(cursor, ring._head):
                slot = ring._slots[seq]
                if flags[slot.key]:
                    slot.remaining -= 1
                    if self.tracked and slot.completion is not None:
                        owed.append(slot.completion)
                    if slot.remaining == 0:
                        released.append(slot.value)
                        slot.value = None
            self._cursor = ring._head
            ring._advance_tail(released)
            notices = self._notices
            while notices:
                released.append(notices.popleft())
            self._stamps.clear()
            if self._waker is not None:
                released.append(self._waker)
                self._waker = None
                ring._n_parked -= 1
            space = ring._take_space_waiter(released)
        del released  # last references dropped outside the lock
        if space is not None:
            _call(space)
        return owed

    def __repr__(self):
        return "<Reader types=%r tracked=%s dropped=%d%s>" % (
            self.types, self.tracked, self.dropped, " closed" if self.closed else "")
