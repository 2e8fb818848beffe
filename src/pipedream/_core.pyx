# cython: language_level=3
# cython: freethreading_compatible = True
# cython: boundscheck=False, wraparound=False, cdivision=True
"""The relay core in C: the twin of ``_core_py.py``.

Same names, interface and results as the pure-Python core (tests run both and
compare them); this one is the fast path. See ``_core.pxd`` for the layout
and the locking rules, and ``_core_py.py`` for the same logic in plain Python.

* ``Ring``: one per relay, a bounded broadcast ring; a message is written once
  whatever the number of readers. Message ids are ``seq + 1``.
* ``Reader``: one cursor into a ring; only charged for the types it matches.
* ``Completion``: how many tracked handlers still owe one message, and the
  first error any of them reported.

The one rule that the code below is shaped by: under ``Ring._lock`` (and
``_completion_lock``) no Python code runs and nothing can start the garbage
collector. Python code there could re-enter the ring and deadlock; the
collector could run finalizers, which are Python code (a subscription's
``__del__`` closes its reader). So a locked section allocates no GC-tracked
object, drops no reference that might be the last one (they go to a
``Deferred`` released after unlocking) and calls nothing: wakers, ``on_drop``,
space waiters and completion callbacks run after unlocking. A callback that
raises ``Exception`` is logged (logger ``pipedream``), like in the twin.
"""

cimport cython
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

import logging
import threading

from ._sentinels import CLOSED, EMPTY
from .errors import RelayClosed, RelayFull

__all__ = ["Ring", "Reader", "Completion", "EMPTY", "CLOSED",
           "WRITE_CLOSED", "WRITE_FULL", "check_capacity"]


# The C API without Cython's reference counting: these take and return
# borrowed or stolen pointers exactly as documented by CPython, which is
# what the locked sections need to control every reference they touch.
cdef extern from "Python.h":
    ctypedef int (*c_visitproc "visitproc")(PyObject*, void*) noexcept
    ctypedef int (*c_traverseproc "traverseproc")(PyObject*, c_visitproc, void*) noexcept
    ctypedef struct c_PyTypeObject "PyTypeObject":
        c_traverseproc tp_traverse

    const Py_ssize_t PY_SSIZE_T_MAX
    void c_incref "Py_INCREF"(PyObject* o)
    void c_decref "Py_DECREF"(PyObject* o)
    void c_xdecref "Py_XDECREF"(PyObject* o)
    PyObject* c_long_from_u64 "PyLong_FromUnsignedLongLong"(unsigned long long v)
    PyObject* c_dict_get "PyDict_GetItemWithError"(PyObject* d, PyObject* k)
    int c_dict_set "PyDict_SetItem"(PyObject* d, PyObject* k, PyObject* v)
    int c_dict_del "PyDict_DelItem"(PyObject* d, PyObject* k)
    int c_list_append "PyList_Append"(PyObject* l, PyObject* v)
    list c_list_new "PyList_New"(Py_ssize_t size)
    void c_list_set_item "PyList_SET_ITEM"(PyObject* l, Py_ssize_t i, PyObject* v) noexcept
    void c_set_size "Py_SET_SIZE"(PyObject* o, Py_ssize_t size) noexcept
    int c_list_set_slice "PyList_SetSlice"(PyObject* l, Py_ssize_t lo, Py_ssize_t hi,
                                           PyObject* v)
    Py_ssize_t c_list_size "PyList_GET_SIZE"(PyObject* l)
    PyObject* c_list_item "PyList_GET_ITEM"(PyObject* l, Py_ssize_t i)
    PyObject* c_err_occurred "PyErr_Occurred"()
    void c_err_clear "PyErr_Clear"()
    # PyMem: tracemalloc sees these allocations.
    void* c_malloc "PyMem_Malloc"(size_t n)
    void* c_calloc "PyMem_Calloc"(size_t n, size_t size)
    void* c_realloc "PyMem_Realloc"(void* p, size_t n)
    void c_free "PyMem_Free"(void* p)


#: ``Ring.write`` results that are not message ids.
cdef enum:
    C_WRITE_CLOSED = 0
    C_WRITE_FULL = -1

WRITE_CLOSED = C_WRITE_CLOSED
WRITE_FULL = C_WRITE_FULL

cdef object _EMPTY = EMPTY
cdef object _CLOSED = CLOSED

# Guards every Completion's counter: completions are finished from whichever
# thread runs the handler. Each critical section is a few instructions long,
# so one lock for all of them is enough.
cdef SpinLock _completion_lock

# Proves that a Reader comes from Ring.reader(): a reader that is not
# registered with its ring has no type flags and no cursor.
cdef object _READER_TOKEN = object()

_log = logging.getLogger("pipedream")


cdef int _callback_failed(object callback) except -1:
    # Called from an ``except`` block: logs the exception being handled.
    _log.exception("pipedream core: callback %r raised", callback)
    return 0


cdef int _call0(PyObject* callback) except -1:
    """Run a callback given to the core; an ``Exception`` is logged, not raised.

    By the time callbacks run the core's work is done; an escaping error
    would lose a popped message or skip the wakers after it.
    """
    try:
        (<object>callback)()
    except Exception:
        _callback_failed(<object>callback)
    return 0


cdef inline object _steal(PyObject* ref):
    """The object behind a reference we own, as a Cython object (the reference moves)."""
    cdef object obj = <object>ref
    c_decref(ref)
    return obj


