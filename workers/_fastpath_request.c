/*
 * workers._fastpath.RequestScanner: the common request head, recognised whole
 * (see workers/_fastpath.c for what the module promises).
 */
#include "_fastpath.h"
/* Known methods, as interned bytes objects (compared by value in Python). */
static const char *METHOD_NAMES[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"};
#define N_METHODS 8
static PyObject *METHODS[N_METHODS];
static PyObject *EMPTY;

/* Request fields: 0 ordinary (forwarded as is), 1 Host, 2 Connection,
 * 3 Content-Length, 4 any other field with a rule (Transfer-Encoding and the
 * other hop-by-hop ones, X-Forwarded-*, X-Request-Id, Expect, Upgrade): the
 * full path handles those. */
enum { F_PLAIN = 0, F_HOST = 1, F_CONNECTION = 2, F_LENGTH = 3, F_RULE = 4 };

#define MAX_LENGTH_DIGITS 15 /* a longer Content-Length value: declined */

static int
request_field_kind(const Field *f)
{
    switch (f->name_len) {
    case 2:
        return name_is(f, "te", 2) ? F_RULE : F_PLAIN;
    case 4:
        return name_is(f, "host", 4) ? F_HOST : F_PLAIN;
    case 6:
        return name_is(f, "expect", 6) ? F_RULE : F_PLAIN;
    case 7:
        return (name_is(f, "trailer", 7) || name_is(f, "upgrade", 7)) ? F_RULE : F_PLAIN;
    case 10:
        if (name_is(f, "connection", 10))
            return F_CONNECTION;
        return name_is(f, "keep-alive", 10) ? F_RULE : F_PLAIN;
    case 12:
        return name_is(f, "x-request-id", 12) ? F_RULE : F_PLAIN;
    case 14:
        return name_is(f, "content-length", 14) ? F_LENGTH : F_PLAIN;
    case 15:
        return name_is(f, "x-forwarded-for", 15) ? F_RULE : F_PLAIN;
    case 16:
        return (name_is(f, "proxy-connection", 16) || name_is(f, "x-forwarded-host", 16))
            ? F_RULE : F_PLAIN;
    case 17:
        return (name_is(f, "transfer-encoding", 17) || name_is(f, "x-forwarded-proto", 17))
            ? F_RULE : F_PLAIN;
    default:
        return F_PLAIN;
    }
}

/* A Host value the full path forwards as it is: a name of letters, digits and
 * "-._~", then optionally ":" and a port of 1 to 5 digits up to 65535.
 * Anything else (empty, an IP literal, other characters, the trailing
 * whitespace llhttp leaves in a value) is declined: the full path validates
 * it (workers/request_head.py valid_host) and answers 400 if it is invalid. */
static int
plain_host(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n && HCHAR[s[i]])
        i++;
    if (i == 0)
        return 0;
    if (i == n)
        return 1;
    if (s[i] != ':' || n - i < 2 || n - i > 6)
        return 0;
    long port = 0;
    for (i++; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        port = port * 10 + (s[i] - '0');
    }
    return port <= 65535;
}

/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_line;     /* longest request target */
    Py_ssize_t max_head;     /* longest forwarded head, target excluded */
    Py_ssize_t max_headers;  /* most field lines, Host included */
    PyObject *request_id;    /* callable -> bytes, or None */
    Py_ssize_t max_body;     /* largest Content-Length accepted (0: any) */
} RequestScanner;

static int
RequestScanner_init(RequestScanner *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_line", "max_head", "max_headers", "request_id", "max_body", NULL};
    PyObject *rid = Py_None;
    self->max_body = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nnn|On", kwlist, &self->max_line,
                                     &self->max_head, &self->max_headers, &rid, &self->max_body))
        return -1;
    if (self->max_line < 1 || self->max_head < 1 || self->max_headers < 0 || self->max_body < 0) {
        PyErr_SetString(PyExc_ValueError, "limits must be positive");
        return -1;
    }
    if (rid != Py_None && !PyCallable_Check(rid)) {
        PyErr_SetString(PyExc_TypeError, "request_id must be callable or None");
        return -1;
    }
    Py_INCREF(rid);
    Py_XSETREF(self->request_id, rid);
    return 0;
}

