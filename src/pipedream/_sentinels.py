"""The two markers a reader returns instead of a message.

Shared by both cores so that code above them can compare by identity
whichever core made the ring.
"""

__all__ = ["EMPTY", "CLOSED"]


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return "<pipedream." + self._name + ">"

    def __reduce__(self):
        return self._name


#: ``Reader.pop`` result: nothing buffered for this reader right now.
EMPTY = _Sentinel("EMPTY")
#: ``Reader.pop`` result: the ring is closed (or the reader is) and drained.
CLOSED = _Sentinel("CLOSED")
