"""Exceptions raised by pipedream, and the ``RelayError`` event.

``SendError`` is the base of what a sender can get back: ``RelayClosed``,
``RelayFull`` and ``RelayError``. ``Empty`` is not a send error: it only
tells ``recv_nowait`` callers that nothing is buffered.
"""

__all__ = ["SendError", "RelayClosed", "RelayFull", "RelayError", "Empty",
           "HandlerDetached"]

#: The ``source`` values a ``RelayError`` can carry.
SOURCES = frozenset({"sink", "tap", "map", "filter", "filter_map", "batch", "within",
                     "forward", "merge"})


class SendError(Exception):
    """Base class of ``RelayClosed``, ``RelayFull`` and ``RelayError``."""


class RelayClosed(SendError):
    """The relay (or the subscription) is closed.

    Raised by ``send``/``send_nowait`` after close, and by ``recv`` once the
    relay is closed and everything sent before the close has been received.
    """


class RelayFull(SendError):
    """A reliable relay has no free slot: ``send_nowait`` wrote nothing."""


class Empty(Exception):
    """``recv_nowait``: nothing is buffered for this subscription right now."""


class HandlerDetached(Exception):
    """A tracked handler stopped before it finished a message it was counted for.

    It is the ``error`` of the ``RelayError`` that the message's ``send()``
    raises. ``reason`` says why: ``"closed"`` (``Handler.close()``),
    ``"cancelled"`` (its task was cancelled), ``"loop closed"``, or
    ``"stopped by <Name>"`` (a ``BaseException`` such as KeyboardInterrupt
    escaped its function).
    """

    def __init__(self, handler, reason):
        super().__init__("%s stopped (%s) before finishing this message" % (handler, reason))
        self.handler = handler
        self.reason = reason


class RelayError(SendError):
    """A handler or a transformation failed on one message.

    ``msg_id``: the message it failed on (0 for ``within`` and for a reliable
    send refused before it was written). ``source``: ``"sink"``, ``"tap"``,
    ``"within"``, ``"map"``, ``"filter"`` (also for ``only``/``exclude``),
    ``"filter_map"``, ``"batch"``, ``"forward"`` or ``"merge"``.
    ``error``: the original exception, also set as ``__cause__``.

    It travels two ways: the message's ``send()`` raises it, and it is
    published on the relay as an event for ``subscribe(RelayError)``.
    """

    def __init__(self, msg_id, source, error, detail=None):
        if msg_id:
            text = "%s failed on message %s: %r" % (source, msg_id, error)
        else:       # within, or a send refused before it was written
            text = "%s failed: %r" % (source, error)
        if detail:
            text += " (" + detail + ")"
        super().__init__(text)
        self.msg_id = msg_id
        self.source = source
        self.error = error
        self.__cause__ = error

    def __reduce__(self):
        return (type(self), (self.msg_id, self.source, self.error))
