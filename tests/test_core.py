"""The relay core (``Ring``, ``Reader``, ``Completion``), against both cores.

The ``core`` fixture (conftest.py) is ``pipedream._core`` (Cython) or
``pipedream._core_py``; every test here runs on both. Memory tests run on the
Cython core only (the twin does not promise a layout).
"""

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref

import pytest


class Recorder:
    """A callable that records its calls (a waker, on_drop or callback)."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)

    @property
    def count(self):
        return len(self.calls)


def drain(reader, core):
    """Pop until EMPTY/CLOSED; return [(value, msg_id, origin)]."""
    out = []
    while True:
        value = reader.pop()
        if value is core.EMPTY or value is core.CLOSED:
            return out
        out.append((value, reader.msg_id, reader.origin))


def values(reader, core):
    return [v for v, _, _ in drain(reader, core)]


# -- ids, fan-out, types ----------------------------------------------------------

def test_ids_strictly_increasing_from_one(core):
    ring = core.Ring(8)
    r = ring.reader()
    ids = [ring.write(i) for i in range(20)]
    assert ids == list(range(1, 21))
    assert ring.last_msg_id == 20
    got = drain(r, core)
    assert [m for _, m, _ in got] == [13, 14, 15, 16, 17, 18, 19, 20]


def test_ids_count_messages_nobody_reads(core):
    ring = core.Ring(4)
    assert ring.write("x") == 1     # no reader: still gets an id
    assert ring.buffered == 0
    r = ring.reader()
    assert ring.write("y") == 2
    assert r.pop() == "y" and r.msg_id == 2


def test_fan_out_is_written_once(core):
    ring = core.Ring(64)
    readers = [ring.reader() for _ in range(8)]
    assert ring.reader_count == 8
    for i in range(10):
        ring.write(i)
    assert ring.buffered == 10          # one slot per message, not per reader
    for r in readers[:-1]:
        assert values(r, core) == list(range(10))
        assert ring.buffered == 10      # still owed to the last reader
    assert values(readers[-1], core) == list(range(10))
    assert ring.buffered == 0


def test_reader_sees_only_messages_written_after_it(core):
    ring = core.Ring(8)
    ring.write(1)
    early = ring.reader()
    ring.write(2)
    late = ring.reader()
    ring.write(3)
    assert values(early, core) == [2, 3]
    assert values(late, core) == [3]


def test_slow_str_reader_never_causes_int_drops(core):
    drops = Recorder()
    ring = core.Ring(4, on_drop=drops)
    ints = ring.reader(int)
    strs = ring.reader(str)             # stalled
    got = []
    for i in range(50):
        ring.write(i)
        ring.write(str(i))
        got.extend(values(ints, core))
    assert got == list(range(50))
    assert ints.dropped == 0
    assert strs.dropped > 0
    assert ring.dropped == strs.dropped
    assert all(isinstance(value, str) for _, value, _ in drops.calls)
    assert all(readers == 1 for _, _, readers in drops.calls)
    # The str reader continues with the newest strs still held.
    left = values(strs, core)
    assert left and left == [str(i) for i in range(50 - len(left), 50)]


def test_subclass_and_tuple_types(core):
    class Base:
        pass

    class Sub(Base):
        pass

    ring = core.Ring(32)
    base = ring.reader(Base)
    both = ring.reader((int, str))
    ints = ring.reader(int)
    everything = ring.reader(object)
    alls = ring.reader()
    b, s = Base(), Sub()
    sent = [b, s, 1, "a", 2.5, True, None]
    for v in sent:
        ring.write(v)
    assert values(base, core) == [b, s]
    assert values(both, core) == [1, "a", True]
    assert values(ints, core) == [1, True]             # bool is an int
    assert values(everything, core) == sent
    assert values(alls, core) == sent
    assert base.matches(s) and not base.matches(1)
    assert both.matches("x") and not both.matches(2.5)


def test_type_registered_after_readers(core):
    # A reader must learn about types first seen after it was created.
    class Late:
        pass

    ring = core.Ring(8)
    r = ring.reader(Late)
    a = ring.reader()
    ring.write(1)
    ring.write(Late())
    assert [type(v) for v in values(r, core)] == [Late]
    assert len(values(a, core)) == 2


def test_bad_reader_types_fail_at_creation(core):
    ring = core.Ring(8)
    with pytest.raises(TypeError):
        ring.reader(5)
    with pytest.raises(TypeError):
        ring.reader((int, "str"))
    assert ring.reader_count == 0
    ring.write(1)                   # a failed reader does not poison later writes
    ring.write("x")


def test_reader_is_made_by_ring_only(core):
    ring = core.Ring(8)
    with pytest.raises(TypeError):
        core.Reader(ring, None, False)


def test_none_is_a_message(core):
    ring = core.Ring(4)
    r = ring.reader()
    assert r.pop() is core.EMPTY
    ring.write(None)
    assert r.pop() is None
    assert r.msg_id == 1
    assert r.pop() is core.EMPTY
    ring.write(None)
    assert r.pop_many(5) == [None]


def test_origin(core):
    ring = core.Ring(8, relay_id=7)
    r = ring.reader()
    ring.write("a")
    ring.write("b", 3)
    ring.write("c", 7)
    ring.write("d", 0)
    assert [(v, o) for v, _, o in drain(r, core)] == [("a", 7), ("b", 3), ("c", 7), ("d", 7)]


def test_origin_any_object(core):
    ring = core.Ring(8, relay_id="here")
    r = ring.reader()
    ring.write(1, "there")
    ring.write(2, None)
    ring.write(3, "")
    assert [o for _, _, o in drain(r, core)] == ["there", "here", "here"]


def test_registration_reentered_from_user_code(core):
    ring = core.Ring(8)
    created = []
    armed = []

    class Meta(type):
        def __subclasscheck__(cls, sub):
            if armed and not created:
                created.append(ring.reader())      # joins mid-registration
                ring.write(b"bytes")               # registers a type mid-registration
            return False

    class Filter(metaclass=Meta):
        pass

    ring.write(0.5)
    filtered = ring.reader(Filter)
    armed.append(True)
    assert ring.write(1) == 3           # int registered while a reader joined
    joined = created[0]
    assert values(joined, core) == [b"bytes", 1]
    late = ring.reader(Filter)
    ring.write(2)
    ring.write(b"more")
    assert values(joined, core) == [2, b"more"]
    assert values(filtered, core) == [] and values(late, core) == []
    assert ring.tracked_for(3) == 0


@pytest.mark.parametrize("capacity, exc", [
    (0, ValueError), (-1, ValueError), (1 << 32, ValueError),
    (1.5, TypeError), ("8", TypeError), (True, TypeError), (None, TypeError),
])
def test_bad_capacity(core, capacity, exc):
    with pytest.raises(exc, match="capacity"):
        core.Ring(capacity)
    with pytest.raises(exc, match="capacity"):
        core.check_capacity(capacity)


def test_capacity_bounds_accepted(core):
    assert core.Ring(1).capacity == 1
    assert core.Ring(0xFFFFFFFF).capacity == 0xFFFFFFFF


def test_repr(core):
    ring = core.Ring(8, relay_id=3)
    r = ring.reader(int, tracked=True)
    assert repr(ring) == "<Ring relay=3 capacity=8 buffered=0 readers=1>"
    assert repr(r) == "<Reader types=<class 'int'> tracked=True dropped=0>"
    r.close()
    ring.close()
    assert repr(ring).endswith(" closed>")
    assert repr(r).endswith(" closed>")
    c = core.Completion()
    assert repr(c) == "<Completion msg_id=0 remaining=0>"


# -- eviction (observable mode) ------------------------------------------------------

def test_stalled_reader_loses_only_the_oldest(core):
    drops = Recorder()
    ring = core.Ring(8, on_drop=drops)
    r = ring.reader()
    for i in range(9):
        ring.write("m%d" % i)
    assert ring.dropped == 1 and r.dropped == 1
    assert drops.calls == [(1, "m0", 1)]
    got = drain(r, core)
    assert [v for v, _, _ in got] == ["m%d" % i for i in range(1, 9)]   # newest survives
    assert [m for _, m, _ in got] == list(range(2, 10))


def test_on_drop_counts_the_readers_that_lost_it(core):
    drops = Recorder()
    ring = core.Ring(2, on_drop=drops)
    a, b = ring.reader(), ring.reader()
    ring.reader(str)                    # other type: not a loser
    c = ring.reader()
    ring.write(10)
    assert c.pop() == 10                # c read it: not a loser
    ring.write(11)
    ring.write(12)
    assert drops.calls == [(1, 10, 2)]
    assert (a.dropped, b.dropped, c.dropped, ring.dropped) == (1, 1, 0, 1)


def test_lapped_reader_continues_with_oldest_held(core):
    ring = core.Ring(4)
    r = ring.reader()
    fast = ring.reader()
    for i in range(10):
        ring.write(i)
        assert fast.pop() == i
    assert r.dropped == 6 and fast.dropped == 0
    assert r.pending == 4
    got = drain(r, core)
    assert got == [(6, 7, 0), (7, 8, 0), (8, 9, 0), (9, 10, 0)]
    ring.write(10)
    assert r.pop() == 10 and r.msg_id == 11


def test_capacity_one(core):
    drops = Recorder()
    ring = core.Ring(1, on_drop=drops)
    r = ring.reader()
    for i in range(5):
        ring.write(i)
    assert r.pop() == 4 and r.msg_id == 5
    assert r.dropped == 4 and [c[0] for c in drops.calls] == [1, 2, 3, 4]


def test_capacity_one_write_then_close_still_delivers(core):
    ring = core.Ring(1)
    r = ring.reader()
    ring.write("last")
    ring.close()
    assert r.pop() == "last"
    assert r.pop() is core.CLOSED


def test_eviction_across_chunks(core):
    # More than the 256-slot chunk size of the Cython core, lapped repeatedly.
    ring = core.Ring(300)
    r = ring.reader()
    fast = ring.reader()
    for i in range(2000):
        ring.write(i)
        if i % 3 == 0:
            assert values(fast, core)[-1] == i
    assert values(r, core) == list(range(1700, 2000))
    assert r.dropped == 1700
    assert values(fast, core) == [1999]
    assert ring.buffered == 0


# -- close ---------------------------------------------------------------------------

def test_close(core):
    ring = core.Ring(8)
    r = ring.reader()
    ring.write(1)
    ring.write(2)
    ring.close()
    assert ring.closed
    assert ring.write(3) == core.WRITE_CLOSED == 0
    ring.close()                        # idempotent
    assert r.pop() == 1
    assert r.pop_many(10) == [2]
    assert r.pop() is core.CLOSED
    assert r.pop_many(10) is core.CLOSED
    late = ring.reader()
    assert late.pop() is core.CLOSED


def test_reader_close(core):
    ring = core.Ring(8)
    r = ring.reader()
    ring.write(1)
    assert r.close() == []
    assert r.closed
    assert r.close() == []              # idempotent
    assert r.pop() is core.CLOSED
    assert r.pop_many(3) is core.CLOSED
    assert r.park(Recorder()) is False
    assert r.pending == 0
    assert ring.reader_count == 0
    assert ring.buffered == 0


def test_reader_close_releases_claims(core):
    drops = Recorder()
    ring = core.Ring(4, on_drop=drops)
    stalled = ring.reader()
    live = ring.reader()
    for i in range(3):
        ring.write(i)
    assert values(live, core) == [0, 1, 2]
    assert ring.buffered == 3
    stalled.close()
    assert ring.buffered == 0
    for i in range(20):                 # no false drops after the close
        ring.write(i)
        assert live.pop() == i
    assert drops.calls == [] and ring.dropped == 0 and live.dropped == 0


def test_reader_close_releases_claims_in_the_middle(core):
    ring = core.Ring(8)
    a, b = ring.reader(), ring.reader()
    for i in range(6):
        ring.write(i)
    assert values(a, core) == list(range(6))
    assert b.pop() == 0 and b.pop() == 1
    b.close()
    assert ring.buffered == 0


def test_reader_close_returns_owed_completions(core):
    ring = core.Ring(8)
    tracked = ring.reader(int, tracked=True)
    other = ring.reader(tracked=True)
    completions = [core.Completion() for _ in range(4)]
    for i, c in enumerate(completions):
        ring.write(i, 0, c)
    ring.write("s", 0, core.Completion())   # not tracked's type
    assert [c.remaining for c in completions] == [2, 2, 2, 2]
    assert tracked.pop() == 0
    tracked.completion.finish()
    owed = tracked.close()
    assert [c.msg_id for c in owed] == [2, 3, 4]
    assert all(o is c for o, c in zip(owed, completions[1:]))
    for c in owed:
        c.finish()
    assert [c.remaining for c in completions] == [1, 1, 1, 1]
    # An untracked reader owes nothing.
    plain = ring.reader()
    ring.write(9, 0, core.Completion())
    assert plain.close() == []


# -- completions ---------------------------------------------------------------------

def test_completion_counting(core):
    ring = core.Ring(8)
    t1 = ring.reader(int, tracked=True)
    t2 = ring.reader(tracked=True)
    plain = ring.reader()
    ring.reader(str, tracked=True)      # other type: not counted
    assert ring.tracked_for(1) == 2
    assert ring.tracked_for("x") == 2
    assert ring.tracked_for(2.5) == 1   # type never seen: registered now
    assert ring.tracked_for(b"") == 1
    c = core.Completion()
    assert ring.write(5, 0, c) == 1
    assert (c.msg_id, c.remaining, c.done, c.error) == (1, 2, False, None)
    assert t1.pop() == 5 and t1.completion is c
    assert plain.pop() == 5 and plain.completion is None
    assert t2.pop() == 5 and t2.completion is c
    done = Recorder()
    assert c.when_done(done) is True
    t1.completion.finish()
    assert done.count == 0 and c.remaining == 1
    t2.completion.finish()
    assert done.calls == [(c,)] and c.done
    c.finish()                          # extra finishes are ignored
    assert c.remaining == 0 and done.count == 1
    assert c.when_done(Recorder()) is False


def test_completion_first_error_wins(core):
    ring = core.Ring(8)
    readers = [ring.reader(tracked=True) for _ in range(3)]
    c = core.Completion()
    ring.write("x", 0, c)
    e1, e2 = ValueError("first"), KeyError("second")
    for r in readers:
        r.pop()
    readers[0].completion.finish(e1)
    readers[1].completion.finish(e2)
    readers[2].completion.finish()
    assert c.error is e1 and c.done


def test_completion_without_tracked_readers(core):
    ring = core.Ring(8)
    t = ring.reader(str, tracked=True)
    c = core.Completion()
    assert ring.write(1, 0, c) == 1
    assert (c.msg_id, c.remaining, c.done) == (1, 0, True)
    assert c.when_done(Recorder()) is False
    ring.write("s")
    assert t.pop() == "s" and t.completion is None


def test_eviction_finishes_a_lagged_tracked_readers_share(core):
    drops = Recorder()
    ring = core.Ring(2, on_drop=drops)
    lagged = ring.reader(tracked=True)
    live = ring.reader(tracked=True)
    c = core.Completion()
    ring.write("a", 0, c)
    assert c.remaining == 2
    assert live.pop() == "a"
    done = Recorder()
    c.when_done(done)
    ring.write("b")
    ring.write("c")                     # evicts "a": lagged lost it
    assert drops.calls == [(1, "a", 1)]
    assert c.remaining == 1 and done.count == 0
    live.completion.finish()
    assert done.calls == [(c,)]
    assert lagged.dropped == 1


def test_eviction_of_unread_tracked_message_completes_it(core):
    ring = core.Ring(1)
    ring.reader(tracked=True)
    ring.reader(tracked=True)
    c = core.Completion()
    done = Recorder()
    ring.write(1, 0, c)
    c.when_done(done)
    ring.write(2)
    assert c.done and done.calls == [(c,)]


def test_completion_finished_from_many_threads(core):
    c_ring = core.Ring(8)
    n = 16
    readers = [c_ring.reader(tracked=True) for _ in range(n)]
    c = core.Completion()
    c_ring.write("x", 0, c)
    done = Recorder()
    c.when_done(done)
    for r in readers:
        r.pop()
    threads = [threading.Thread(target=r.completion.finish) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.done and done.count == 1


# -- reliable mode -----------------------------------------------------------------

def test_reliable_full_writes_nothing(core):
    drops = Recorder()
    ring = core.Ring(3, reliable=True, on_drop=drops)
    r = ring.reader()
    assert [ring.write(i) for i in range(3)] == [1, 2, 3]
    c = core.Completion()
    assert ring.write(99, 0, c) == core.WRITE_FULL == -1
    assert (c.msg_id, c.remaining) == (0, 0)
    assert ring.buffered == 3 and ring.last_msg_id == 3
    assert drops.calls == [] and ring.dropped == 0
    assert values(r, core) == [0, 1, 2]
    assert ring.write(3) == 4


def test_reliable_pop_frees_space_and_calls_waiter_once(core):
    ring = core.Ring(2, reliable=True)
    r = ring.reader()
    space = Recorder()
    assert ring.wait_space(space) is False      # room now: not kept
    ring.write(1)
    ring.write(2)
    assert ring.wait_space(space) is True
    assert r.pop() == 1
    assert space.count == 1
    assert r.pop() == 2
    assert space.count == 1                     # once per wait_space
    assert ring.write(3) == 3


def test_reliable_waiter_is_replaced(core):
    ring = core.Ring(1, reliable=True)
    r = ring.reader()
    ring.write(1)
    first, second = Recorder(), Recorder()
    assert ring.wait_space(first) and ring.wait_space(second)
    r.pop()
    assert (first.count, second.count) == (0, 1)


def test_reliable_waiter_called_by_reader_close_and_ring_close(core):
    ring = core.Ring(1, reliable=True)
    r = ring.reader()
    ring.write(1)
    space = Recorder()
    assert ring.wait_space(space)
    r.close()
    assert space.count == 1
    r2 = ring.reader()
    ring.write(2)
    assert ring.wait_space(space)
    ring.close()
    assert space.count == 2
    assert ring.wait_space(space) is False      # closed
    assert r2.pop() == 2


def test_reliable_idle_reader_of_other_type_does_not_block(core):
    ring = core.Ring(4, reliable=True)
    ints = ring.reader(int)
    strs = ring.reader(str)             # idle, nothing unread
    for i in range(100):
        assert ring.write(i) == i + 1
        assert ints.pop() == i
    assert strs.pending == 0


def test_reliable_stalled_reader_blocks_once_ring_wraps_to_it(core):
    ring = core.Ring(4, reliable=True)
    ints = ring.reader(int)
    strs = ring.reader(str)
    for i in range(10):
        assert ring.write(i) > 0
        assert ints.pop() == i
    assert ring.write("s") > 0          # strs has an unread message now
    for i in range(3):
        assert ring.write(i) > 0
        assert ints.pop() == i
    assert ring.write(99) == core.WRITE_FULL    # wrapped around to "s"
    space = Recorder()
    assert ring.wait_space(space)
    assert strs.pop() == "s"
    assert space.count == 1
    assert ring.write(99) > 0


def test_reliable_reader_with_no_readers_never_full(core):
    ring = core.Ring(2, reliable=True)
    for i in range(10):
        assert ring.write(i) == i + 1
    assert ring.buffered == 0


# -- notices (publish) ---------------------------------------------------------------

def test_publish_is_out_of_band(core):
    drops = Recorder()
    ring = core.Ring(2, on_drop=drops, relay_id=4)
    r = ring.reader()
    ring.write(1)
    ring.write(2)
    ring.publish("notice")
    assert ring.buffered == 2 and ring.dropped == 0 and drops.calls == []
    assert ring.last_msg_id == 2
    assert drain(r, core) == [(1, 1, 4), (2, 2, 4), ("notice", 0, 4)]


def test_publish_when_reliable_full_and_after_close(core):
    ring = core.Ring(2, reliable=True)
    r = ring.reader()
    ring.write("m")
    ring.write("m1")
    assert ring.write("m2") == core.WRITE_FULL
    ring.publish("n1")
    ring.close()
    ring.publish("n2")
    assert values(r, core) == ["m", "m1", "n1", "n2"]
    assert r.pop() is core.CLOSED


def test_notice_order_relative_to_messages(core):
    ring = core.Ring(16)
    r = ring.reader()
    ints = ring.reader(int)
    ring.write(1)
    ring.write("a")
    ring.publish(100)
    ring.write(2)
    ring.publish(200)
    ring.publish(300)
    ring.write(3)
    got = drain(r, core)
    assert [v for v, _, _ in got] == [1, "a", 100, 2, 200, 300, 3]
    assert [m for _, m, _ in got] == [1, 2, 0, 3, 0, 0, 4]
    # A typed reader: the notice goes after the messages written before it,
    # even those it skips.
    assert values(ints, core) == [1, 100, 2, 200, 300, 3]


def test_notice_after_partial_read(core):
    ring = core.Ring(16)
    r = ring.reader()
    for i in range(4):
        ring.write(i)
    assert r.pop() == 0
    ring.publish("n")
    assert r.pop_many(10) == [1, 2, 3, "n"]
    assert r.msg_id == 0


def test_notices_bounded_per_reader(core):
    drops = Recorder()
    ring = core.Ring(3, on_drop=drops)
    r = ring.reader()
    other = ring.reader(int)            # does not match str notices
    for i in range(5):
        ring.publish("n%d" % i)
    assert r.dropped == 2 and ring.dropped == 0 and drops.calls == []
    assert r.pending == 3
    assert values(r, core) == ["n2", "n3", "n4"]
    assert other.dropped == 0 and other.pending == 0
    popped = []
    for i in range(100):                # wrap the notice buffer many times
        ring.publish(i)
        if i % 7 == 0:
            popped.append(r.pop())
    assert popped == sorted(popped) and popped[:2] == [0, 5]
    assert values(r, core) == [97, 98, 99]


def test_notices_released_by_reader_close(core):
    ring = core.Ring(8)
    r = ring.reader()

    class Note:
        pass

    note = Note()
    ref = weakref.ref(note)
    ring.publish(note)
    del note
    assert ref() is not None
    r.close()
    assert ref() is None


# -- park / unpark -------------------------------------------------------------------

def test_park_returns_false_when_ready(core):
    ring = core.Ring(8)
    r = ring.reader()
    ring.write(1)
    waker = Recorder()
    assert r.park(waker) is False
    r.pop()
    assert r.park(waker) is True
    r.unpark()
    ring.publish("n")
    assert r.park(waker) is False       # a notice is ready
    assert waker.count == 0


def test_waker_called_once_by_matching_write(core):
    ring = core.Ring(8)
    r = ring.reader(int)
    waker = Recorder()
    assert r.park(waker)
    ring.write("no")                    # not its type
    assert waker.count == 0
    assert r.park(waker)                # the str does not make it ready
    ring.write(1)
    assert waker.count == 1
    ring.write(2)
    assert waker.count == 1             # at most once per park
    assert values(r, core) == [1, 2]


def test_waker_called_by_close_and_publish(core):
    ring = core.Ring(8)
    a, b = ring.reader(), ring.reader(int)
    wa, wb = Recorder(), Recorder()
    assert a.park(wa) and b.park(wb)
    ring.publish("n")                   # str notice: only a
    assert (wa.count, wb.count) == (1, 0)
    ring.close()
    assert (wa.count, wb.count) == (1, 1)
    assert a.pop() == "n" and a.pop() is core.CLOSED


def test_unpark_and_replace(core):
    ring = core.Ring(8)
    r = ring.reader()
    first, second = Recorder(), Recorder()
    assert r.park(first)
    r.unpark()
    r.unpark()                          # harmless
    ring.write(1)
    assert first.count == 0
    r.pop()
    assert r.park(first) and r.park(second)
    ring.write(2)
    assert (first.count, second.count) == (0, 1)


def test_reader_close_forgets_its_waker(core):
    ring = core.Ring(8)
    r = ring.reader()
    other = ring.reader()
    waker = Recorder()
    assert r.park(waker)
    r.close()
    ring.write(1)
    ring.close()
    assert waker.count == 0
    assert other.pop() == 1


def test_waker_from_other_thread(core):
    ring = core.Ring(8)
    r = ring.reader()
    event = threading.Event()
    assert r.park(event.set)
    t = threading.Thread(target=ring.write, args=("x",))
    t.start()
    assert event.wait(5)
    t.join()
    assert r.pop() == "x"


# -- pop_many --------------------------------------------------------------------------

def test_pop_many(core):
    ring = core.Ring(16, relay_id=2)
    r = ring.reader(tracked=True)
    assert r.pop_many(4) is core.EMPTY
    for i in range(10):
        ring.write(i, 5 if i == 9 else 0, core.Completion())
    assert r.pop_many(4) == [0, 1, 2, 3]
    assert (r.msg_id, r.origin, r.completion.msg_id) == (4, 2, 4)
    assert r.pop_many(1) == [4]
    assert r.pop_many(100) == [5, 6, 7, 8, 9]
    assert (r.msg_id, r.origin, r.completion.msg_id) == (10, 5, 10)
    assert r.pop_many(3) is core.EMPTY
    assert ring.buffered == 0


def test_pop_many_argument(core):
    ring = core.Ring(4)
    r = ring.reader()
    ring.write(1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        r.pop_many(0)
    with pytest.raises(ValueError):
        r.pop_many(-3)
    with pytest.raises(TypeError):
        r.pop_many(1.5)
    with pytest.raises(TypeError):
        r.pop_many("2")
    assert r.pop_many(True) == [1]      # an int
    ring.write(2)
    assert r.pop_many(1 << 80) == [2]


def test_pending_and_matches(core):
    ring = core.Ring(8)
    r = ring.reader(int)
    ring.write(1)
    ring.write("x")
    ring.write(2)
    ring.publish(3)
    assert r.pending == 3
    assert r.matches(5) and not r.matches("s") and not r.matches(2.5)
    r.pop()
    assert r.pending == 2


# -- callbacks that raise --------------------------------------------------------------

def test_raising_callbacks_are_logged_not_raised(core, caplog):
    def boom(*args):
        raise RuntimeError("boom")

    ring = core.Ring(1, on_drop=boom)
    a, b = ring.reader(), ring.reader()
    other = Recorder()
    with caplog.at_level(logging.ERROR, logger="pipedream"):
        assert a.park(boom) and b.park(other)
        assert ring.write(1) == 1           # waker raises: the next is still called
        assert other.count == 1
        assert ring.write(2) == 2           # on_drop raises: the write stands
        assert a.pop() == 2
        assert b.pop() == 2
    assert sum("boom" in r.getMessage() or "callback" in r.getMessage()
               for r in caplog.records) >= 2

    ring = core.Ring(1, reliable=True)
    r = ring.reader()
    ring.write("v")
    assert ring.wait_space(boom)
    with caplog.at_level(logging.ERROR, logger="pipedream"):
        assert r.pop() == "v"               # the space waiter raises: no message lost

    c = core.Completion()
    ring = core.Ring(4)
    t = ring.reader(tracked=True)
    ring.write(1, 0, c)
    c.when_done(boom)
    t.pop()
    with caplog.at_level(logging.ERROR, logger="pipedream"):
        t.completion.finish()
    assert c.done


# -- garbage collection ----------------------------------------------------------------

def test_buffered_message_cycle_is_collected(core):
    class Msg:
        pass

    ring = core.Ring(8)
    reader = ring.reader()
    msg = Msg()
    msg.ring = ring                     # ring -> slot -> msg -> ring
    ring.write(msg)
    ring.publish(msg)                   # and through an unread notice
    ref = weakref.ref(ring)
    del ring, reader, msg
    gc.collect()
    assert ref() is None


def test_no_finalizer_runs_under_the_lock():
    # A finalizer that re-enters the ring (like a subscription's __del__
    # closing its reader) must never run while the ring's lock is held: it
    # would deadlock. With the collector started at every allocation, any
    # GC-tracked allocation in a locked section would show here as a hang.
    script = textwrap.dedent("""
        import gc, sys, importlib
        core = importlib.import_module(sys.argv[1])
        ring = core.Ring(8, on_drop=lambda *a: None)
        keep = ring.reader(tracked=True)

        class Finalizer:
            def __init__(self):
                self.me = self                      # a cycle: freed by the collector
                self.reader = ring.reader()
            def __del__(self):
                ring.write("from __del__")
                self.reader.close()
                ring.publish("notice from __del__")

        gc.set_threshold(1, 1, 1)
        for i in range(3000):
            Finalizer()
            ring.write(i, 0, core.Completion())
            ring.publish(i)
            keep.pop()
            keep.pop_many(4)
            if keep.completion is not None:
                keep.completion.finish()
            r = ring.reader(int)
            r.park(lambda: None)
            r.close()
        print("ok")
    """)
    for name in ("pipedream._core", "pipedream._core_py"):
        if name == "pipedream._core":
            try:
                __import__(name)
            except ImportError:
                continue
        elif sys.version_info >= (3, 12):
            # The collector may start at any bytecode boundary on 3.12+,
            # which a pure-Python lock cannot keep out (see _core_py.py).
            continue
        src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [os.path.abspath(src)] + sys.path))
        proc = subprocess.run([sys.executable, "-c", script, name], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "ok", (name, proc.stdout, proc.stderr)


# -- memory (Cython core) ---------------------------------------------------------------

def _cython(core):
    if core.__name__ != "pipedream._core":
        pytest.skip("memory layout is a promise of the Cython core only")


def _traced(make):
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        obj = make()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return obj, after - before


def test_idle_ring_memory_does_not_depend_on_capacity(core):
    _cython(core)
    small, small_bytes = _traced(lambda: core.Ring(16))
    big, big_bytes = _traced(lambda: core.Ring(65536))
    huge, huge_bytes = _traced(lambda: core.Ring(0xFFFFFFFF))
    assert small_bytes == big_bytes == huge_bytes
    assert big_bytes < 2048


def test_buffered_message_costs_16_bytes(core):
    _cython(core)
    n = 100_000
    messages = [object() for _ in range(n)]     # allocated before measuring

    def fill():
        ring = core.Ring(1 << 17, relay_id=1)
        reader = ring.reader()                  # stalled
        write = ring.write
        for m in messages:
            write(m)
        return ring, reader

    (ring, reader), used = _traced(fill)
    assert ring.buffered == n
    per_message = used / n
    assert per_message <= 17, per_message
    # Reading everything gives the memory back (one spare chunk kept).
    assert reader.pop_many(n) == messages
    assert ring.buffered == 0


def test_memory_follows_backlog(core):
    _cython(core)
    ring, _ = _traced(lambda: core.Ring(1 << 20))
    reader = ring.reader()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):
            ring.write(i)
        full = tracemalloc.get_traced_memory()[0] - base
        assert reader.pop_many(1 << 20) is not None
        drained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert full >= 50_000 * 16
    assert drained < 16 * 1024          # a chunk or two and the directory


# -- threads -----------------------------------------------------------------------------

WRITERS = 4
PER_WRITER = 20_000


def _run_writers(ring, core, give_up):
    def writer(tid):
        for i in range(PER_WRITER):
            while ring.write((tid, i)) == core.WRITE_FULL:
                if give_up.is_set():
                    return
                time.sleep(0.0001)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(WRITERS)]
    for t in threads:
        t.start()
    return threads


def _read_until_closed(reader, core, deadline):
    got = []
    event = threading.Event()
    while time.monotonic() < deadline:
        batch = reader.pop_many(256)
        if batch is core.CLOSED:
            return got
        if batch is core.EMPTY:
            event.clear()
            if reader.park(event.set):
                event.wait(0.05)
            continue
        got.extend(batch)
    raise AssertionError("reader timed out with %d messages" % len(got))


def test_threads_reliable_exactly_once_in_order(core):
    ring = core.Ring(64, reliable=True)
    reader = ring.reader()
    give_up = threading.Event()
    result = []
    deadline = time.monotonic() + 30
    consumer = threading.Thread(
        target=lambda: result.extend(_read_until_closed(reader, core, deadline)))
    consumer.start()
    writers = _run_writers(ring, core, give_up)
    for t in writers:
        t.join(30)
    ring.close()
    consumer.join(30)
    give_up.set()
    assert not consumer.is_alive()
    assert len(result) == WRITERS * PER_WRITER
    assert sorted(result) == sorted((t, i) for t in range(WRITERS) for i in range(PER_WRITER))
    last = [-1] * WRITERS
    for tid, i in result:
        assert i == last[tid] + 1       # per-thread order, nothing missing
        last[tid] = i
    assert reader.dropped == 0 and ring.dropped == 0


def test_threads_observable_accounts_for_every_message(core):
    ring = core.Ring(16)
    reader = ring.reader()
    give_up = threading.Event()
    result = []
    deadline = time.monotonic() + 30
    consumer = threading.Thread(
        target=lambda: result.extend(_read_until_closed(reader, core, deadline)))
    consumer.start()
    writers = _run_writers(ring, core, give_up)
    for t in writers:
        t.join(30)
    ring.close()
    consumer.join(30)
    assert not consumer.is_alive()
    total = WRITERS * PER_WRITER
    assert len(result) + reader.dropped == total
    assert ring.dropped == reader.dropped
    assert len(set(result)) == len(result)
    last = [-1] * WRITERS
    for tid, i in result:
        assert i > last[tid]            # per-thread order (with gaps)
        last[tid] = i
