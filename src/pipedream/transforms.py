"""Transformations and topology: derived relays, ``forward`` and ``merge``.

A derived relay (``rx.filter(...)``, ``rx.map(...)``, ``rx.batch(...)``...) is
an ordinary relay with a hub of its own, filled by a *feed*: an untracked
reader on the parent, created during the call, and one task on the running
loop that drains that reader into the derived relay. ``forward`` is a feed into
a relay it does not own; ``merge`` is one derived relay with a feed per input.

What holds for every feed:

* Wiring is synchronous: the reader exists when the call returns, so a message
  sent right after it is never missed. There is no ready signal.
* Order: a feed handles its source's messages one at a time, in send order.
* Tracking boundary: the feed reads untracked and writes untracked, so the
  source's ``send()`` never waits for anything downstream, and the handlers of
  a derived relay report their errors on the derived relay only.
* Origin: a message keeps the id of the relay where it entered (a batch takes
  its first item's), so ``forward``'s echo prevention holds through
  transformations.
* Relay events (``Dropped``, ``RelayError``) stay on the relay where they
  happened: feeds carry only messages that went through the ring.
* Supervision: a ``fn``/``pred`` that raises (or a delivery that fails, e.g. a
  type check of the target's readers that raises) publishes
  ``RelayError(msg_id, source, error)`` on the source relay, ``msg_id`` being
  the source message's id. ``on_error="close"`` (default) then closes the
  derived relay; ``on_error="skip"`` drops that message and goes on. A feed
  never dies silently: anything unexpected is published the same way, logged,
  and closes the derived relay.
* Cascade close: when the source closes, the feed first handles everything
  already buffered, flushes a partial batch, then closes the derived relay,
  whose own feeds do the same.
* No leak: a derived relay that no ``Relay`` handle references and that nothing
  reads (no subscription, handler or downstream feed) cancels its feed,
  releases its reader on the parent and closes.
"""

import asyncio
import inspect
import logging
import math

from ._sentinels import CLOSED, EMPTY
from .channel import Hub, Relay, RelaySender, WeakSender, check_types, _ReceiveAPI
from .errors import RelayClosed, RelayError
from .handlers import cancel_requested
from .subscription import Waiters, check_count

__all__ = ["derive", "batch", "forward", "merge"]

log = logging.getLogger("pipedream")

#: Messages a feed handles in a row before it lets other tasks run.
_FAIR_SHARE = 1024

#: The name each operator gives its callable, for error messages.
_CALLABLE_NAME = {"filter": "pred", "map": "fn", "filter_map": "fn"}

#: ``RelayError.source`` for each operator (``only``/``exclude`` are type filters).
_SOURCE = {"filter": "filter", "map": "map", "filter_map": "filter_map",
           "only": "filter", "exclude": "filter", "batch": "batch",
           "forward": "forward", "merge": "merge"}

_ON_ERROR = ("close", "skip")


# -- argument checks -----------------------------------------------------------

def _check_on_error(on_error):
    if on_error not in _ON_ERROR:
        raise ValueError("on_error must be 'close' or 'skip', got %r" % (on_error,))


def _check_timeout(timeout):
    """None, or a number of seconds >= 0 (inf means no timeout)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, got %r" % (timeout,))
    if math.isnan(timeout) or timeout < 0:
        raise ValueError("timeout must be >= 0, got %r" % (timeout,))
    return None if math.isinf(timeout) else float(timeout)


def _running_loop(what):
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "%s needs a running event loop: the new relay is fed by a task on that "
            "loop. Call it from async code (inside asyncio.run(...))." % what) from None


def _is_async(fn):
    """True if calling ``fn`` returns a coroutine to await (async def, a partial
    of one, or an object with an ``async def __call__``)."""
    return (inspect.iscoroutinefunction(fn)
            or inspect.iscoroutinefunction(getattr(type(fn), "__call__", None)))


def _child_hub(parent, capacity, mode):
    # A derived relay inherits its parent's capacity and mode unless given its own.
    return Hub(parent.capacity if capacity is None else capacity,
               parent.mode if mode is None else mode)


def _call_soon(loop, callback):
    """Run ``callback`` on ``loop`` soon; safe from any thread and from finalizers
    (it touches no ring). Nothing to do if the loop is closed: its tasks are gone."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass


# -- the life of a derived relay -----------------------------------------------

class _Link:
    """The life of one derived relay: its hub, the feeds that fill it, its handle.

    The derived relay closes when its last feed ends (its sources closed and
    were drained), when a feed fails with ``on_error="close"``, or when it is
    closed directly. Once its ``Relay`` handle is gone and nothing reads it,
    its feeds are cancelled (which closes it).
    """

    __slots__ = ("loop", "hub", "feeds", "released")

    def __init__(self, loop, hub):
        self.loop = loop
        self.hub = hub
        self.feeds = []
        self.released = False
        hub.on_release = self.release
        hub.on_reader_closed = self.check_idle

    def release(self):
        # Relay.__del__: no handle is left. Any thread, any moment (GC).
        self.released = True
        self.check_idle()

    def check_idle(self):
        # Also called after one of the derived relay's readers closed (any
        # thread). Once released, nothing can add a reader, so "idle" is final.
        if self.released and self.feeds and not self.hub.ring.reader_count:
            _call_soon(self.loop, self._stop_if_idle)

    def _stop_if_idle(self):
        if self.released and not self.hub.ring.reader_count:
            for feed in list(self.feeds):
                feed.task.cancel()

    def feed_ended(self, feed):
        self.feeds.remove(feed)
        if not self.feeds:
            self.hub.close()