def check_capacity(capacity):
    """Validate a ring capacity: an int >= 1 (bool is not accepted)."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError("capacity must be an int, got %s" % type(capacity).__name__)
    if capacity < 1:
        raise ValueError("capacity must be >= 1, got %d" % capacity)
    if capacity > 0xFFFFFFFF:
        raise ValueError("capacity must be <= 4294967295, got %d" % capacity)


# -- Deferred: references to release (or callables to call) after a lock -----

cdef inline void _deferred_init(Deferred* d) noexcept:
    d.n = 0
    d.heap_cap = 0
    d.heap = NULL


cdef inline PyObject* _deferred_at(Deferred* d, Py_ssize_t i) noexcept:
    return d.small[i] if i < DEFERRED_SMALL else d.heap[i - DEFERRED_SMALL]


cdef bint _defer(Deferred* d, PyObject* ref) noexcept:
    """Keep ``ref`` (a reference we own) until after the lock.

    Fails only when memory runs out. The reference is then leaked on purpose:
    releasing it under the lock could run a finalizer there.
    """
    cdef Py_ssize_t i = d.n - DEFERRED_SMALL
    cdef Py_ssize_t cap
    cdef PyObject** heap
    if i < 0:
        d.small[d.n] = ref
    else:
        if i == d.heap_cap:
            cap = d.heap_cap * 2 if d.heap_cap else 64
            heap = <PyObject**>c_realloc(d.heap, cap * sizeof(PyObject*))
            if heap == NULL:
                return False
            d.heap = heap
            d.heap_cap = cap
        d.heap[i] = ref
    d.n += 1
    return True


cdef void _release(Deferred* d) noexcept:
    """After unlocking: drop the references (finalizers may run here)."""
    cdef Py_ssize_t i
    cdef Py_ssize_t n = d.n
    cdef PyObject** heap = d.heap
    d.n = 0
    d.heap = NULL
    d.heap_cap = 0
    for i in range(n):
        c_decref(d.small[i] if i < DEFERRED_SMALL else heap[i - DEFERRED_SMALL])
    c_free(heap)


cdef int _call_all(Deferred* d) except -1:
    """After unlocking: call each callable of ``d`` in order, then release them.

    A ``BaseException`` from one of them (a KeyboardInterrupt raised by a
    handler running inline in a waker, say) does not stop the others: each
    waker was taken from its reader, so one left uncalled would leave that
    reader parked forever. The first such exception is raised at the end.
    """
    cdef Py_ssize_t i = 0
    pending = None
    try:
        while i < d.n:
            try:
                _call0(_deferred_at(d, i))
            except BaseException as exc:
                if pending is None:
                    pending = exc
            i += 1
    finally:
        _release(d)
    if pending is not None:
        raise pending
    return 0


# -- Side tables: rare per-message data, keyed by seq --------------------------
# Only used under the ring lock. A Python int key is not GC-tracked, so
# making one is allowed there; failures (out of memory) are reported by the
# return value and the error indicator is cleared.

cdef int _side_put(PyObject* table, uint64_t seq, PyObject* obj) noexcept:
    cdef PyObject* key = c_long_from_u64(seq)
    cdef int status
    if key == NULL:
        c_err_clear()
        return -1
    status = c_dict_set(table, key, obj)
    c_decref(key)
    if status < 0:
        c_err_clear()
    return status


cdef PyObject* _side_get(PyObject* table, uint64_t seq) noexcept:
    """Borrowed reference to seq's entry, or NULL."""
    cdef PyObject* key = c_long_from_u64(seq)
    cdef PyObject* obj
    if key == NULL:
        c_err_clear()
        return NULL
    obj = c_dict_get(table, key)
    c_decref(key)
    if obj == NULL and c_err_occurred() != NULL:
        c_err_clear()
    return obj


cdef PyObject* _side_take(PyObject* table, uint64_t seq) noexcept:
    """Remove seq's entry and return its reference (ours now), or NULL."""
    cdef PyObject* key = c_long_from_u64(seq)
    cdef PyObject* obj
    if key == NULL:
        c_err_clear()
        return NULL
    obj = c_dict_get(table, key)
    if obj != NULL:
        c_incref(obj)           # so that deleting the entry frees nothing
        if c_dict_del(table, key) < 0:
            c_err_clear()
    elif c_err_occurred() != NULL:
        c_err_clear()
    c_decref(key)
    return obj


# -- Completion ---------------------------------------------------------------

@cython.final
@cython.freelist(64)
cdef class Completion:
    """Completion counter of one tracked message.

    The ring sets ``msg_id`` and ``remaining`` (the tracked readers that
    matched the message when it was written). Each of those handlers calls
    ``finish()`` once; the first error passed to ``finish()`` is kept. When
    ``remaining`` reaches zero the callback given to ``when_done()`` runs, in
    the thread that finished last (an exception from it is logged).
    """

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
        self._finish(error, 1)

    cdef int _finish(self, object error, Py_ssize_t n) except -1:
        # n handlers at once: an eviction finishes every tracked loser's share.
        cdef PyObject* callback = NULL
        lock_acquire(&_completion_lock)
        try:
            if self.remaining <= 0 or n <= 0:
                return 0
            if error is not None and self.error is None:
                self.error = error          # replaces None: nothing is freed
            self.remaining = self.remaining - n if n < self.remaining else 0
            if self.remaining == 0 and self._callback is not None:
                callback = <PyObject*>self._callback
                c_incref(callback)          # the field's reference moves to us
                self._callback = None
        finally:
            lock_release(&_completion_lock)
        if callback != NULL:
            try:
                (<object>callback)(self)
            except Exception:
                _callback_failed(<object>callback)
            finally:
                c_decref(callback)
        return 0

    def when_done(self, callback):
        """Call ``callback(self)`` once ``remaining`` reaches zero.

        Returns False, without keeping ``callback``, if that already happened.
        """
        cdef PyObject* old
        lock_acquire(&_completion_lock)
        try:
            if self.remaining <= 0:
                return False
            old = <PyObject*>self._callback
            c_incref(old)                   # released after the lock
            self._callback = callback
        finally:
            lock_release(&_completion_lock)
        c_decref(old)
        return True

    def __repr__(self):
        return "<Completion msg_id=%d remaining=%d>" % (self.msg_id, self.remaining)


# -- Ring -----------------------------------------------------------------------

cdef inline Slot* _slot_at(Ring ring, uint64_t seq) noexcept:
    return &ring._dir[(seq >> CHUNK_SHIFT) & ring._dir_mask][seq & CHUNK_MASK]