static void
RequestScanner_dealloc(RequestScanner *self)
{
    Py_XDECREF(self->request_id);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* scan(data, pos, tail): the request head starting at data[pos], if it is a
 * complete common one (known method but CONNECT, origin-form target, HTTP/1.1,
 * exactly one Host with a plain value, no field with a rule but
 * "Connection: keep-alive" and one Content-Length of plain digits within
 * max_body, no field name another server might fold).
 * The forwarded head is: request line, the ordinary fields as name ": " value,
 * Host, X-Forwarded-Host, X-Request-Id (when configured), then `tail` (which
 * holds X-Forwarded-For, X-Forwarded-Proto and the blank line), with the
 * Content-Length line before that blank line.  The body bytes this read holds
 * follow the head in the same bytes object. */
static PyObject *
RequestScanner_scan(RequestScanner *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1])
            || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "scan(data: bytes, pos: int, tail: bytes)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos < 0 || pos > n) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    const unsigned char *p = buf + pos, *end = buf + n;

    /* method */
    int m = -1;
    for (int i = 0; i < N_METHODS; i++) {
        size_t len = strlen(METHOD_NAMES[i]);
        if ((Py_ssize_t)len < end - p && memcmp(p, METHOD_NAMES[i], len) == 0 && p[len] == ' ') {
            m = i;
            p += len + 1;
            break;
        }
    }
    if (m < 0)
        Py_RETURN_NONE;
    Py_ssize_t mlen = (Py_ssize_t)strlen(METHOD_NAMES[m]);

    /* target: origin-form, printable, within the limit */
    const unsigned char *url = p;
    if (p >= end || *p != '/')
        Py_RETURN_NONE;
    const unsigned char *url_end = (end - p > self->max_line) ? p + self->max_line : end;
    while (p < url_end && UCHAR[*p])
        p++;
    if (p >= url_end || *p != ' ')
        Py_RETURN_NONE;
    Py_ssize_t ulen = p - url;
    if (end - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0)
        Py_RETURN_NONE;
    p += 11;

    /* fields */
    Field fields[MAX_FIELDS];
    int nf = 0;
    Py_ssize_t all = 0;  /* every field line, dropped ones included (the max_headers limit) */
    const Field *host = NULL;
    Py_ssize_t plain_bytes = 0;
    Py_ssize_t clen = -1;  /* Content-Length, -1: none */
    const unsigned char *scan_end = (end - p > self->max_head) ? p + self->max_head : end;
    for (;;) {
        if (scan_end - p >= 2 && p[0] == '\r' && p[1] == '\n') {
            p += 2;
            break;
        }
        if (nf == MAX_FIELDS || ++all > self->max_headers)
            Py_RETURN_NONE;
        Field *f = &fields[nf];
        p = field_line(p, scan_end, f);
        if (p == NULL)
            Py_RETURN_NONE;
        switch (request_field_kind(f)) {
        case F_PLAIN:
            if (f->foldable)  /* the full path tells look-alikes of names with a rule */
                Py_RETURN_NONE;
            plain_bytes += f->name_len + 2 + f->value_len + 2;
            nf++;
            break;
        case F_HOST:
            if (host != NULL)
                Py_RETURN_NONE;
            host = f;
            nf++;  /* kept in the array for its bytes; skipped when writing */
            break;
        case F_CONNECTION:
            if (!value_is(f, "keep-alive", 10))
                Py_RETURN_NONE;
            break;  /* hop-by-hop, and says nothing HTTP/1.1 does not already mean */
        case F_LENGTH:
            /* Digits only, no leading zero (the full path forwards the value it
             * frames by, and tells a malformed one), no trailing whitespace. */
            if (clen >= 0 || f->value_len < 1 || f->value_len > MAX_LENGTH_DIGITS
                    || (f->value[0] == '0' && f->value_len > 1))
                Py_RETURN_NONE;
            clen = 0;
            for (Py_ssize_t i = 0; i < f->value_len; i++) {
                unsigned char c = f->value[i];
                if (c < '0' || c > '9')
                    Py_RETURN_NONE;
                clen = clen * 10 + (c - '0');
            }
            if (self->max_body && clen > self->max_body)
                Py_RETURN_NONE;  /* the full path answers 413 */
            break;  /* forwarded after X-Forwarded-Proto, as the full path does */
        default:
            Py_RETURN_NONE;
        }
    }
    if (host == NULL || !plain_host(host->value, host->value_len))
        Py_RETURN_NONE;
    Py_ssize_t head_end = p - buf;

    PyObject *rid = NULL;
    Py_ssize_t rlen = 0;
    if (self->request_id != Py_None) {
        rid = PyObject_CallNoArgs(self->request_id);
        if (rid == NULL)
            return NULL;
        if (!PyBytes_CheckExact(rid)) {
            Py_DECREF(rid);
            PyErr_SetString(PyExc_TypeError, "request_id() must return bytes");
            return NULL;
        }
        rlen = PyBytes_GET_SIZE(rid);
    }
    Py_ssize_t hlen = host->value_len;
    Py_ssize_t tlen = PyBytes_GET_SIZE(args[2]);
    if (tlen < 2) {
        Py_XDECREF(rid);
        PyErr_SetString(PyExc_ValueError, "tail must end the head with CRLF");
        return NULL;
    }
    char digits[MAX_LENGTH_DIGITS + 1];
    Py_ssize_t dlen = 0, body_in = 0;
    if (clen >= 0) {
        dlen = snprintf(digits, sizeof(digits), "%zd", clen);
        body_in = n - head_end < clen ? n - head_end : clen;
    }
    Py_ssize_t total = mlen + 1 + ulen + 11 + plain_bytes + 6 + hlen + 20 + hlen
        + (rid ? 16 + rlen : 0) + tlen + (clen >= 0 ? 18 + dlen : 0);
    if (total - ulen > self->max_head) {
        Py_XDECREF(rid);
        Py_RETURN_NONE;
    }
    PyObject *head = PyBytes_FromStringAndSize(NULL, total + body_in);
    PyObject *target = PyBytes_FromStringAndSize((const char *)url, ulen);
    if (head == NULL || target == NULL) {
        Py_XDECREF(head);
        Py_XDECREF(target);
        Py_XDECREF(rid);
        return NULL;
    }
    char *w = PyBytes_AS_STRING(head);
    put(&w, METHOD_NAMES[m], mlen);
    *w++ = ' ';
    put(&w, url, ulen);
    PUT_LIT(&w, " HTTP/1.1\r\n");
    for (int i = 0; i < nf; i++) {
        const Field *f = &fields[i];
        if (f == host)
            continue;
        put(&w, f->line, f->name_len);
        PUT_LIT(&w, ": ");
        put(&w, f->value, f->value_len);
        PUT_LIT(&w, "\r\n");
    }
    PUT_LIT(&w, "Host: ");
    put(&w, host->value, hlen);
    PUT_LIT(&w, "\r\nX-Forwarded-Host: ");
    put(&w, host->value, hlen);
    if (rid) {
        PUT_LIT(&w, "\r\nX-Request-Id: ");
        put(&w, PyBytes_AS_STRING(rid), rlen);
    }
    if (clen >= 0) {
        put(&w, PyBytes_AS_STRING(args[2]), tlen - 2);
        PUT_LIT(&w, "Content-Length: ");
        put(&w, digits, dlen);
        PUT_LIT(&w, "\r\n\r\n");
        put(&w, buf + head_end, body_in);
        head_end += body_in;
        total += body_in;
    }
    else
        put(&w, PyBytes_AS_STRING(args[2]), tlen);
    if (w - PyBytes_AS_STRING(head) != total) {  /* cannot happen: the sizes above are exact */
        Py_DECREF(head);
        Py_DECREF(target);
        Py_XDECREF(rid);
        PyErr_SetString(PyExc_SystemError, "request head size mismatch");
        return NULL;
    }
    Py_INCREF(METHODS[m]);
    if (rid == NULL) {
        rid = EMPTY;
        Py_INCREF(rid);
    }
    PyObject *end_obj = PyLong_FromSsize_t(head_end);
    PyObject *clen_obj = PyLong_FromSsize_t(clen > 0 ? clen : 0);
    PyObject *left_obj = PyLong_FromSsize_t(clen > 0 ? clen - body_in : 0);
    PyObject *res = (end_obj && clen_obj && left_obj) ? PyTuple_New(7) : NULL;
    if (res == NULL) {
        Py_DECREF(METHODS[m]);
        Py_DECREF(head);
        Py_DECREF(target);
        Py_DECREF(rid);
        Py_XDECREF(end_obj);
        Py_XDECREF(clen_obj);
        Py_XDECREF(left_obj);
        return NULL;
    }
    PyTuple_SET_ITEM(res, 0, METHODS[m]);
    PyTuple_SET_ITEM(res, 1, target);
    PyTuple_SET_ITEM(res, 2, head);
    PyTuple_SET_ITEM(res, 3, rid);
    PyTuple_SET_ITEM(res, 4, end_obj);
    PyTuple_SET_ITEM(res, 5, clen_obj);
    PyTuple_SET_ITEM(res, 6, left_obj);
    return res;
}

static PyMethodDef RequestScanner_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))RequestScanner_scan, METH_FASTCALL,
     "scan(data, pos, tail) -> None | (method, target, forwarded, request_id, end, "
     "content_length, body_left)"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject RequestScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workers._fastpath.RequestScanner",
    .tp_basicsize = sizeof(RequestScanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Recognises the common request head and builds the forwarded one.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RequestScanner_init,
    .tp_dealloc = (destructor)RequestScanner_dealloc,
    .tp_methods = RequestScanner_methods,
};

int
request_scanner_ready(void)
{
    for (int i = 0; i < N_METHODS; i++) {
        if (METHODS[i] == NULL) {
            METHODS[i] = PyBytes_FromString(METHOD_NAMES[i]);
            if (METHODS[i] == NULL)
                return -1;
        }
    }
    if (EMPTY == NULL && (EMPTY = PyBytes_FromStringAndSize("", 0)) == NULL)
        return -1;
    return PyType_Ready(&RequestScannerType);
}