class _Feed:
    """A reader on a ``source`` hub and the task that drains it into ``target``.

    ``link`` is the ``_Link`` of the derived relay being filled, or None for
    ``forward`` (which never closes its target).
    """

    __slots__ = ("loop", "source", "target", "link", "op", "on_error", "reader",
                 "waiters", "task", "error", "_wake")

    def __init__(self, loop, source, target, types, op, on_error="close", link=None):
        self.loop = loop
        self.source = source
        self.target = target
        self.link = link
        self.op = op
        self.on_error = on_error
        self.error = None
        self.task = None
        # Wiring happens here, synchronously: from now on the source keeps
        # every matching message for this reader.
        self.reader = source.ring.reader(types, False)
        self.waiters = Waiters(self.reader)
        # Wakes the task when the target closes, so it ends without waiting
        # for the source's next message.
        self._wake = self._target_closed

    def start(self, loop_name, *args):
        """Start the task running ``self.<loop_name>(*args)``; return it."""
        self.task = task = self.loop.create_task(
            self.run(loop_name, args),
            name="pipedream %s %d->%d" % (self.op, self.source.id, self.target.id))
        # A task cancelled before its first step never runs run()'s finally:
        # this callback cleans up then (end() is idempotent).
        task.add_done_callback(self._task_done)
        self.source.drain_waits.append(task)
        if self.link is not None:
            self.link.feeds.append(self)
            self.source.children.append(self.target)
        self.target.on_close[self._wake] = None
        return task

    def _target_closed(self):
        _call_soon(self.loop, self.waiters.wake_all)

    # -- failures -----------------------------------------------------------

    def failed(self, msg_id, error):
        """``error`` happened on source message ``msg_id``. True: skip it and go on.

        Publishes ``RelayError`` on the source relay; with ``on_error="close"``
        the feed stops (and ``run`` closes the derived relay).
        """
        relay_error = RelayError(msg_id, _SOURCE[self.op], error)
        self.source.publish(relay_error)
        if self.on_error == "skip":
            return True
        self.error = relay_error
        return False

    def crashed(self, msg_id, error):
        """Anything unexpected: publish, log, stop (never silently)."""
        self.error = RelayError(msg_id, _SOURCE[self.op], error,
                                "internal failure of the %s feed" % self.op)
        self.source.publish(self.error)
        log.error("pipedream: the %s feed from relay %d into relay %d failed; it stopped",
                  self.op, self.source.id, self.target.id, exc_info=error)

    # -- delivery -----------------------------------------------------------

    async def deliver(self, value, origin):
        """Write into the target, waiting for room (in order) in reliable mode.

        Returns False once the target is closed. (``transform`` inlines the
        fast path, ``target.offer``, and calls this when it did not fit.)
        """
        try:
            await self.target.put(value, origin)
        except RelayClosed:
            return False
        return True

    # -- the task -----------------------------------------------------------

    async def run(self, loop_name, args):
        """Run one of the loops below, then clean up, whatever happened."""
        try:
            await getattr(self, loop_name)(*args)
        except Exception as error:       # a bug in a loop below: never silent
            self.crashed(self.reader.msg_id, error)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:     # e.g. a KeyboardInterrupt out of fn
            # The feed stops (the derived relay closes) and the exception goes
            # on; say which feed it stopped rather than leave a bare task error.
            self.error = RelayError(self.reader.msg_id, _SOURCE[self.op], exc, "the feed stopped")
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                self.loop.call_exception_handler({
                    "message": "pipedream: the %s feed from relay %d into relay %d stopped"
                               % (self.op, self.source.id, self.target.id),
                    "exception": exc, "task": self.task})
            raise
        finally:
            self.end()
        if self.error is not None and self.link is None:
            raise self.error                # forward's awaitable raises it

    def _task_done(self, task):
        if not self.reader.closed:
            self.end()
        if not task.cancelled():
            task.exception()    # retrieved: run() already reported how it ended

    def end(self):
        if self.reader.closed:
            return
        source, target = self.source, self.target
        self.reader.close()
        target.on_close.pop(self._wake, None)
        if not source.closed:
            # Ended on its own (target closed, failure, released): forget it.
            # After a source close, the source's aclose() still waits for it.
            _discard(source.drain_waits, self.task)
            if self.link is not None:
                _discard(source.children, target)
        if self.link is not None:
            if self.error is not None:
                target.close()
            self.link.feed_ended(self)
        # The source may be a derived relay that just lost its last reader.
        source.reader_closed()

    async def transform(self, fn, keep, excluded, skip_origin):
        """The loop of filter, map, filter_map, only, exclude, forward and merge.

        ``fn``: the user's callable or None (pass-through). ``keep``: what to
        do with its result: "filter" (truthy keeps the message), "filter_map"
        (None drops it) or "map". ``excluded``: types to skip (exclude).
        ``skip_origin``: never deliver messages that entered there (forward).
        """
        reader, waiters, target = self.reader, self.waiters, self.target
        pop, offer = reader.pop, target.offer
        is_async = fn is not None and _is_async(fn)
        budget = _FAIR_SHARE
        while True:
            value = pop()
            if value is EMPTY:
                if target.ring.closed:
                    return
                budget = _FAIR_SHARE
                await waiters.wait()
                continue
            if value is CLOSED:
                return                   # the source closed and is drained
            msg_id = reader.msg_id
            if not msg_id:
                continue                 # a relay event: it stays on its relay
            origin = reader.origin
            if origin == skip_origin:
                continue                 # echo prevention (forward)
            if excluded is not None and isinstance(value, excluded):
                continue
            if fn is not None:
                try:
                    result = fn(value)
                    if is_async:
                        result = await result
                except Exception as error:
                    if self.failed(msg_id, error):
                        continue
                    return
                except asyncio.CancelledError as error:
                    if cancel_requested():
                        raise
                    # Raised by fn itself (not a cancellation of this feed).
                    if self.failed(msg_id, error):
                        continue
                    return
                if keep == "filter":
                    if not result:
                        continue
                elif keep == "filter_map":
                    if result is None:
                        continue
                    value = result
                else:
                    value = result
            try:
                written = offer(value, origin)   # the fast path: never waits
                if written <= 0:
                    if not written or not await self.deliver(value, origin):
                        return           # the target closed
            except Exception as error:
                if self.failed(msg_id, error):
                    continue
                return
            budget -= 1
            if not budget:
                budget = _FAIR_SHARE
                await asyncio.sleep(0)   # let the loop's other tasks run

    async def batch(self, size, timeout):
        """The loop of batch: lists of up to ``size``; a partial list goes out
        once its first item has waited ``timeout`` seconds, and at close."""
        reader, waiters, target, loop = self.reader, self.waiters, self.target, self.loop
        pop = reader.pop
        items = []
        first_id = first_origin = 0
        deadline = timer = None
        budget = _FAIR_SHARE
        try:
            while True:
                value = pop()
                if value is not EMPTY and value is not CLOSED:
                    if not reader.msg_id:
                        continue             # a relay event: it stays on its relay
                    if not items:
                        first_id, first_origin = reader.msg_id, reader.origin
                        if timeout is not None:
                            deadline = loop.time() + timeout
                    items.append(value)
                    budget -= 1
                    if not budget:
                        budget = _FAIR_SHARE
                        await asyncio.sleep(0)   # let the loop's other tasks run
                    if len(items) < size:
                        continue
                elif value is EMPTY:
                    if target.ring.closed:
                        return
                    if not items or deadline is None or loop.time() < deadline:
                        if items and deadline is not None and timer is None:
                            timer = loop.call_at(deadline, waiters.wake_all)
                        budget = _FAIR_SHARE
                        await waiters.wait()
                        continue
                elif not items:
                    return                   # closed and drained, nothing to flush
                # A full batch, an expired partial batch, or the last one at close.
                if timer is not None:
                    timer.cancel()
                    timer = None
                out, items, deadline = items, [], None
                try:
                    if not await self.deliver(out, first_origin):
                        return
                except Exception as error:
                    if not self.failed(first_id, error):
                        return
                if value is CLOSED:
                    return
        finally:
            if timer is not None:
                timer.cancel()      # a cancelled feed leaves no timer behind
            if items:
                # The batch relay was closed directly, or this feed was
                # cancelled (a discarded relay, loop shutdown): these items
                # were taken from the parent and cannot be delivered. Say so.
                log.warning("batch into relay %d stopped with %d item(s) of a partial "
                            "batch not delivered (first msg id %d on the parent)",
                            target.id, len(items), first_id)


