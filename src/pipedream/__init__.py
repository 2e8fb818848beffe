"""pipedream: an in-process, typed, heterogeneous event relay for asyncio.

One relay carries messages of any type; subscribers and handlers pick them by
type. ``await tx.send(x)`` waits for the tracked handlers of ``x``'s type and
raises ``RelayError`` if one failed. Delivery is a bounded broadcast ring:
in observable mode (default) a lagging subscriber loses the oldest messages,
counted and announced as ``Dropped``; in reliable mode nothing is lost and
senders wait for room.
"""

from ._backend import core_name
from .channel import Relay, RelayReceiver, RelaySender, WeakSender
from .errors import Empty, HandlerDetached, RelayClosed, RelayError, RelayFull, SendError
from .events import DeliveryMode, Dropped, Envelope
from .handlers import Handler
from .subscription import Subscription
from .transforms import merge

__version__ = "0.1.0"

__all__ = [
    "Relay", "RelaySender", "WeakSender", "RelayReceiver", "Subscription", "Handler",
    "Dropped", "Envelope", "DeliveryMode", "merge",
    "SendError", "RelayClosed", "RelayFull", "RelayError", "Empty", "HandlerDetached",
    "core_name",
]
