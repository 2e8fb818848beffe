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
user object dropped). Callbacks (wakers, ``on_drop``, completion callbacks)
are called after the lock is released.
"""

import threading
from collections import deque

from ._sentinels import CLOSED, EMPTY

__all__ = ["Ring", "Reader", "Completion", "EMPTY", "CLOSED",
           "WRITE_CLOSED", "WRITE_FULL"]


#: ``Ring.write`` results that are not message ids.
WRITE_CLOSED = 0
WRITE_FULL = -1

# Guards every Completion's counter. Completions are finished from whichever
# thread runs the handler, so they need a lock of their own; one shared lock
# is enough because each critical section is a few operations long.
_completion_lock = threading.Lock()


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
    the thread that finished last.
    """

    __slots__ = ("msg_id", "remaining", "error", "_callback")

    def __init__(self):
        self.msg_id = 0
        self.remaining = 0
        self.error = None
        self._callback = None

    @property
    def done(self):
        return self.remaining == 0

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
            callback(self)

    def when_done(self, callback):
        """Call ``callback(self)`` once ``remaining`` reaches zero.

        Returns False, without keeping ``callback``, if that already happened.
        """
        with _completion_lock:
            if self.remaining <= 0:
                return False
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
        """Tracked readers that would count a message like ``value`` now."""
        key = self._keys.get(type(value))
        return 0 if key is None else self._tracked[key]

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
            readers = list(self._readers)
            flags = [r._wants(tp) for r in readers]   # user code may run here
            with self._lock:
                key = len(self._key_types)
                self._key_types.append(tp)
                match = tracked = 0
                for r, flag in zip(readers, flags):
                    if r.closed:
                        flag = False
                    r._flags.append(flag)
                    if flag:
                        match += 1
                        tracked += r.tracked
                # Readers created after `readers` was copied cannot exist: the
                # registry lock is held. Readers closed meanwhile got False.
                self._match.append(match)
                self._tracked.append(tracked)
            self._keys[tp] = key
            return key

    def reader(self, types=None, tracked=False):
        """A new reader at the head of the ring.

        ``types``: None for every type, or a class or tuple of classes
        (matched with ``issubclass`` on each concrete type, once per type).
        """
        r = Reader(self, types, tracked)
        with self._registry:
            flags = [r._wants(tp) for tp in list(self._key_types)]
            with self._lock:
                r._flags = flags
                r._cursor = self._head
                self._readers.append(r)
                for key, flag in enumerate(flags):
                    if flag:
                        self._match[key] += 1
                        if tracked:
                            self._tracked[key] += 1
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
        evicted = None
        wakers = None
        with self._lock:
            if self.closed:
                return WRITE_CLOSED
            self._advance_tail()
            if self._head - self._tail >= self.capacity:
                if self.reliable:
                    return WRITE_FULL
                evicted = self._evict()
            seq = self._head
            self._head = seq + 1
            remaining = self._match[key]
            tracked = self._tracked[key]
            if completion is not None:
                completion.msg_id = seq + 1
                completion.remaining = tracked
                if not tracked:
                    completion = None
            self._slots[seq] = _Slot(value if remaining else None, key, remaining,
                                     origin or self.relay_id, completion)
            if not remaining and seq == self._tail:
                self._advance_tail()
            if self._n_parked:
                wakers = self._take_wakers(key)
        if evicted is not None:
            self._report_eviction(*evicted)
        if wakers:
            for waker in wakers:
                waker()
        return seq + 1

    def _advance_tail(self):
        slots = self._slots
        while self._tail < self._head and slots[self._tail].remaining == 0:
            del slots[self._tail]
            self._tail += 1

    def _evict(self):
        """Lose the oldest slot (it has readers left). Called with the lock held."""
        seq = self._tail
        slot = self._slots.pop(seq)
        self._tail = seq + 1
        losers = tracked_losers = 0
        for r in self._readers:
            if r._cursor <= seq and r._flags[slot.key]:
                r.dropped += 1
                losers += 1
                tracked_losers += r.tracked
        self.dropped += 1
        return (seq + 1, slot.value, losers, slot.completion, tracked_losers)

    def _report_eviction(self, msg_id, value, losers, completion, tracked_losers):
        # A tracked handler that lost the message counts as done with it.
        if completion is not None:
            for _ in range(tracked_losers):
                completion.finish()
        if self._on_drop is not None:
            self._on_drop(msg_id, value, losers)

    def _take_wakers(self, key):
        wakers = []
        for r in self._readers:
            if r._waker is not None and (key < 0 or r._flags[key]):
                wakers.append(r._waker)
                r._waker = None
                self._n_parked -= 1
        return wakers

    def publish(self, notice):
        """Deliver ``notice`` out of band to every open reader matching its type.

        It takes no ring slot and never waits; it works after close too (so
        handlers draining a closed relay can still report). Each reader keeps
        at most ``capacity`` unread notices; past that its oldest is lost and
        counted in its ``dropped``.
        """
        key = self._key_of(type(notice))
        wakers = None
        lost = []
        with self._lock:
            stamp = self._head
            for r in self._readers:
                if r._flags[key]:
                    r._notices.append((stamp, notice))
                    if len(r._notices) > self.capacity:
                        lost.append(r._notices.popleft())
                        r.dropped += 1
            if self._n_parked:
                wakers = self._take_wakers(key)
        del lost  # dropped outside the lock
        if wakers:
            for waker in wakers:
                waker()

    def close(self):
        """Close the ring: no more writes; readers drain, then get CLOSED."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            wakers = self._take_wakers(-1)
            space = self._space_waiter
            self._space_waiter = None
        for waker in wakers:
            waker()
        if space is not None:
            space()

    def wait_space(self, callback):
        """Reliable rings: call ``callback()`` once a slot frees (or on close).

        Returns False, without keeping ``callback``, if a write would fit now
        or the ring is closed.
        """
        with self._lock:
            self._advance_tail()
            if self.closed or self._head - self._tail < self.capacity:
                return False
            self._space_waiter = callback
            return True

    def _take_space_waiter(self):
        # Called with the lock held after the tail may have moved.
        if self._space_waiter is not None:
            self._advance_tail()
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

    After each ``pop`` that returns a message, ``msg_id``, ``origin`` and
    (tracked readers only) ``completion`` describe it. Notices (out-of-band
    messages from ``Ring.publish``) have ``msg_id`` 0.
    """

    __slots__ = ("_ring", "types", "tracked", "closed", "dropped", "msg_id",
                 "origin", "completion", "_flags", "_cursor", "_notices",
                 "_waker", "__weakref__")

    def __init__(self, ring, types, tracked):
        self._ring = ring
        self.types = types
        self.tracked = bool(tracked)
        self.closed = False
        self.dropped = 0
        self.msg_id = 0
        self.origin = 0
        self.completion = None
        self._flags = []
        self._cursor = 0
        self._notices = deque()
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

    def _take(self, out):
        """Take the next item into ``out`` (a list); return False if none."""
        ring = self._ring
        cursor = self._seek()
        notices = self._notices
        if notices and (cursor >= ring._head or notices[0][0] <= cursor):
            out.append(notices.popleft()[1])
            out.append((0, ring.relay_id, None))
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
        out.append((cursor + 1, slot.origin, slot.completion if self.tracked else None))
        if slot.remaining == 0 and cursor == ring._tail:
            ring._advance_tail()
        return True

    # -- consuming ------------------------------------------------------------

    def pop(self):
        """The next message for this reader, or ``EMPTY``, or ``CLOSED``."""
        ring = self._ring
        out = []
        with ring._lock:
            if self.closed:
                return CLOSED
            if not self._take(out):
                return CLOSED if ring.closed else EMPTY
            space = ring._take_space_waiter()
        self.msg_id, self.origin, self.completion = out[1]
        if space is not None:
            space()
        return out[0]

    def pop_many(self, n):
        """Up to ``n`` messages as a list (at least one), or ``EMPTY``/``CLOSED``.

        Metadata attributes describe the last message of the list.
        """
        if n < 1:
            raise ValueError("n must be >= 1, got %d" % n)
        ring = self._ring
        out = []
        with ring._lock:
            if self.closed:
                return CLOSED
            while len(out) < 2 * n and self._take(out):
                pass
            if not out:
                return CLOSED if ring.closed else EMPTY
            space = ring._take_space_waiter()
        self.msg_id, self.origin, self.completion = out[-1]
        if space is not None:
            space()
        return out[0::2]

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
            if self._waker is None:
                ring._n_parked += 1
            self._waker = waker
            return True

    def unpark(self):
        """Forget the waker given to ``park`` (if it was not called yet)."""
        ring = self._ring
        with ring._lock:
            if self._waker is not None:
                self._waker = None
                ring._n_parked -= 1

    @property
    def pending(self):
        """Messages and notices buffered for this reader."""
        ring = self._ring
        with ring._lock:
            if self.closed:
                return 0
            count = len(self._notices)
            cursor = max(self._cursor, ring._tail)
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
            for key, flag in enumerate(self._flags):
                if flag:
                    ring._match[key] -= 1
                    if self.tracked:
                        ring._tracked[key] -= 1
            for seq in range(max(self._cursor, ring._tail), ring._head):
                slot = ring._slots[seq]
                if self._flags[slot.key]:
                    slot.remaining -= 1
                    if self.tracked and slot.completion is not None:
                        owed.append(slot.completion)
                    if slot.remaining == 0:
                        released.append(slot.value)
                        slot.value = None
            self._cursor = ring._head
            ring._advance_tail()
            released.extend(self._notices)
            self._notices.clear()
            if self._waker is not None:
                self._waker = None
                ring._n_parked -= 1
            space = ring._take_space_waiter()
        del released  # last references dropped outside the lock
        if space is not None:
            space()
        return owed

    def __repr__(self):
        return "<Reader types=%r tracked=%s dropped=%d%s>" % (
            self.types, self.tracked, self.dropped, " closed" if self.closed else "")