def _discard(items, item):
    try:
        items.remove(item)
    except ValueError:
        pass


# -- the public entry points (channel.py delegates here) ------------------------

def derive(hub, op, T, fn=None, on_error="close", *, capacity=None, mode=None):
    """A derived relay of ``hub``: ``op`` in filter, map, filter_map, only, exclude.

    Raises ``TypeError`` naming ``T`` or the callable (``pred``/``fn``),
    ``ValueError`` naming ``on_error`` (or ``capacity``/``mode``), and
    ``RuntimeError`` without a running event loop. A transformation of a
    closed relay returns a closed relay.
    """
    types = check_types(T)
    if op in _CALLABLE_NAME:
        if not callable(fn):
            raise TypeError("%s must be callable, got %r" % (_CALLABLE_NAME[op], fn))
    elif op not in ("only", "exclude"):
        raise ValueError("unknown transformation %r" % (op,))
    _check_on_error(on_error)
    loop = _running_loop("%s()" % op)
    child = _child_hub(hub, capacity, mode)
    if hub.closed:
        child.close()
        return Relay(_hub=child)
    link = _Link(loop, child)
    if op == "exclude":
        # The core matches by inclusion only: read every type, skip T here.
        feed = _Feed(loop, hub, child, None, op, on_error, link)
        feed.start("transform", None, None, object if types is None else types, 0)
    else:
        feed = _Feed(loop, hub, child, types, op, on_error, link)
        feed.start("transform", fn, op, None, 0)
    return Relay(_hub=child)


