"""Writes that wait: reliable mode's queue for room, and ``send_threadsafe``.

A reliable ring refuses a write that would reuse a slot some matching reader
has not read yet (``Ring.write`` returns ``WRITE_FULL``). Every write that has
to wait for room queues in one ``SpaceQueue`` per relay, in call order:
``send()`` (an awaitable ``QueuedSend``), ``send_threadsafe()`` (a
``concurrent.futures.Future``), and the forwarders' ``Hub.put()`` and
``Hub.room()``. The queue is written in that order as readers free slots.
While anything is queued, a new send queues behind it and ``send_nowait()``
raises ``RelayFull``: nothing jumps the queue.

Wake-ups. The core keeps one space-waiter callback per ring
(``Ring.wait_space``); this queue owns it and serves everything queued from
it. The core calls it from the thread of the reader that freed a slot, right
after that reader's ``pop``/``close`` (possibly from a garbage-collected
subscription). The callback does no writing there: it schedules the drain on
the event loop running in that thread (``call_soon``), or drains at once if
that thread runs no loop. Each waiting sender is then woken on its own loop
(thread-safely). The drain is a plain loop callback, not a task: nothing can
cancel it half-way or make it die silently.

Threads. The ring is thread-safe, so a producer thread writes itself when
there is room; only a write that must wait is queued, and it is written by
whichever thread frees the room. ``send_threadsafe`` needs no event loop of
its own for that: it works from any thread, whatever loop the relay's
readers run on.
"""

import asyncio
import collections
import concurrent.futures
import threading

from .errors import RelayClosed, RelayError
from .subscription import wake_future

__all__ = ["SpaceQueue", "QueuedSend", "send_threadsafe"]

_current_loop = asyncio._get_running_loop     # None outside a loop, never raises
_current_task = asyncio.current_task

# What a queued entry is.
SEND = "send"       # send(): tracked; waited for by QueuedSend
THREAD = "thread"   # send_threadsafe(): tracked; settles a concurrent future
PUT = "put"         # Hub.put(): untracked (forwarders)
ROOM = "room"       # Hub.room(): writes nothing, returns when its turn has room

# Where an entry is. The drain moves the head entry QUEUED -> WRITING -> DONE
# (or back to QUEUED if the write found the ring full again); cancel() and
# close() take only QUEUED entries, so a message is written once or never.
QUEUED, WRITING, DONE = "queued", "writing", "done"


class _Entry:
    __slots__ = ("kind", "value", "origin", "state", "cancelled", "msg_id",
                 "completion", "error", "waiters", "future")

    def __init__(self, kind, value, origin, future=None):
        self.kind = kind
        self.value = value
        self.origin = origin
        self.state = QUEUED
        self.cancelled = False   # cancel() came while the entry was being written
        self.msg_id = 0
        self.completion = None
        self.error = None        # RelayClosed if the relay closed first
        self.waiters = []        # (loop, asyncio future) of tasks awaiting the write
        self.future = future     # THREAD: the concurrent future to settle


