/* The awaitable that the compiled Subscription.__anext__ returns.
 *
 * It takes nothing from the subscription until it is first resumed (awaited):
 * an __anext__() never awaited, or cancelled before it ran, consumes nothing.
 * On its first step it asks the core (pd_next_first, set by _core.pyx) for a
 * buffered message: if there is one it returns it at once (on Python 3.10+
 * through am_send, with no StopIteration and no coroutine); otherwise it
 * delegates every step to the iterator of the slow coroutine that waits.
 * No asyncio here: it only forwards what it is sent or thrown.
 */
#include <Python.h>

/* Set by _core.pyx. Given the subscription, returns a new reference to the
 * next value; or NULL with *inner set to a new reference to the iterator to
 * delegate to; or NULL with an exception set and *inner left NULL. */
static PyObject *(*pd_next_first)(PyObject *sub, PyObject **inner) = NULL;

typedef struct {
    PyObject_HEAD
    PyObject *sub;      /* owned until the first step, then NULL */
    PyObject *inner;    /* owned: the slow path's iterator, once needed */
} pd_next;

static void pd_next_dealloc(PyObject *op) {
    pd_next *self = (pd_next *)op;
    Py_XDECREF(self->sub);
    Py_XDECREF(self->inner);
    PyObject_Free(op);
}

static PyObject *pd_next_self(PyObject *op) {
    Py_INCREF(op);
    return op;
}

/* First step: 1 = *value is the result (new ref); 0 = delegate to
 * self->inner; -1 = error set. */
static int pd_next_start(pd_next *self, PyObject **value) {
    PyObject *inner = NULL;
    PyObject *sub = self->sub;
    self->sub = NULL;
    if (sub == NULL) {                  /* already finished: nothing more */
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an already awaited __anext__()");
        return -1;
    }
    *value = pd_next_first(sub, &inner);
    Py_DECREF(sub);
    if (*value != NULL)
        return 1;
    if (inner == NULL)
        return -1;
    self->inner = inner;
    return 0;
}

static PyObject *pd_next_iternext(PyObject *op) {
    pd_next *self = (pd_next *)op;
    PyObject *value;
    if (self->inner == NULL) {
        int started = pd_next_start(self, &value);
        if (started < 0)
            return NULL;
        if (started == 1) {             /* done: StopIteration(value) */
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
            Py_DECREF(value);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
            return NULL;
        }
    }
    return Py_TYPE(self->inner)->tp_iternext(self->inner);
}

#if PY_VERSION_HEX >= 0x030A0000
static PySendResult pd_next_send(PyObject *op, PyObject *arg, PyObject **result) {
    pd_next *self = (pd_next *)op;
    if (self->inner == NULL) {
        int started = pd_next_start(self, result);
        if (started < 0) {
            *result = NULL;
            return PYGEN_ERROR;
        }
        if (started == 1)
            return PYGEN_RETURN;
        arg = Py_None;                  /* a fresh iterator starts with None */
    }
    return PyIter_Send(self->inner, arg, result);
}
#endif

static PyObject *pd_next_send_method(PyObject *op, PyObject *arg) {
    pd_next *self = (pd_next *)op;
    if (self->inner == NULL) {
        if (arg != Py_None) {
            PyErr_SetString(PyExc_TypeError, "can't send non-None value to a just-started awaitable");
            return NULL;
        }
        return pd_next_iternext(op);
    }
    return PyObject_CallMethod(self->inner, "send", "O", arg);
}

static PyObject *pd_next_throw(PyObject *op, PyObject *args) {
    pd_next *self = (pd_next *)op;
    PyObject *typ, *val = NULL, *tb = NULL;
    if (self->inner != NULL) {
        PyObject *method = PyObject_GetAttrString(self->inner, "throw");
        PyObject *out;
        if (method == NULL)
            return NULL;
        out = PyObject_Call(method, args, NULL);
        Py_DECREF(method);
        return out;
    }
    /* Not started: nothing was taken; the exception goes straight back. */
    Py_CLEAR(self->sub);
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb))
        return NULL;
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else
        PyErr_SetObject(typ, val ? val : Py_None);
    return NULL;
}

static PyObject *pd_next_close(PyObject *op, PyObject *unused) {
    pd_next *self = (pd_next *)op;
    (void)unused;
    Py_CLEAR(self->sub);
    if (self->inner != NULL)
        return PyObject_CallMethod(self->inner, "close", NULL);
    Py_RETURN_NONE;
}

static PyMethodDef pd_next_methods[] = {
    {"send", (PyCFunction)pd_next_send_method, METH_O, NULL},
    {"throw", (PyCFunction)pd_next_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)pd_next_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL}
};

static PyAsyncMethods pd_next_async = {
    pd_next_self,       /* am_await */
    0,                  /* am_aiter */
    0,                  /* am_anext */
#if PY_VERSION_HEX >= 0x030A0000
    pd_next_send,       /* am_send */
#endif
};

static PyTypeObject pd_next_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    "pipedream._core.NextMessage",  /* tp_name */
    sizeof(pd_next),                /* tp_basicsize */
};

static int pd_next_init(void) {
    pd_next_type.tp_dealloc = pd_next_dealloc;
    pd_next_type.tp_as_async = &pd_next_async;
    pd_next_type.tp_iter = pd_next_self;
    pd_next_type.tp_iternext = pd_next_iternext;
    pd_next_type.tp_methods = pd_next_methods;
    pd_next_type.tp_flags = Py_TPFLAGS_DEFAULT;
    pd_next_type.tp_doc = "What Subscription.__anext__() returns: awaiting it gives the next message.";
    return PyType_Ready(&pd_next_type);
}

/* A new awaitable of the next message of sub (a new reference to sub is kept). */
static PyObject *pd_next_new(PyObject *sub) {
    pd_next *self = PyObject_New(pd_next, &pd_next_type);
    if (self == NULL)
        return NULL;
    Py_INCREF(sub);
    self->sub = sub;
    self->inner = NULL;
    return (PyObject *)self;
}