@cython.final
@cython.no_gc_clear
cdef class Ring:
    """A bounded broadcast ring with per-type readers.

    ``capacity`` is the maximum number of slots; storage grows with the
    backlog. ``reliable`` rings refuse to overwrite an unread slot
    (``write`` returns ``WRITE_FULL``); observable rings evict the oldest slot,
    count the loss for each reader that had not read it, and call
    ``on_drop(msg_id, value, readers)`` after the write.
    """
    # no_gc_clear: the cycle collector must not set the typed fields to None
    # (every method relies on them); cycles through the ring are broken by
    # clearing the _readers list and the messages themselves.

    def __cinit__(self, capacity, reliable=False, relay_id=0, on_drop=None):
        check_capacity(capacity)
        self.capacity = capacity
        self.reliable = bool(reliable)
        self.relay_id = relay_id
        self._on_drop = on_drop
        self.waiter = None
        self._registry = threading.RLock()
        self._keys = {}
        self._key_types = []
        self._readers = []
        self._origins = {}
        self._completions = {}

    def __dealloc__(self):
        cdef Slot** chunks = self._dir
        cdef uint64_t mask = self._dir_mask
        cdef uint64_t seq = self._tail
        cdef uint64_t head = self._head
        cdef uint64_t i
        cdef Slot* s
        cdef PyObject* value
        self._dir = NULL
        self._head = self._tail
        if chunks != NULL:
            while seq < head:
                s = &chunks[(seq >> CHUNK_SHIFT) & mask][seq & CHUNK_MASK]
                value = s.value
                s.value = NULL
                c_xdecref(value)
                seq += 1
            for i in range(mask + 1):
                c_free(chunks[i])
            c_free(chunks)
        c_free(self._spare)
        c_free(self._match)
        c_free(self._tracked)

    # -- inspection -------------------------------------------------------

    @property
    def reader_count(self):
        return len(self._readers)

    @property
    def buffered(self):
        """Number of slots in use (messages not yet read by every reader)."""
        cdef uint64_t n
        lock_acquire(&self._lock)
        try:
            n = self._head - self._tail
        finally:
            lock_release(&self._lock)
        return n

    @property
    def last_msg_id(self):
        return self._head

    def tracked_for(self, value):
        """Tracked readers that would count a message like ``value`` now.

        Registers ``value``'s type if it is new (readers' filters may run).
        """
        cdef uint32_t key = self._key_of(type(value))
        cdef uint32_t n
        lock_acquire(&self._lock)
        try:
            n = self._tracked[key]
        finally:
            lock_release(&self._lock)
        return n

    # -- types ------------------------------------------------------------

    cdef uint32_t _key_of(self, object tp) except? 0xFFFFFFFF:
        cdef PyObject* found = c_dict_get(<PyObject*>self._keys, <PyObject*>tp)
        if found != NULL:
            return <uint32_t><object>found
        if c_err_occurred() != NULL:
            return 0xFFFFFFFF
        return self._register(tp)

    cdef uint32_t _register(self, object tp) except? 0xFFFFFFFF:
        # The slow path, once per concrete type: ask every reader whether it
        # wants `tp` (issubclass: user code, so outside the ring lock), then
        # commit the answers under the lock.
        cdef PyObject** snap = NULL
        cdef uint8_t* flags = NULL
        cdef Py_ssize_t i
        cdef Py_ssize_t n = 0
        cdef uint64_t gen = 0
        cdef int status = 0
        with self._registry:
            found = self._keys.get(tp)
            if found is not None:
                return found
            while True:
                # Snapshot the readers (C array: no allocation of a GC object
                # under the lock).
                lock_acquire(&self._lock)
                try:
                    gen = self._reader_gen
                    n = c_list_size(<PyObject*>self._readers)
                    snap = <PyObject**>c_malloc(n * sizeof(PyObject*) + 1)
                    if snap != NULL:
                        for i in range(n):
                            snap[i] = c_list_item(<PyObject*>self._readers, i)
                            c_incref(snap[i])
                finally:
                    lock_release(&self._lock)
                if snap == NULL:
                    raise MemoryError()
                try:
                    flags = <uint8_t*>c_malloc(n + 1)
                    if flags == NULL:
                        raise MemoryError()
                    for i in range(n):
                        flags[i] = (<Reader>snap[i])._wants(tp)   # user code may run here
                    lock_acquire(&self._lock)
                    try:
                        # Readers only join under the registry lock, which is
                        # held: one can have joined only from the user code
                        # above, on this thread. It would miss this type's
                        # flag: start again.
                        if self._reader_gen != gen:
                            status = -3
                        elif c_list_append(<PyObject*>self._key_types, <PyObject*>tp) < 0:
                            c_err_clear()
                            status = -1
                        else:
                            status = self._add_key(snap, flags, n)
                            if status < 0:
                                # Keep _key_types in step with the key table.
                                # The caller holds tp: this frees nothing.
                                c_list_set_slice(<PyObject*>self._key_types,
                                                 self._n_keys, self._n_keys + 1, NULL)
                    finally:
                        lock_release(&self._lock)
                finally:
                    for i in range(n):
                        c_decref(snap[i])
                    c_free(snap)
                    c_free(flags)
                    snap = NULL
                    flags = NULL
                if status == -3:
                    continue
                if status == -1:
                    raise MemoryError()
                if status == -2:
                    raise OverflowError("too many message types in one ring")
                break
            self._keys[tp] = status
        return <uint32_t>status

    cdef int _add_key(self, PyObject** snap, uint8_t* flags, Py_ssize_t n) noexcept:
        """Under the lock: commit a new type key; return it, or -1 (no memory)
        or -2 (no key left). Nothing changes unless it succeeds."""
        cdef Py_ssize_t key = self._n_keys
        cdef Py_ssize_t i
        cdef uint32_t match = 0
        cdef uint32_t tracked = 0
        cdef Reader r
        if key > <Py_ssize_t>KEY_MASK:
            return -2
        if self._reserve_keys(key + 1) < 0:
            return -1
        for i in range(n):
            r = <Reader>snap[i]
            if not r.closed and r._reserve_flags(key + 1) < 0:
                return -1
        for i in range(n):
            r = <Reader>snap[i]
            if r.closed:            # closed meanwhile: it has no say any more
                continue
            r._flags[key] = flags[i]
            r._n_flags = key + 1
            if flags[i]:
                match += 1
                tracked += r.tracked
        self._match[key] = match
        self._tracked[key] = tracked
        self._n_keys = key + 1
        return <int>key

    cdef int _reserve_keys(self, Py_ssize_t n) noexcept:
        cdef Py_ssize_t cap = self._keys_cap
        cdef uint32_t* p
        if n <= cap:
            return 0
        cap = cap * 2 if cap else 8
        while cap < n:
            cap *= 2
        p = <uint32_t*>c_realloc(self._match, cap * sizeof(uint32_t))
        if p == NULL:
            return -1
        self._match = p
        p = <uint32_t*>c_realloc(self._tracked, cap * sizeof(uint32_t))
        if p == NULL:
            return -1
        self._tracked = p
        self._keys_cap = cap
        return 0

    def reader(self, types=None, tracked=False):
        """A new reader at the head of the ring.

        ``types``: None for every type, or a class or tuple of classes
        (matched with ``issubclass`` on each concrete type, once per type).
        Raises ``TypeError`` at once if ``issubclass`` rejects ``types``.
        """
        cdef Reader r
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t key
        cdef int status
        if types is not None:
            issubclass(object, types)   # a bad filter fails here, not in a later write
        r = Reader(self, types, tracked, _READER_TOKEN)
        with self._registry:
            while True:
                key_types = self._key_types
                while n < len(key_types):      # user code may run here
                    flag = r._wants(key_types[n])
                    if r._reserve_flags(n + 1) < 0:
                        raise MemoryError()
                    r._flags[n] = flag
                    n += 1
                lock_acquire(&self._lock)
                try:
                    if n != self._n_keys:
                        # A type registered from the user code above (this
                        # thread) still needs its flag: go round again.
                        status = 1
                    elif c_list_append(<PyObject*>self._readers, <PyObject*>r) < 0:
                        c_err_clear()
                        status = -1
                    else:
                        status = 0
                        r._n_flags = n
                        r._cursor = self._head
                        r.closed = False
                        self._reader_gen += 1
                        for key in range(n):
                            if r._flags[key]:
                                self._match[key] += 1
                                if r.tracked:
                                    self._tracked[key] += 1
                finally:
                    lock_release(&self._lock)
                if status == 0:
                    break
                if status < 0:
                    raise MemoryError()
        return r

    # -- writing ------------------------------------------------------------

    cdef object _origin_entry(self, object origin):
        # The origin to keep for a message, or None when it is this ring's
        # relay id (the common case, which then costs nothing per message).
        # The twin keeps ``origin or relay_id``; user code (__bool__, __eq__)
        # may run here, so this is done before locking.
        relay_id = self.relay_id
        if origin is None or origin is relay_id or not origin:
            return None
        if type(origin) is int and type(relay_id) is int and origin == relay_id:
            return None
        return origin

    def write(self, value, origin=0, Completion completion=None):
        """Write ``value``; return its msg id, ``WRITE_CLOSED`` or ``WRITE_FULL``.

        ``origin``: id of the relay where the message entered (0: this one).
        ``completion``: if given, it receives the msg id and the number of
        tracked readers that matched; it is attached to the message when that
        number is not zero.
        """
        return self._put(value, origin, completion)

    def send_nowait(self, value):
        """send_nowait(value): write ``value`` now and return its msg id.

        Never waits for handlers (they still get the message, on their own
        tasks). Safe from any thread. Raises ``RelayClosed`` after close and,
        in reliable mode when the ring is full, ``RelayFull`` (nothing written).
        (This is ``RelaySender.send_nowait`` of an observable relay.)
        """
        cdef int64_t msg_id = self._put(value, 0, None)
        if msg_id > 0:
            return msg_id
        if msg_id == C_WRITE_FULL:
            raise RelayFull("relay %s is full (reliable mode, capacity %d)"
                            % (self.relay_id, self.capacity))
        raise RelayClosed("relay %s is closed" % self.relay_id)

    cdef int64_t _put(self, object value, object origin, Completion completion) except? -2:
        cdef uint32_t key = self._key_of(type(value))
        cdef object stored_origin = self._origin_entry(origin)
        cdef Deferred released
        cdef Deferred wake
        cdef Evicted ev
        cdef uint64_t msg_id = 0
        cdef int status
        _deferred_init(&released)
        _deferred_init(&wake)
        ev.value = NULL
        ev.completion = NULL
        lock_acquire(&self._lock)
        try:
            status = self._write(<PyObject*>value, key,
                                 NULL if stored_origin is None else <PyObject*>stored_origin,
                                 completion, &msg_id, &ev, &wake, &released)
        finally:
            lock_release(&self._lock)
        _release(&released)
        if status != 0:
            if status == 1:
                return C_WRITE_CLOSED
            if status == 2:
                return C_WRITE_FULL
            raise MemoryError()
        if completion is not None and completion.remaining:
            # What awaiting the send needs if it has to wait (see Completion).
            completion.value = value
            completion._waiter = self.waiter
        try:
            if ev.value != NULL:
                self._report_eviction(&ev)
        finally:
            _call_all(&wake)
        return <int64_t>msg_id

    cdef int _write(self, PyObject* value, uint32_t key, PyObject* origin,
                    Completion completion, uint64_t* msg_id, Evicted* ev,
                    Deferred* wake, Deferred* released) noexcept:
        """Under the lock. 0: written; 1: closed; 2: full (reliable); -1: no memory.

        Every step that can fail comes before the first change that would
        have to be undone.
        """
        cdef uint64_t seq
        cdef uint32_t remaining
        cdef uint32_t tracked
        cdef uint32_t side = 0
        cdef Slot* s
        cdef bint full
        if self.closed:
            return 1
        self._advance_tail(released)
        full = self._head - self._tail >= self.capacity
        if full and self.reliable:
            return 2
        if self._reserve_chunk() < 0:
            return -1
        seq = self._head
        remaining = self._match[key]
        tracked = self._tracked[key]
        if remaining:
            if origin != NULL:
                if _side_put(<PyObject*>self._origins, seq, origin) < 0:
                    return -1
                side |= HAS_ORIGIN
            if tracked and completion is not None:
                if _side_put(<PyObject*>self._completions, seq, <PyObject*>completion) < 0:
                    if side:
                        origin = _side_take(<PyObject*>self._origins, seq)
                        if origin != NULL:
                            _defer(released, origin)
                    return -1
                side |= HAS_COMPLETION
        if completion is not None:
            completion.msg_id = seq + 1
            completion.remaining = tracked
        if full:
            self._evict(ev, released)
        s = _slot_at(self, seq)
        s.key = key | side
        s.remaining = remaining
        if remaining:
            c_incref(value)
            s.value = value
        else:
            s.value = NULL          # nobody will read it
        self._head = seq + 1
        msg_id[0] = seq + 1
        if not remaining and seq == self._tail:
            self._advance_tail(released)
        if self._n_parked:
            self._take_wakers(key, wake)
        return 0

    cdef int _reserve_chunk(self) noexcept:
        """Make sure the slot at the head has storage; -1 if out of memory.

        Chunks alive: from the tail's to the head's. A chunk is needed when
        the head enters it, i.e. at its first slot.
        """
        cdef uint64_t c
        cdef uint64_t need
        cdef Slot* chunk
        if self._head & CHUNK_MASK:
            return 0
        c = self._head >> CHUNK_SHIFT
        need = c - (self._tail >> CHUNK_SHIFT) + 1
        if self._dir == NULL or need > self._dir_mask + 1:
            if self._grow_dir(need) < 0:
                return -1
        if self._dir[c & self._dir_mask] != NULL:
            return 0
        chunk = self._spare
        if chunk != NULL:
            self._spare = NULL
        else:
            chunk = <Slot*>c_malloc(CHUNK_SLOTS * sizeof(Slot))
            if chunk == NULL:
                return -1
        self._dir[c & self._dir_mask] = chunk
        return 0

    cdef int _grow_dir(self, uint64_t need) noexcept:
        """Double the chunk directory until it holds ``need`` live chunks."""
        cdef Slot** old = self._dir
        cdef uint64_t old_mask = self._dir_mask
        cdef uint64_t size = old_mask + 1 if old != NULL else 2
        cdef uint64_t first
        cdef uint64_t c
        cdef Slot** d
        while size < need:
            size *= 2
        d = <Slot**>c_calloc(size, sizeof(Slot*))
        if d == NULL:
            return -1
        if old != NULL:
            # Live chunks lie in [first, first + old size): re-place each.
            first = self._tail >> CHUNK_SHIFT
            for c in range(first, first + old_mask + 1):
                d[c & (size - 1)] = old[c & old_mask]
            c_free(old)
        self._dir = d
        self._dir_mask = size - 1
        return 0

    cdef void _set_tail(self, uint64_t tail) noexcept:
        """Move the tail forward, freeing the chunks it leaves (one kept spare)."""
        cdef uint64_t c = self._tail >> CHUNK_SHIFT
        cdef uint64_t end = tail >> CHUNK_SHIFT
        cdef Slot* chunk
        while c < end:
            chunk = self._dir[c & self._dir_mask]
            self._dir[c & self._dir_mask] = NULL
            if self._spare == NULL:
                self._spare = chunk
            else:
                c_free(chunk)
            c += 1
        self._tail = tail

    cdef void _advance_tail(self, Deferred* released) noexcept:
        """Release the slots at the tail that every reader has read."""
        cdef uint64_t seq = self._tail
        cdef uint64_t head = self._head
        cdef Slot* s
        while seq < head:
            s = _slot_at(self, seq)
            if s.remaining:
                break
            if s.key & SIDE_FLAGS:
                self._drop_side(seq, s.key, released)
            seq += 1
        if seq != self._tail:
            self._set_tail(seq)

    cdef void _drop_side(self, uint64_t seq, uint32_t key, Deferred* released) noexcept:
        cdef PyObject* obj
        if key & HAS_ORIGIN:
            obj = _side_take(<PyObject*>self._origins, seq)
            if obj != NULL:
                _defer(released, obj)
        if key & HAS_COMPLETION:
            obj = _side_take(<PyObject*>self._completions, seq)
            if obj != NULL:
                _defer(released, obj)

    cdef void _evict(self, Evicted* ev, Deferred* released) noexcept:
        """Lose the oldest slot (it has readers left). Called with the lock held."""
        cdef uint64_t seq = self._tail
        cdef Slot* s = _slot_at(self, seq)
        cdef uint32_t key = s.key & KEY_MASK
        cdef PyObject* readers = <PyObject*>self._readers
        cdef Py_ssize_t i
        cdef Py_ssize_t n = c_list_size(readers)
        cdef Reader r
        cdef PyObject* obj
        ev.losers = 0
        ev.tracked_losers = 0
        for i in range(n):
            r = <Reader>c_list_item(readers, i)
            if r._cursor <= seq and r._flags[key]:
                r.dropped += 1
                ev.losers += 1
                ev.tracked_losers += r.tracked
        self.dropped += 1
        ev.msg_id = seq + 1
        ev.value = s.value          # the slot's reference goes to on_drop
        s.value = NULL
        s.remaining = 0
        if s.key & HAS_COMPLETION:
            ev.completion = _side_take(<PyObject*>self._completions, seq)
        if s.key & HAS_ORIGIN:
            obj = _side_take(<PyObject*>self._origins, seq)
            if obj != NULL:
                _defer(released, obj)
        self._set_tail(seq + 1)

    cdef int _report_eviction(self, Evicted* ev) except -1:
        # After the lock. A tracked handler that lost the message counts as
        # done with it.
        cdef PyObject* value = ev.value
        cdef PyObject* completion = ev.completion
        ev.value = NULL
        ev.completion = NULL
        try:
            if completion != NULL and ev.tracked_losers:
                (<Completion>completion)._finish(None, ev.tracked_losers)
            if self._on_drop is not None:
                try:
                    self._on_drop(ev.msg_id, <object>value, ev.losers)
                except Exception:
                    _callback_failed(self._on_drop)
        finally:
            c_xdecref(value)
            c_xdecref(completion)
        return 0

    cdef void _take_wakers(self, Py_ssize_t key, Deferred* wake) noexcept:
        """Move the wakers of parked readers matching ``key`` (< 0: all) to ``wake``."""
        cdef PyObject* readers = <PyObject*>self._readers
        cdef Py_ssize_t i
        cdef Py_ssize_t n = c_list_size(readers)
        cdef Reader r
        cdef PyObject* waker
        for i in range(n):
            r = <Reader>c_list_item(readers, i)
            if r._waker is not None and (key < 0 or r._flags[key]):
                waker = <PyObject*>r._waker
                c_incref(waker)
                if not _defer(wake, waker):
                    # Out of memory: the rest stay parked (woken later), none is lost.
                    c_decref(waker)     # r._waker still holds it
                    return
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
        cdef uint32_t key = self._key_of(type(notice))
        cdef Deferred released
        cdef Deferred wake
        cdef PyObject* readers
        cdef Py_ssize_t i
        cdef Py_ssize_t n
        cdef Reader r
        cdef int status = 0
        _deferred_init(&released)
        _deferred_init(&wake)
        lock_acquire(&self._lock)
        try:
            readers = <PyObject*>self._readers
            n = c_list_size(readers)
            for i in range(n):
                r = <Reader>c_list_item(readers, i)
                if r._flags[key]:
                    if r._push_notice(<PyObject*>notice, self._head, &released) < 0:
                        status = -1
            if self._n_parked:
                self._take_wakers(key, &wake)
        finally:
            lock_release(&self._lock)
        _release(&released)
        _call_all(&wake)
        if status < 0:
            raise MemoryError()

    def close(self):
        """Close the ring: no more writes; readers drain, then get CLOSED."""
        cdef Deferred wake
        cdef PyObject* space = NULL
        _deferred_init(&wake)
        lock_acquire(&self._lock)
        try:
            if not self.closed:
                self.closed = True
                self._take_wakers(-1, &wake)
                if self._space_waiter is not None:
                    space = <PyObject*>self._space_waiter
                    c_incref(space)
                    self._space_waiter = None
        finally:
            lock_release(&self._lock)
        try:
            _call_all(&wake)
            if space != NULL:
                _call0(space)
        finally:
            c_xdecref(space)

    def wait_space(self, callback):
        """Reliable rings: call ``callback()`` once a slot frees (or on close).

        Returns False, without keeping ``callback``, if a write would fit now
        or the ring is closed. One waiter at a time: a new one replaces the
        previous one.
        """
        cdef Deferred released
        cdef PyObject* old = NULL
        cdef bint kept = False
        _deferred_init(&released)
        lock_acquire(&self._lock)
        try:
            self._advance_tail(&released)
            if not self.closed and self._head - self._tail >= self.capacity:
                old = <PyObject*>self._space_waiter
                c_incref(old)               # released after the lock
                self._space_waiter = callback
                kept = True
        finally:
            lock_release(&self._lock)
        _release(&released)
        c_xdecref(old)
        return kept

    cdef PyObject* _take_space_waiter(self, Deferred* released) noexcept:
        # Under the lock, after the tail may have moved: the space waiter
        # (a reference now ours) if a write would fit, else NULL.
        cdef PyObject* waiter
        if self._space_waiter is None:
            return NULL
        self._advance_tail(released)
        if self._head - self._tail >= self.capacity:
            return NULL
        waiter = <PyObject*>self._space_waiter
        c_incref(waiter)
        self._space_waiter = None
        return waiter

    def __repr__(self):
        return "<Ring relay=%s capacity=%d buffered=%d readers=%d%s>" % (
            self.relay_id, self.capacity, self.buffered, len(self._readers),
            " closed" if self.closed else "")


