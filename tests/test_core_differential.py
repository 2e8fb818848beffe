"""The two cores, side by side: any difference between them is a bug in one.

A hypothesis state machine drives a Cython ring and a pure-Python ring with
the same random operations (readers of a few type filters, tracked or not;
writes of a few value types, with origins and completions; pops; reader and
ring closes; notices; parking; space waiters) and compares every result and
every observable counter after each step.
"""

import importlib

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine, initialize, invariant, precondition, rule)

try:
    CY = importlib.import_module("pipedream._core")
except ImportError as exc:
    pytest.skip("the Cython core is not built (%s)" % exc, allow_module_level=True)
PY = importlib.import_module("pipedream._core_py")


class Note:
    """A notice type that only readers of every type (None, object) match."""

    def __init__(self, n):
        self.n = n


TYPES = [None, int, str, (int, bool), object]
ORIGINS = [0, 3, 9]         # 9 is the rings' relay id
RELAY_ID = 9

VALUES = st.one_of(
    st.integers(-3, 3), st.sampled_from(["", "a", "bc"]), st.booleans(),
    st.sampled_from([0.0, 1.5, -2.25]), st.none())
NOTICES = st.one_of(VALUES, st.integers(0, 9).map(Note))
ERRORS = st.sampled_from([None, None, "e1", "e2"])


def canon(value):
    """Comparable description of a message (keeps bool apart from int)."""
    if isinstance(value, Note):
        return ("Note", value.n)
    return (type(value).__name__, value)


class Side:
    """One core's ring and everything recorded about it."""

    def __init__(self, core, capacity, reliable):
        self.core = core
        self.drops = []
        self.wakes = []
        self.spaces = []
        self.ring = core.Ring(capacity, reliable, RELAY_ID, self.on_drop)
        self.readers = []
        self.completions = []       # every Completion given to write, in order

    def on_drop(self, msg_id, value, readers):
        self.drops.append((msg_id, canon(value), readers))

    def completion_index(self, completion):
        if completion is None:
            return None
        for i, c in enumerate(self.completions):
            if c is completion:
                return i
        raise AssertionError("unknown completion %r" % (completion,))

    def item(self, value, reader):
        if value is self.core.EMPTY:
            return "EMPTY"
        if value is self.core.CLOSED:
            return "CLOSED"
        return (canon(value), reader.msg_id, reader.origin,
                self.completion_index(reader.completion))


class CoreDiff(RuleBasedStateMachine):

    @initialize(capacity=st.integers(1, 8), reliable=st.booleans())
    def setup(self, capacity, reliable):
        self.sides = [Side(CY, capacity, reliable), Side(PY, capacity, reliable)]

    def both(self, fn):
        results = [fn(side) for side in self.sides]
        assert results[0] == results[1], results
        return results[0]

    def n_readers(self):
        return len(self.sides[0].readers)

    def draw_reader(self, data):
        return data.draw(st.integers(0, self.n_readers() - 1), label="reader")

    # -- readers ------------------------------------------------------------

    @rule(types=st.integers(0, len(TYPES) - 1), tracked=st.booleans())
    def new_reader(self, types, tracked):
        def go(s):
            s.readers.append(s.ring.reader(TYPES[types], tracked))
        self.both(go)

    @precondition(lambda self: self.n_readers())
    @rule(data=st.data(), finish=st.booleans(), roll=st.integers(0, 4))
    def close_reader(self, data, finish, roll):
        if roll not in (1, 2):
            return      # less often than the rest: readers accumulate
        i = self.draw_reader(data)

        def go(s):
            owed = s.readers[i].close()
            if finish:
                for c in owed:
                    c.finish()
            return [s.completion_index(c) for c in owed]
        self.both(go)

    # -- writing -------------------------------------------------------------

    @rule(value=VALUES, origin=st.sampled_from(ORIGINS), tracked=st.booleans())
    def write(self, value, origin, tracked):
        def go(s):
            c = s.core.Completion() if tracked else None
            s.completions.append(c)
            result = s.ring.write(value, origin, c)
            return result, None if c is None else (c.msg_id, c.remaining)
        self.both(go)

    @rule(count=st.one_of(st.integers(1, 12), st.integers(240, 300)),
          origin=st.sampled_from(ORIGINS))
    def write_many(self, count, origin):
        # Crosses the Cython core's 256-slot chunks.
        self.both(lambda s: [s.ring.write(i, origin) for i in range(count)])

    @rule(notice=NOTICES)
    def publish(self, notice):
        self.both(lambda s: s.ring.publish(notice))

    @rule(roll=st.integers(0, 9))
    def close_ring(self, roll):
        # Rare (hypothesis favours the ends of a range, so not 0 or 9): after
        # a close most rules have little left to explore.
        if roll == 4:
            self.both(lambda s: s.ring.close())

    # -- reading -------------------------------------------------------------

    @precondition(lambda self: self.n_readers())
    @rule(data=st.data())
    def pop(self, data):
        i = self.draw_reader(data)
        self.both(lambda s: s.item(s.readers[i].pop(), s.readers[i]))

    @precondition(lambda self: self.n_readers())
    @rule(data=st.data(), n=st.one_of(st.integers(1, 4), st.integers(1, 400)))
    def pop_many(self, data, n):
        i = self.draw_reader(data)

        def go(s):
            r = s.readers[i]
            got = r.pop_many(n)
            if got is s.core.EMPTY or got is s.core.CLOSED:
                return s.item(got, r)
            return [canon(v) for v in got], s.item(got[-1], r)
        self.both(go)

    @precondition(lambda self: self.n_readers())
    @rule(data=st.data(), error=ERRORS)
    def finish(self, data, error):
        i = self.draw_reader(data)

        def go(s):
            c = s.readers[i].completion
            if c is not None:
                c.finish(error)
            return s.completion_index(c)
        self.both(go)

    @precondition(lambda self: self.n_readers())
    @rule(data=st.data())
    def park(self, data):
        i = self.draw_reader(data)
        self.both(lambda s: s.readers[i].park(lambda: s.wakes.append(i)))

    @precondition(lambda self: self.n_readers())
    @rule(data=st.data(), value=NOTICES, what=st.integers(0, 3))
    def inspect(self, data, value, what):
        # The cheap calls, folded into one rule so they do not crowd out the rest.
        i = self.draw_reader(data)
        if what == 0:
            self.both(lambda s: s.readers[i].unpark())
        elif what == 1:
            self.both(lambda s: s.readers[i].matches(value))
        elif what == 2:
            self.both(lambda s: s.ring.tracked_for(value))
        else:
            self.both(lambda s: s.ring.wait_space(lambda: s.spaces.append(len(s.spaces))))

    # -- after every step ------------------------------------------------------

    @invariant()
    def same_state(self):
        def state(s):
            ring = s.ring
            return (
                ring.dropped, ring.buffered, ring.last_msg_id, ring.reader_count,
                ring.closed, ring.capacity, ring.reliable, ring.relay_id,
                [(r.dropped, r.closed, r.pending, r.msg_id, r.origin, r.tracked,
                  s.completion_index(r.completion)) for r in s.readers],
                s.drops, s.wakes, s.spaces,
                [None if c is None else (c.msg_id, c.remaining, c.error, c.done)
                 for c in s.completions],
            )
        self.both(state)


CoreDiff.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCoreDifferential = CoreDiff.TestCase
