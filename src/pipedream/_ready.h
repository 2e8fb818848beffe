/* An awaitable that is already done: awaiting it gives its value at once.
 *
 * The compiled Subscription.__anext__ returns one when a message is buffered.
 * On Python 3.10+ its am_send slot hands the value back without raising
 * StopIteration, so a message received by `async for` costs one small
 * allocation instead of a coroutine. tp_iternext (used by 3.9 and by plain
 * next()) raises StopIteration(value) as the iterator protocol wants.
 * No asyncio here: it never suspends.
 */
#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *value;        /* owned until handed out; NULL after */
} pd_ready;

static void pd_ready_dealloc(PyObject *op) {
    pd_ready *self = (pd_ready *)op;
    Py_XDECREF(self->value);
    PyObject_Free(op);
}

static PyObject *pd_ready_await(PyObject *op) {
    Py_INCREF(op);
    return op;
}

static PyObject *pd_ready_take(pd_ready *self) {
    PyObject *value = self->value;
    self->value = NULL;
    if (value == NULL) {        /* awaited a second time: nothing left */
        Py_INCREF(Py_None);
        value = Py_None;
    }
    return value;
}

static PyObject *pd_ready_next(PyObject *op) {
    PyObject *value = pd_ready_take((pd_ready *)op);
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

#if PY_VERSION_HEX >= 0x030A0000
static PySendResult pd_ready_send(PyObject *op, PyObject *arg, PyObject **result) {
    (void)arg;
    *result = pd_ready_take((pd_ready *)op);
    return PYGEN_RETURN;
}
#endif

static PyAsyncMethods pd_ready_async = {
    pd_ready_await,     /* am_await */
    0,                  /* am_aiter */
    0,                  /* am_anext */
#if PY_VERSION_HEX >= 0x030A0000
    pd_ready_send,      /* am_send */
#endif
};

static PyTypeObject pd_ready_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    "pipedream._core.Ready",    /* tp_name */
    sizeof(pd_ready),           /* tp_basicsize */
};

static int pd_ready_init(void) {
    pd_ready_type.tp_dealloc = pd_ready_dealloc;
    pd_ready_type.tp_as_async = &pd_ready_async;
    pd_ready_type.tp_iter = pd_ready_await;
    pd_ready_type.tp_iternext = pd_ready_next;
    pd_ready_type.tp_flags = Py_TPFLAGS_DEFAULT;
    pd_ready_type.tp_doc = "An awaitable that is already done (pipedream internal).";
    return PyType_Ready(&pd_ready_type);
}

/* A new done awaitable holding a new reference to value. */
static PyObject *pd_ready_new(PyObject *value) {
    pd_ready *self = PyObject_New(pd_ready, &pd_ready_type);
    if (self == NULL)
        return NULL;
    Py_INCREF(value);
    self->value = value;
    return (PyObject *)self;
}