# -- Reader ---------------------------------------------------------------------
# The helpers below run with the ring lock held.

cdef inline uint64_t _seek(Reader r, Ring ring) noexcept:
    """Move the cursor to the next matching slot (or the head)."""
    cdef uint64_t cursor = r._cursor
    cdef uint64_t head = ring._head
    cdef uint8_t* flags = r._flags
    if cursor < ring._tail:
        cursor = ring._tail         # lapped: continue with the oldest still held
    while cursor < head and not flags[_slot_at(ring, cursor).key & KEY_MASK]:
        cursor += 1
    r._cursor = cursor
    return cursor


cdef inline bint _take(Reader r, Ring ring, Taken* t, Deferred* released) noexcept:
    """Take the next item for ``r`` into ``t``; False if there is none."""
    cdef uint64_t cursor = _seek(r, ring)
    cdef Notice* notice
    cdef Slot* s
    cdef uint32_t key
    cdef PyObject* origin
    if r._nq_len and (cursor >= ring._head or r._nq[r._nq_head].stamp <= cursor):
        notice = &r._nq[r._nq_head]
        t.value = notice.obj        # the queue's reference moves to the caller
        notice.obj = NULL
        t.msg_id = 0
        t.origin = <PyObject*>ring.relay_id
        t.completion = NULL
        r._nq_head += 1
        if r._nq_head == r._nq_cap:
            r._nq_head = 0
        r._nq_len -= 1
        return True
    if cursor >= ring._head:
        return False
    s = _slot_at(ring, cursor)
    key = s.key
    s.remaining -= 1
    t.value = s.value
    if s.remaining:
        c_incref(t.value)
    else:
        s.value = NULL              # last reader: the slot's reference moves to the caller
    t.msg_id = cursor + 1
    t.origin = <PyObject*>ring.relay_id
    if key & HAS_ORIGIN:
        origin = _side_get(<PyObject*>ring._origins, cursor)
        if origin != NULL:
            t.origin = origin
    t.completion = NULL
    if r.tracked and key & HAS_COMPLETION:
        t.completion = _side_get(<PyObject*>ring._completions, cursor)
    r._cursor = cursor + 1
    if s.remaining == 0 and cursor == ring._tail:
        ring._advance_tail(released)
    return True


cdef int _grow_notices(Reader r, uint64_t limit) noexcept:
    """Double the notice buffer (at most ``limit``); -1 if out of memory."""
    cdef Py_ssize_t cap = r._nq_cap * 2 if r._nq_cap else 4
    cdef Py_ssize_t i
    cdef Py_ssize_t j = r._nq_head
    cdef Notice* q
    if <uint64_t>cap > limit:
        cap = <Py_ssize_t>limit
    q = <Notice*>c_malloc(cap * sizeof(Notice))
    if q == NULL:
        return -1
    for i in range(r._nq_len):
        q[i] = r._nq[j]
        j += 1
        if j == r._nq_cap:
            j = 0
    c_free(r._nq)
    r._nq = q
    r._nq_cap = cap
    r._nq_head = 0
    return 0


cdef inline Py_ssize_t _count(object n) except -1:
    # pop_many's n, as in the twin: operator.index(n), >= 1.
    n = PyNumber_Index(n)
    if n < 1:
        raise ValueError("n must be >= 1, got %d" % n)
    if n > PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX
    return n


@cython.final
@cython.no_gc_clear
cdef class Reader:
    """One reader's cursor into a ring. Single consumer: one task pops at a time.

    Made by ``Ring.reader()`` only. After each ``pop`` that returns a message,
    ``msg_id``, ``origin`` and (tracked readers only) ``completion`` describe
    it. Notices (out-of-band messages from ``Ring.publish``) have ``msg_id`` 0.
    """
    # no_gc_clear: a finalizer in a garbage cycle may still close this
    # reader, which needs its typed _ring.

    def __cinit__(self, Ring ring not None, types, tracked, _token=None):
        if _token is not _READER_TOKEN:
            raise TypeError("Reader objects are made by Ring.reader()")
        self._ring = ring
        self.types = types
        self.tracked = bool(tracked)
        self.closed = True          # until Ring.reader() has registered it
        self.origin = 0

    def __dealloc__(self):
        cdef Notice* q = self._nq
        cdef Py_ssize_t i
        cdef Py_ssize_t j = self._nq_head
        cdef Py_ssize_t n = self._nq_len
        self._nq = NULL
        self._nq_len = 0
        for i in range(n):
            c_xdecref(q[j].obj)
            j += 1
            if j == self._nq_cap:
                j = 0
        c_free(q)
        c_free(self._flags)
        self._flags = NULL

    cdef bint _wants(self, object tp) except -1:
        return self.types is None or issubclass(tp, self.types)

    cdef int _reserve_flags(self, Py_ssize_t n) noexcept:
        cdef Py_ssize_t cap = self._flags_cap
        cdef uint8_t* p
        if n <= cap:
            return 0
        cap = cap * 2 if cap else 16
        while cap < n:
            cap *= 2
        p = <uint8_t*>c_realloc(self._flags, cap)
        if p == NULL:
            return -1
        self._flags = p
        self._flags_cap = cap
        return 0

    def matches(self, value):
        """True if messages of ``value``'s type are delivered to this reader."""
        cdef Ring ring = self._ring
        cdef uint32_t key = ring._key_of(type(value))
        cdef bint found
        lock_acquire(&ring._lock)
        try:
            found = key < <uint64_t>self._n_flags and self._flags[key]
        finally:
            lock_release(&ring._lock)
        return found

    # -- under the ring lock ------------------------------------------------

    cdef bint _ready(self) noexcept:
        cdef Ring ring = self._ring
        if self.closed or self._nq_len or ring.closed:
            return True
        return _seek(self, ring) < ring._head

    cdef int _push_notice(self, PyObject* notice, uint64_t stamp,
                          Deferred* released) noexcept:
        cdef uint64_t limit = self._ring.capacity
        cdef Py_ssize_t i
        if <uint64_t>self._nq_len >= limit:
            # Full: the oldest goes, counted (the twin appends, then pops it).
            _defer(released, self._nq[self._nq_head].obj)
            self._nq_head += 1
            if self._nq_head == self._nq_cap:
                self._nq_head = 0
            self._nq_len -= 1
            self.dropped += 1
        if self._nq_len == self._nq_cap and _grow_notices(self, limit) < 0:
            return -1
        i = self._nq_head + self._nq_len
        if i >= self._nq_cap:
            i -= self._nq_cap
        c_incref(notice)
        self._nq[i].obj = notice
        self._nq[i].stamp = stamp
        self._nq_len += 1
        return 0

    cdef void _set_meta(self, Taken* t, Deferred* released) noexcept:
        # Swapped under the lock so that two threads popping the same reader
        # (a misuse) cannot corrupt reference counts; the replaced objects
        # are released after the lock.
        cdef PyObject* old
        cdef PyObject* new
        self.msg_id = t.msg_id
        old = <PyObject*>self.origin
        if old != t.origin:
            c_incref(old)
            self.origin = <object>t.origin
            _defer(released, old)
        new = t.completion if t.completion != NULL else <PyObject*>None
        old = <PyObject*>self.completion
        if old != new:
            c_incref(old)
            self.completion = <object>new
            _defer(released, old)

    # -- consuming ------------------------------------------------------------

    cpdef object pop(self):
        """The next message for this reader, or ``EMPTY``, or ``CLOSED``."""
        cdef Ring ring = self._ring
        cdef Deferred released
        cdef Taken t
        cdef PyObject* space = NULL
        cdef int got
        _deferred_init(&released)
        lock_acquire(&ring._lock)
        try:
            if self.closed:
                got = -1
            elif _take(self, ring, &t, &released):
                got = 1
                self._set_meta(&t, &released)
                space = ring._take_space_waiter(&released)
            elif ring.closed:
                got = -1
            else:
                got = 0
        finally:
            lock_release(&ring._lock)
        _release(&released)
        if got <= 0:
            return _CLOSED if got else _EMPTY
        value = _steal(t.value)
        if space != NULL:
            try:
                _call0(space)
            finally:
                c_decref(space)
        return value

    def pop_many(self, n):
        """Up to ``n`` messages as a list (at least one), or ``EMPTY``/``CLOSED``.

        Metadata attributes describe the last message of the list.
        ``n`` is an integer (``operator.index``) >= 1.
        """
        cdef Py_ssize_t count = _count(n)
        cdef Ring ring = self._ring
        cdef Deferred released
        cdef Taken t
        cdef PyObject* space = NULL
        cdef Py_ssize_t got = 0
        cdef bint closed = False
        # The list is made before the lock (lists are GC-tracked) with room
        # for what is buffered now: the items are then stored without any
        # allocation. The head only grows, so this never asks for too few.
        cdef uint64_t buffered = ring._head - self._cursor + <uint64_t>self._nq_len
        if buffered < <uint64_t>count:
            count = <Py_ssize_t>buffered if buffered else 1
        cdef list out = c_list_new(count)
        _deferred_init(&released)
        lock_acquire(&ring._lock)
        try:
            if self.closed:
                closed = True
            else:
                while got < count and _take(self, ring, &t, &released):
                    c_list_set_item(<PyObject*>out, got, t.value)   # steals t.value
                    got += 1
                if got:
                    self._set_meta(&t, &released)
                    space = ring._take_space_waiter(&released)
                else:
                    closed = ring.closed
        finally:
            lock_release(&ring._lock)
        _release(&released)
        if not got:
            return _CLOSED if closed else _EMPTY
        c_set_size(<PyObject*>out, got)     # the unused tail slots are NULL
        if space != NULL:
            try:
                _call0(space)
            finally:
                c_decref(space)
        return out

    def park(self, waker):
        """Ask for ``waker()`` once something is ready for this reader.

        Returns False (and keeps nothing) if something is ready now: pop
        instead. The waker may be called from any thread, after a write,
        a notice, or a close; it is called at most once per park.
        """
        cdef Ring ring = self._ring
        cdef PyObject* old = NULL
        cdef bint parked = False
        lock_acquire(&ring._lock)
        try:
            if not self._ready():
                parked = True
                if self._waker is None:
                    ring._n_parked += 1
                else:
                    old = <PyObject*>self._waker
                    c_incref(old)           # released after the lock
                self._waker = waker
        finally:
            lock_release(&ring._lock)
        c_xdecref(old)
        return parked

    def unpark(self):
        """Forget the waker given to ``park`` (if it was not called yet)."""
        cdef Ring ring = self._ring
        cdef PyObject* old = NULL
        lock_acquire(&ring._lock)
        try:
            if self._waker is not None:
                old = <PyObject*>self._waker
                c_incref(old)
                self._waker = None
                ring._n_parked -= 1
        finally:
            lock_release(&ring._lock)
        c_xdecref(old)

    def headroom(self):
        """Writes that fit before the ring wraps to this reader's oldest unread message.

        ``capacity`` minus the slots from that message to the head, or
        ``capacity`` if this reader has nothing unread (or is closed). In a
        reliable ring, 0 means the ring is full and its oldest slot waits for
        (at least) this reader: no write can succeed until it reads.
        """
        cdef Ring ring = self._ring
        cdef uint64_t room
        lock_acquire(&ring._lock)
        try:
            if self.closed:
                room = ring.capacity
            else:
                room = ring.capacity - (ring._head - _seek(self, ring))
        finally:
            lock_release(&ring._lock)
        return room

    @property
    def pending(self):
        """Messages and notices buffered for this reader."""
        cdef Ring ring = self._ring
        cdef uint64_t count = 0
        cdef uint64_t seq
        lock_acquire(&ring._lock)
        try:
            if not self.closed:
                count = self._nq_len
                seq = self._cursor if self._cursor > ring._tail else ring._tail
                while seq < ring._head:
                    if self._flags[_slot_at(ring, seq).key & KEY_MASK]:
                        count += 1
                    seq += 1
        finally:
            lock_release(&ring._lock)
        return count

    def close(self):
        """Unsubscribe: release every claim this reader has on the ring.

        Returns the completions of tracked messages this reader had not read
        (a tracked reader owes them), for the caller to finish.
        """
        cdef Ring ring = self._ring
        cdef list owed = []
        cdef Deferred released
        cdef PyObject* space = NULL
        cdef int status = 0
        _deferred_init(&released)
        lock_acquire(&ring._lock)
        try:
            if not self.closed:
                status = self._close(owed, &released, &space)
        finally:
            lock_release(&ring._lock)
        _release(&released)
        try:
            if space != NULL:
                _call0(space)
        finally:
            c_xdecref(space)
        if status < 0:
            raise MemoryError()
        return owed

    cdef int _close(self, list owed, Deferred* released, PyObject** space) noexcept:
        cdef Ring ring = self._ring
        cdef PyObject* readers = <PyObject*>ring._readers
        cdef Py_ssize_t i
        cdef Py_ssize_t n = c_list_size(readers)
        cdef uint64_t seq
        cdef Slot* s
        cdef PyObject* obj
        cdef int status = 0
        self.closed = True
        for i in range(n):
            if c_list_item(readers, i) == <PyObject*>self:
                # The caller holds a reference to self: this frees nothing.
                if c_list_set_slice(readers, i, i + 1, NULL) < 0:
                    c_err_clear()
                    status = -1
                break
        for i in range(self._n_flags):
            if self._flags[i]:
                ring._match[i] -= 1
                if self.tracked:
                    ring._tracked[i] -= 1
        seq = self._cursor if self._cursor > ring._tail else ring._tail
        while seq < ring._head:
            s = _slot_at(ring, seq)
            if self._flags[s.key & KEY_MASK]:
                s.remaining -= 1
                if self.tracked and s.key & HAS_COMPLETION:
                    obj = _side_get(<PyObject*>ring._completions, seq)
                    if obj != NULL and c_list_append(<PyObject*>owed, obj) < 0:
                        c_err_clear()
                        status = -1
                if s.remaining == 0:
                    _defer(released, s.value)
                    s.value = NULL
            seq += 1
        self._cursor = ring._head
        ring._advance_tail(released)
        while self._nq_len:
            _defer(released, self._nq[self._nq_head].obj)
            self._nq[self._nq_head].obj = NULL
            self._nq_head += 1
            if self._nq_head == self._nq_cap:
                self._nq_head = 0
            self._nq_len -= 1
        self._nq_head = 0
        if self._waker is not None:
            obj = <PyObject*>self._waker
            c_incref(obj)
            self._waker = None
            _defer(released, obj)
            ring._n_parked -= 1
        space[0] = ring._take_space_waiter(released)
        return status

    def __repr__(self):
        return "<Reader types=%r tracked=%s dropped=%d%s>" % (
            self.types, bool(self.tracked), self.dropped,
            " closed" if self.closed else "")


# -- Cycle collection -------------------------------------------------------------
# Buffered messages and unread notices are held in C arrays, which Cython's
# generated tp_traverse does not know about. Without the wrappers below, a
# cycle through a buffered message (a message that refers to its relay)
# would never be collected; the twin keeps them in dicts and deques, which
# the collector sees.

cdef c_traverseproc _ring_base_traverse = NULL
cdef c_traverseproc _reader_base_traverse = NULL


cdef int _visit_slots(Ring ring, c_visitproc visit, void* arg) noexcept:
    cdef uint64_t seq
    cdef Slot* s
    cdef int e
    if ring._dir == NULL:
        return 0
    seq = ring._tail
    while seq < ring._head:
        s = _slot_at(ring, seq)
        if s.value != NULL:
            e = visit(s.value, arg)
            if e:
                return e
        seq += 1
    return 0


cdef int _visit_notices(Reader r, c_visitproc visit, void* arg) noexcept:
    cdef Py_ssize_t i
    cdef Py_ssize_t j = r._nq_head
    cdef int e
    for i in range(r._nq_len):
        if r._nq[j].obj != NULL:
            e = visit(r._nq[j].obj, arg)
            if e:
                return e
        j += 1
        if j == r._nq_cap:
            j = 0
    return 0


cdef int _ring_traverse(PyObject* o, c_visitproc visit, void* arg) noexcept:
    cdef int e = _ring_base_traverse(o, visit, arg)
    if e:
        return e
    return _visit_slots(<Ring>o, visit, arg)


cdef int _reader_traverse(PyObject* o, c_visitproc visit, void* arg) noexcept:
    cdef int e = _reader_base_traverse(o, visit, arg)
    if e:
        return e
    return _visit_notices(<Reader>o, visit, arg)


_ring_base_traverse = (<c_PyTypeObject*><void*>Ring).tp_traverse
(<c_PyTypeObject*><void*>Ring).tp_traverse = _ring_traverse
_reader_base_traverse = (<c_PyTypeObject*><void*>Reader).tp_traverse
(<c_PyTypeObject*><void*>Reader).tp_traverse = _reader_traverse


# -- The per-message receive path, compiled ------------------------------------
# ``async for`` calls ``__anext__`` once per message, and a coroutine made per
# call costs more than everything else on that path. When this module is
# built, ``Subscription.__anext__`` is ``subscription_next``: it returns a
# small awaitable (_ready.h) that takes the next message only when it is
# first resumed, so an ``__anext__()`` never awaited, or cancelled first,
# consumes nothing. With a message buffered it returns it at once; otherwise
# it delegates to ``_subscription_wait``, the same loop as the pure-Python
# method in subscription.py, compiled. It awaits whatever
# ``sub._waiters.wait()`` returns: no asyncio here.

cdef extern from "_ready.h":
    int pd_next_init() except -1
    object pd_next_new(object sub)
    PyObject* (*pd_next_first)(PyObject* sub, PyObject** inner) except NULL


cdef PyObject* _next_first(PyObject* op, PyObject** inner) except NULL:
    # pd_next_first: the next value (a new reference), or NULL with *inner
    # set to the slow path's iterator, or NULL with an exception set.
    cdef object result = _next_step(<object>op)
    if type(result) is _Delegate:
        inner[0] = <PyObject*>(<_Delegate>result).iterator
        c_incref(inner[0])
        return NULL
    c_incref(<PyObject*>result)
    return <PyObject*>result


@cython.final
cdef class _Delegate:
    cdef object iterator


cdef object _next_step(object sub):
    reader = sub._reader
    value = (<Reader>reader).pop() if type(reader) is Reader else reader.pop()
    cdef _Delegate delegate
    if value is _EMPTY or value is _CLOSED:
        delegate = _Delegate.__new__(_Delegate)
        delegate.iterator = _subscription_wait(sub, value).__await__()
        return delegate
    if sub._envelopes:
        return sub._wrap(value)
    return value


pd_next_init()
pd_next_first = _next_first


def subscription_next(sub):
    """``Subscription.__anext__``: an awaitable of the next value
    (StopAsyncIteration at the end); it takes nothing until awaited."""
    return pd_next_new(sub)


async def _subscription_wait(sub, value):
    reader = sub._reader
    while value is _EMPTY:
        await sub._waiters.wait()
        value = reader.pop()
    if value is _CLOSED:
        raise StopAsyncIteration
    if sub._envelopes:
        return sub._wrap(value)
    return value