class SpaceQueue:
    """The FIFO of writes waiting for room in one reliable relay.

    ``queue`` is truthy while anything waits: senders check it first and
    queue behind (``send``) or refuse (``send_nowait``). Thread-safe.
    """

    __slots__ = ("_hub", "_ring", "_lock", "queue", "_draining", "_again")

    def __init__(self, hub):
        self._hub = hub
        self._ring = hub.ring
        # Reentrant: a garbage-collected subscription can call _on_space (and
        # so the drain) in the middle of any code of this thread.
        self._lock = threading.RLock()
        self.queue = collections.deque()
        self._draining = False   # one drain at a time...
        self._again = False      # ...which runs once more if room came meanwhile

    # -- queueing ------------------------------------------------------------------

    def _enqueue(self, kind, value, origin, future=None):
        """Queue a write; raise ``RelayClosed`` if the relay is closed."""
        entry = _Entry(kind, value, origin, future)
        with self._lock:
            if self._ring.closed:
                raise RelayClosed("relay %d is closed" % self._hub.id)
            self.queue.append(entry)
            first = len(self.queue) == 1
        if first:
            # Nobody is waiting for room yet: ask the core to tell us. If there
            # is room already (a reader freed a slot since our write failed),
            # drain now: no wake-up would ever come.
            if not self._ring.wait_space(self._on_space):
                self._on_space()
        return entry

    def send(self, value, origin=0):
        """``send()`` on a full ring (or behind queued sends): queue it, return a ``QueuedSend``.

        Raises ``RelayClosed`` at the call if the relay is closed.
        """
        return QueuedSend(self, self._enqueue(SEND, value, origin))

    async def put(self, value, origin=0):
        """Queue an untracked write and wait until it is written; return its msg id.

        Raises ``RelayClosed`` if the relay closes first (nothing written).
        Cancelling it while it waits writes nothing.
        """
        entry = self._enqueue(PUT, value, origin)
        if entry.state is not DONE:
            await self.wait(entry)
        if entry.error is not None:
            raise entry.error
        return entry.msg_id

    async def room(self):
        """Wait for the turn of a write queued now, and for room for it (or close).

        It reserves nothing: the caller must still write, and a write that
        finds the ring full again must queue again. ``put()`` keeps its place.
        """
        if self._ring.closed:
            return
        entry = self._enqueue(ROOM, None, 0)
        if entry.state is not DONE:
            await self.wait(entry)

    def send_thread(self, value, origin, future):
        """``send_threadsafe`` behind the queue: settle ``future`` once written."""
        try:
            entry = self._enqueue(THREAD, value, origin, future)
        except RelayClosed as exc:
            _set_exception(future, exc)
            return
        # future.cancel() from the waiting thread takes the entry out.
        future.add_done_callback(lambda f: f.cancelled() and self.cancel(entry))

    async def wait(self, entry):
        """Wait until ``entry`` is written (or failed). Cancelling it cancels the entry."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if entry.state is DONE:
                return
            entry.waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            self.cancel(entry)
            raise

    def cancel(self, entry):
        """Take ``entry`` out if it is still waiting: it will never be written.

        Returns False if it is written already (or being written). Anyone
        else awaiting the same send gets ``CancelledError``, as when awaiting
        a future someone cancelled.
        """
        with self._lock:
            if entry.state is WRITING:
                entry.cancelled = True     # the drain drops it if that write fails
                return False
            if entry.state is not QUEUED:
                return False
            entry.state = DONE
            entry.error = _cancelled()
            self.queue.remove(entry)
        self._finish(entry)
        return True

    def close(self):
        """Fail every queued write with ``RelayClosed`` (nothing written), at once."""
        with self._lock:
            queue = self.queue
            # Only the head can be in the middle of a write: the drain finishes it.
            keep = queue[0] if queue and queue[0].state is WRITING else None
            failed = [entry for entry in queue if entry is not keep]
            queue.clear()
            if keep is not None:
                queue.append(keep)
            for entry in failed:
                entry.state = DONE
                if entry.kind is not ROOM:
                    entry.error = self._closed_error()
        for entry in failed:
            self._finish(entry)

    def _closed_error(self):
        return RelayClosed("relay %d closed while this send waited for room; "
                           "nothing was written" % self._hub.id)

    # -- draining ------------------------------------------------------------------

    def _on_space(self):
        # The core's space waiter: called after a read freed a slot, or on close,
        # from the reader's thread, maybe from a finalizer. Only schedule here.
        loop = _current_loop()
        if loop is None:
            self._drain()
        else:
            loop.call_soon(self._drain)

    def _drain(self):
        """Write queued entries in order while they fit; then wait for room again."""
        with self._lock:
            if self._draining:
                self._again = True      # the running drain goes round once more
                return
            self._draining = True
            self._again = False
        try:
            while self._drain_one():
                pass
        except BaseException:
            # Never leave the queue marked as draining: later sends would wait forever.
            with self._lock:
                self._draining = False
                if self.queue and self.queue[0].state is WRITING:
                    self.queue[0].state = QUEUED
            raise

    def _drain_one(self):
        """Deal with the head entry; False once the queue is empty or waits for room."""
        with self._lock:
            if not self.queue:
                self._draining = False
                return False
            entry = self.queue[0]
            entry.state = WRITING
        full = self._attempt(entry)
        if full and entry.kind is not ROOM and not entry.cancelled:
            # Ask the core for a wake-up. False: room came meanwhile (or close).
            full = self._ring.wait_space(self._on_space)
            if not full:
                with self._lock:
                    entry.state = QUEUED
                return True             # try it again now
        with self._lock:
            if full and not entry.cancelled:
                entry.state = QUEUED    # waits for room; _on_space starts a drain
                if self._again:         # ...or already did while we registered
                    self._again = False
                    return True
                self._draining = False
                return False
            if entry.cancelled and not entry.msg_id and entry.error is None:
                entry.error = _cancelled()      # cancelled during a write that failed
            entry.state = DONE
            self.queue.popleft()
        self._finish(entry)
        return True

    def _attempt(self, entry):
        """Try to write ``entry``; True if the ring is full (it stays queued)."""
        ring = self._ring
        hub = self._hub
        if entry.kind is ROOM:
            # Its turn: done if a write would fit; otherwise the core calls us back.
            return ring.wait_space(self._on_space)
        if entry.kind is THREAD and not _claim(entry.future):
            entry.error = _cancelled()  # cancelled by its thread: write nothing
            return False
        completion = None
        if entry.kind is not PUT and hub.handlers:
            completion = hub.core.Completion()
        try:
            msg_id = ring.write(entry.value, entry.origin, completion)
        except Exception as exc:        # (a type check in user code): the sender gets it
            entry.error = exc
            return False
        if msg_id > 0:
            entry.msg_id = msg_id
            entry.completion = completion
            return False
        if msg_id == hub.core.WRITE_FULL:
            return True
        entry.error = self._closed_error()
        return False

    def _finish(self, entry):
        """Tell whoever waits for ``entry`` (called once, outside the lock)."""
        for loop, fut in entry.waiters:
            wake_future(loop, fut)
        entry.waiters = None
        if entry.future is not None:
            if entry.error is not None:
                _set_exception(entry.future, entry.error)
            elif entry.msg_id:
                _settle(entry.future, entry.msg_id, entry.completion)

    # -- the deadlock guard ----------------------------------------------------------

    def stuck_behind(self, entry, reader):
        """True if ``entry`` can never be written unless ``reader`` reads first.

        Counts the writes queued ahead of it: each takes a slot, and once the
        ring wraps to ``reader``'s oldest unread message (``headroom()``), no
        further write fits until ``reader`` reads it.
        """
        capacity = self._hub.capacity
        room = reader.headroom()
        pinned = room < capacity        # reader has an unread message in the ring
        with self._lock:
            ahead = []
            for queued in self.queue:
                if queued is entry:
                    break
                if queued.kind is not ROOM:
                    ahead.append(queued.value)
        for value in ahead:
            if room <= 0:
                return True
            if pinned:
                room -= 1
            elif reader.matches(value):
                pinned = True           # written, this one waits for reader
                room = capacity - 1
        return room <= 0


class QueuedSend:
    """What a reliable ``send()`` returns when it had to queue for room.

    The message is queued, in order, when ``send()`` returns; it is written
    when room frees even if nobody awaits this. Awaiting it waits for the
    write, then for the tracked handlers, and returns the msg id (as
    an unqueued send). Raises ``RelayClosed`` if the relay closed first
    (nothing was written), ``RelayError`` as an unqueued send does, and ``RelayError`` at once if
    the awaiting task is a tracked handler of this relay that the write would
    have to wait for (deadlock guard; the message stays queued). Cancelling the
    await while it waits for room takes the message out: nothing is written.
    """

    __slots__ = ("_space", "_entry")

    def __init__(self, space, entry):
        self._space = space
        self._entry = entry

    @property
    def msg_id(self):
        """The message id once written; 0 while it waits for room."""
        return self._entry.msg_id

    @property
    def value(self):
        return self._entry.value

    @property
    def queued(self):
        """True while the message waits for room."""
        return self._entry.state is not DONE

    def __await__(self):
        entry = self._entry
        if entry.state is not DONE:
            yield from self._wait_written().__await__()
        if entry.error is not None:
            raise entry.error
        if entry.completion is None:
            return entry.msg_id
        return (yield from entry.completion.__await__())

    async def _wait_written(self):
        space = self._space
        hub = space._hub
        if hub.tasks and self._entry.state is not DONE:
            handler = hub.tasks.get(_current_task())
            reader = _reader_of(handler)
            if reader is not None and space.stuck_behind(self._entry, reader):
                raise RelayError(0, handler.source, RuntimeError(
                    "deadlock: this %s awaits send() on its own reliable relay, which is "
                    "full, and the write can only get room once this handler reads on. "
                    "The message stays queued and will be written when it does. Use "
                    "send_nowait() (RelayFull when full) here, or send to a derived or "
                    "another relay." % handler), detail="message not written yet")
        await space.wait(self._entry)

    def __repr__(self):
        entry = self._entry
        if entry.state is DONE and entry.msg_id:
            return "<QueuedSend msg_id=%d>" % entry.msg_id
        return "<QueuedSend %s>" % ("closed" if entry.error else "waiting for room")


def send_threadsafe(hub, value, origin=0):
    """``tx.send_threadsafe(value)``: a ``concurrent.futures.Future`` of the msg id.

    Callable from any thread. The message is written at the call if there is
    room (so one thread's sends keep their order), otherwise queued for room
    in the same order as ``send()``. The future resolves to the msg id once
    the tracked handlers are done with it, or to the exception ``send()``
    would raise: ``RelayClosed`` (also when the relay closes while it waits for
    room; nothing written), ``RelayError``. ``future.cancel()`` succeeds only
    while nothing is written.
    """
    future = concurrent.futures.Future()
    space = hub.space
    if space is not None and space.queue:
        space.send_thread(value, origin, future)
        return future
    completion = hub.core.Completion() if hub.handlers else None
    msg_id = hub.ring.write(value, origin, completion)
    if msg_id > 0:
        future.set_running_or_notify_cancel()   # not shared yet: cannot be cancelled
        _settle(future, msg_id, completion)
    elif msg_id == hub.core.WRITE_FULL:
        space.send_thread(value, origin, future)
    else:
        future.set_exception(RelayClosed("relay %d is closed" % hub.id))
    return future


# -- helpers ------------------------------------------------------------------------

def _reader_of(handler):
    """The core reader of a tracked handler (None if not a handler or detached)."""
    if handler is None:
        return None
    reader = getattr(handler, "reader", None)
    if reader is None:
        reader = getattr(handler, "_reader", None)
    return None if reader is None or reader.closed else reader


def _cancelled():
    return asyncio.CancelledError(
        "this send was cancelled while it waited for room; nothing was written")


def _claim(future):
    """Mark a thread's future running before its write; False if it was cancelled."""
    try:
        return future.running() or future.set_running_or_notify_cancel()
    except RuntimeError:        # settled by someone else: nothing to write for it
        return False


def _settle(future, msg_id, completion):
    """Resolve a thread's future once the tracked handlers finished ``msg_id``."""
    def done(completion):
        if completion.error is not None:
            _set_exception(future, completion.error)
        else:
            _set_result(future, msg_id)
    if completion is None or not completion.when_done(done):
        if completion is not None and completion.error is not None:
            _set_exception(future, completion.error)
        else:
            _set_result(future, msg_id)


def _set_result(future, result):
    try:
        future.set_result(result)
    except concurrent.futures.InvalidStateError:   # cancelled meanwhile
        pass


def _set_exception(future, error):
    try:
        future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass
