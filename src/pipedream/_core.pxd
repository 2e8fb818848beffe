# cython: language_level=3
"""The map of the relay core: C state of each class, and its C methods.

The bodies are in ``_core.pyx``; ``_core_py.py`` is the same core in Python.

Storage: a message is one 16-byte ``Slot`` in a chunk of 256 slots. Chunks
are found through a small circular directory indexed by ``seq >> 8``; the
chunks alive are those from the tail's to the head's, so memory follows the
backlog, never the capacity. Rare per-message data lives in side tables keyed
by seq and flagged in the slot's key: the origin when it is not the ring's own
relay id, and the ``Completion`` when tracked readers matched.

Locking: ``Ring._lock`` (a one-byte atomic spinlock, ``SpinLock``) guards every field of the ring
and of its readers; ``_completion_lock`` in the .pyx guards Completions. Under
either lock the core runs no Python code and starts no garbage collection:
no allocation of a GC-tracked object, no reference dropped that could be the
last one, no callback. References let go are gathered in a ``Deferred`` and
released after unlocking; callbacks are called after unlocking.
"""

cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from *:
    """
    #define PD_CHUNK_SHIFT 8
    #define PD_CHUNK_SLOTS 256
    #define PD_CHUNK_MASK 255u
    #define PD_KEY_MASK 0x3FFFFFFFu
    #define PD_HAS_ORIGIN 0x80000000u
    #define PD_HAS_COMPLETION 0x40000000u
    #define PD_SIDE_FLAGS 0xC0000000u
    #define PD_DEFERRED_SMALL 16

    /* A one-byte spinlock on GCC/Clang atomics. Critical sections are a few
       hundred instructions of plain C at most and never block, so an
       uncontended acquire is one atomic exchange; a contended one spins
       briefly and then yields the CPU. */
    #include <sched.h>
    typedef struct { unsigned char held; } pd_spinlock;
    static inline void pd_lock_acquire(pd_spinlock *l) {
        unsigned spins = 0;
        while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE)) {
            while (__atomic_load_n(&l->held, __ATOMIC_RELAXED)) {
                if (++spins > 64) { sched_yield(); spins = 0; }
            }
        }
    }
    static inline void pd_lock_release(pd_spinlock *l) {
        __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE);
    }
    """
    ctypedef struct SpinLock "pd_spinlock":
        unsigned char held
    void lock_acquire "pd_lock_acquire"(SpinLock* lock) noexcept nogil
    void lock_release "pd_lock_release"(SpinLock* lock) noexcept nogil
    # Slot storage: 256 slots (4 KiB) per chunk.
    const int CHUNK_SHIFT "PD_CHUNK_SHIFT"
    const int CHUNK_SLOTS "PD_CHUNK_SLOTS"
    const uint64_t CHUNK_MASK "PD_CHUNK_MASK"
    # Slot.key: the type key in the low 30 bits, side-table flags above.
    const uint32_t KEY_MASK "PD_KEY_MASK"
    const uint32_t HAS_ORIGIN "PD_HAS_ORIGIN"
    const uint32_t HAS_COMPLETION "PD_HAS_COMPLETION"
    const uint32_t SIDE_FLAGS "PD_SIDE_FLAGS"
    const int DEFERRED_SMALL "PD_DEFERRED_SMALL"


cdef struct Slot:
    # One buffered message: 16 bytes.
    PyObject* value         # owned while remaining > 0, else NULL
    uint32_t key            # type key | HAS_ORIGIN | HAS_COMPLETION
    uint32_t remaining      # matching readers that have not read it yet


cdef struct Notice:
    # One unread out-of-band notice of a reader.
    uint64_t stamp          # the ring's head when it was published
    PyObject* obj           # owned


cdef struct Deferred:
    # References taken out under a lock, to release (or call) after it.
    Py_ssize_t n
    Py_ssize_t heap_cap
    PyObject** heap         # items past the first DEFERRED_SMALL
    PyObject* small[16]


cdef struct Evicted:
    # What an eviction hands to the code that runs after the lock.
    PyObject* value         # owned (for on_drop), NULL if nothing was evicted
    PyObject* completion    # owned, or NULL
    uint64_t msg_id
    Py_ssize_t losers
    Py_ssize_t tracked_losers


cdef struct Taken:
    # One item popped by a reader.
    PyObject* value         # owned
    uint64_t msg_id         # 0 for a notice
    PyObject* origin        # borrowed; alive until the Deferred is released
    PyObject* completion    # borrowed, or NULL


cdef class Reader


@cython.final
cdef class Completion:
    cdef readonly uint64_t msg_id
    cdef readonly Py_ssize_t remaining
    cdef readonly object error
    cdef readonly object value      # the message, kept only while tracked
    cdef public object layer        # free for the layer above (its waiting state)
    cdef object _callback
    cdef object _waiter             # the ring's waiter, for __await__

    cdef int _finish(self, object error, Py_ssize_t n) except -1


@cython.final
cdef class Ring:
    cdef SpinLock _lock
    cdef readonly uint64_t capacity
    cdef readonly bint reliable
    cdef readonly object relay_id
    cdef readonly bint closed
    cdef readonly uint64_t dropped
    cdef object _on_drop
    cdef object _space_waiter
    cdef public object waiter   # waiter(completion) -> awaitable: see Completion

    # Type registry. Changed under _registry (a threading.RLock, held while
    # issubclass runs user code), committed under _lock.
    cdef object _registry
    cdef dict _keys             # concrete type -> key (a Python int)
    cdef list _key_types        # key -> concrete type
    cdef uint32_t* _match       # key -> open readers matching it
    cdef uint32_t* _tracked     # key -> open tracked readers matching it
    cdef Py_ssize_t _n_keys
    cdef Py_ssize_t _keys_cap
    cdef list _readers          # open readers (owns them; read under _lock)
    cdef uint64_t _reader_gen   # readers ever registered

    # Slots: seq in [_tail, _head) is held.
    cdef uint64_t _head         # seq of the next write; msg id = seq + 1
    cdef uint64_t _tail         # oldest seq still held
    cdef Slot** _dir            # chunk directory, (seq >> 8) & _dir_mask
    cdef uint64_t _dir_mask
    cdef Slot* _spare           # one freed chunk kept against malloc churn
    cdef dict _origins          # seq -> origin, for slots flagged HAS_ORIGIN
    cdef dict _completions      # seq -> Completion, for HAS_COMPLETION

    cdef Py_ssize_t _n_parked   # readers holding a waker
    cdef object __weakref__

    cdef int64_t _put(self, object value, object origin, Completion completion) except? -2
    cdef uint32_t _key_of(self, object tp) except? 0xFFFFFFFF
    cdef uint32_t _register(self, object tp) except? 0xFFFFFFFF
    cdef int _add_key(self, PyObject** snap, uint8_t* flags, Py_ssize_t n) noexcept
    cdef int _reserve_keys(self, Py_ssize_t n) noexcept
    cdef object _origin_entry(self, object origin)
    cdef int _write(self, PyObject* value, uint32_t key, PyObject* origin,
                    Completion completion, uint64_t* msg_id, Evicted* ev,
                    Deferred* wake, Deferred* released) noexcept
    cdef int _reserve_chunk(self) noexcept
    cdef int _grow_dir(self, uint64_t need) noexcept
    cdef void _set_tail(self, uint64_t tail) noexcept
    cdef void _advance_tail(self, Deferred* released) noexcept
    cdef void _drop_side(self, uint64_t seq, uint32_t key, Deferred* released) noexcept
    cdef void _evict(self, Evicted* ev, Deferred* released) noexcept
    cdef int _report_eviction(self, Evicted* ev) except -1
    cdef void _take_wakers(self, Py_ssize_t key, Deferred* wake) noexcept
    cdef PyObject* _take_space_waiter(self, Deferred* released) noexcept


@cython.final
cdef class Reader:
    cdef Ring _ring
    cdef readonly object types
    cdef readonly bint tracked
    cdef readonly bint closed
    cdef readonly uint64_t dropped
    # Metadata of the last item popped.
    cdef readonly uint64_t msg_id
    cdef readonly object origin
    cdef readonly object completion

    cdef uint64_t _cursor       # next seq to look at
    cdef uint8_t* _flags        # key -> 1 if this reader matches the type
    cdef Py_ssize_t _n_flags
    cdef Py_ssize_t _flags_cap
    cdef object _waker
    cdef Notice* _nq            # unread notices: a circular buffer
    cdef Py_ssize_t _nq_cap
    cdef Py_ssize_t _nq_head
    cdef Py_ssize_t _nq_len
    cdef object __weakref__

    cpdef object pop(self)
    cdef bint _wants(self, object tp) except -1
    cdef int _reserve_flags(self, Py_ssize_t n) noexcept
    cdef bint _ready(self) noexcept
    cdef int _push_notice(self, PyObject* notice, uint64_t stamp, Deferred* released) noexcept
    cdef void _set_meta(self, Taken* t, Deferred* released) noexcept
    cdef int _close(self, list owed, Deferred* released, PyObject** space) noexcept