def batch(hub, T, size, timeout=None, on_error="close", *, capacity=None, mode=None):
    """A derived relay of lists of up to ``size`` messages of type ``T``.

    With ``timeout`` (seconds), a partial list is sent once its first item has
    waited that long; at close the last partial list is sent. Batching runs no
    user code: ``on_error`` applies to a failed delivery of a list (a type
    check of the derived relay's readers that raises).

    Raises ``TypeError``/``ValueError`` naming ``T``, ``size``, ``timeout`` or
    ``on_error``; ``RuntimeError`` without a running event loop.
    """
    types = check_types(T)
    check_count(size, "size")
    timeout = _check_timeout(timeout)
    _check_on_error(on_error)
    loop = _running_loop("batch()")
    child = _child_hub(hub, capacity, mode)
    if hub.closed:
        child.close()
        return Relay(_hub=child)
    feed = _Feed(loop, hub, child, types, "batch", on_error, _Link(loop, child))
    feed.start("batch", size, timeout)
    return Relay(_hub=child)


def _retrieve(task):
    # forward's failure is published on the source relay and logged; whoever
    # awaits the task gets it too, and nobody else sees "never retrieved".
    if not task.cancelled():
        task.exception()


def forward(hub, target):
    """Copy every message of ``hub`` into ``target``; return the running task.

    Wired at the call. Ends when the source has closed and everything it held
    was copied, or when the target closes; never closes the target. Messages
    keep their origin and are never delivered into the relay they entered at
    (echo prevention). Untracked. Cancelling the task stops the forwarding.
    If a delivery fails, ``RelayError(source="forward")`` is published on the
    source and raised by the task.

    Raises ``TypeError`` if ``target`` is not a ``RelaySender``,
    ``WeakSender`` or ``Relay``; ``ValueError`` if it is the source itself;
    ``RuntimeError`` without a running event loop.
    """
    if not isinstance(target, (RelaySender, WeakSender, Relay)):
        raise TypeError("target must be a RelaySender, WeakSender or Relay, got %r" % (target,))
    target_hub = target._hub
    if target_hub is hub:
        raise ValueError("target is the source relay itself (%d): forwarding a relay "
                         "into itself would loop" % hub.id)
    loop = _running_loop("forward()")
    feed = _Feed(loop, hub, target_hub, None, "forward")
    task = feed.start("transform", None, None, None, target_hub.id)
    task.add_done_callback(_retrieve)
    return task


def merge(*receivers, capacity=None, mode=None):
    """A relay that carries the messages of every receiver, origins kept.

    Each input's messages arrive in their send order; inputs interleave. The
    merged relay closes once every input has closed and was drained. It takes
    its capacity and mode from the first receiver unless given its own.

    Raises ``ValueError`` without receivers, ``TypeError`` if one is not a
    ``RelayReceiver`` or ``Relay``, ``RuntimeError`` without a running loop.
    """
    if not receivers:
        raise ValueError("merge() needs at least one receiver")
    for rx in receivers:
        if not isinstance(rx, _ReceiveAPI):
            raise TypeError("merge() takes receivers (RelayReceiver or Relay), got %r" % (rx,))
    loop = _running_loop("merge()")
    hubs = [rx._hub for rx in receivers]
    child = _child_hub(hubs[0], capacity, mode)
    open_hubs = [hub for hub in hubs if not hub.closed]
    if not open_hubs:
        child.close()
        return Relay(_hub=child)
    link = _Link(loop, child)
    for hub in open_hubs:
        feed = _Feed(loop, hub, child, None, "merge", "close", link)
        feed.start("transform", None, None, None, 0)
    return Relay(_hub=child)
