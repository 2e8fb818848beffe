"""Values that pipedream itself hands to subscribers: ``Dropped``, ``Envelope``.

``Dropped`` and ``RelayError`` (see ``errors``) are published by a relay out
of band: they never take a ring slot. ``Envelope`` wraps a delivered value
with its metadata for ``subscribe(..., envelopes=True)``.
"""

import enum
from typing import Any, NamedTuple

__all__ = ["Dropped", "Envelope", "DeliveryMode", "type_name"]


def type_name(tp):
    """Module-qualified name of a type: ``builtins.str``, ``app.events.Click``."""
    return "%s.%s" % (tp.__module__, tp.__qualname__)


class Dropped:
    """One message lost to lag in observable mode.

    ``msg_id`` and ``relay_id`` name the lost message, ``type_name`` its
    module-qualified type, ``subscribers`` how many readers lost it
    (subscriptions, tracked handlers, and the feeds of derived relays,
    ``forward`` and ``merge``).
    """

    __slots__ = ("msg_id", "relay_id", "type_name", "subscribers")

    def __init__(self, msg_id, relay_id, type_name, subscribers):
        self.msg_id = msg_id
        self.relay_id = relay_id
        self.type_name = type_name
        self.subscribers = subscribers

    def _key(self):
        return (self.msg_id, self.relay_id, self.type_name, self.subscribers)

    def __eq__(self, other):
        if type(other) is not Dropped:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return "Dropped(msg_id=%r, relay_id=%r, type_name=%r, subscribers=%r)" % self._key()


class Envelope(NamedTuple):
    """A delivered value with its metadata.

    ``msg_id``: the id ``send()`` returned for it (0 for events the relay
    published itself: ``Dropped``, ``RelayError``). ``origin``: id of the relay
    where the message entered. ``relay_id``: the relay it was received from.
    """

    value: Any
    msg_id: int
    origin: int
    relay_id: int


class DeliveryMode(str, enum.Enum):
    """What a full ring does.

    ``OBSERVABLE`` (default): the oldest message is lost for the readers that
    had not read it, counted and announced as ``Dropped``; senders never wait.
    ``RELIABLE``: nothing is lost; ``send()`` waits for room, ``send_nowait()``
    raises ``RelayFull``.
    """

    OBSERVABLE = "observable"
    RELIABLE = "reliable"

    @classmethod
    def parse(cls, mode):
        try:
            return cls(mode)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError("mode must be one of %s, got %r" % (valid, mode)) from None

    def __str__(self):
        return self.value
