/*
 * workers._fastpath: the common request head and the common response head,
 * recognised whole in one call.
 *
 * Both scanners accept only a strict subset of HTTP/1.1 and DECLINE (return
 * None) on anything else: an unusual method or target, a byte outside the
 * plain printable set, a header with a framing or hop-by-hop rule, a head
 * split over two reads, a limit reached.  A declined head goes to the full
 * path (httptools and the rules in workers/request_head.py / upstream.py),
 * which answers it exactly as it would without this module.  Nothing is
 * ever rejected here, so the module can only make the accepted cases cheaper.
 *
 * RequestScanner(max_line, max_head, max_headers, request_id, max_body).scan(data, pos, tail)
 *     -> None | (method, target, forwarded, request_id, end, content_length, body_left)
 *
 * A request with a Content-Length body is forwarded as its head followed by
 * the body bytes this read holds; `body_left` more are relayed by counting
 * (workers/downstream.py), never parsed.
 *
 * The head forwarded is the one workers/request_head.py builds for the same
 * request (build_exchange: field order, the X-Forwarded-* lines, the
 * Content-Length line after them); tests/unit/test_fastpath.py compares both.
 * scan_response(data)
 *     -> None | (status, out, remaining, keep_alive)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_FIELDS 128 /* more than this many fields: decline */

static unsigned char TCHAR[256];  /* RFC 9110 token characters: T_PLAIN, T_DASH or T_UNDERSCORE */
static unsigned char VCHAR[256];  /* field value: VCHAR, SP, HTAB (no obs-text) */
static unsigned char UCHAR[256];  /* request target: VCHAR but '#' */
static unsigned char HCHAR[256];  /* a plain Host name: letters, digits, "-._~" */

enum { T_PLAIN = 1, T_DASH = 2, T_UNDERSCORE = 2 | 4 };  /* TCHAR values (0: not a tchar) */

static void
init_tables(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        VCHAR[c] = (c >= 0x21 && c <= 0x7e) || c == ' ' || c == '\t';
        UCHAR[c] = c >= 0x21 && c <= 0x7e && c != '#';
        HCHAR[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || c == '-' || c == '.' || c == '_' || c == '~';
    }
    for (const char *p = extra; *p; p++)
        TCHAR[(unsigned char)*p] = T_PLAIN;
    TCHAR['-'] = T_DASH;
    TCHAR['_'] = T_UNDERSCORE;
}

/* Known methods, as interned bytes objects (compared by value in Python). */
static const char *METHOD_NAMES[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"};
#define N_METHODS 8
static PyObject *METHODS[N_METHODS];
static PyObject *EMPTY;

typedef struct {
    const unsigned char *line;  /* start of the line (the name) */
    Py_ssize_t line_len;        /* with its CRLF */
    Py_ssize_t name_len;
    const unsigned char *value;
    Py_ssize_t value_len;       /* without the whitespace before it */
    int foldable;               /* the name has '_', two separators in a row, or one at an end */
} Field;

/* One field line at p: "name:" OWS value CRLF.  Returns the byte after its
 * CRLF, or NULL to decline (not a token name, a byte outside VCHAR/SP/HTAB,
 * a bare CR or LF, or no CRLF before `end`). */
static const unsigned char *
field_line(const unsigned char *p, const unsigned char *end, Field *f)
{
    const unsigned char *q = p;
    /* `odd` collects, in the same pass, what another server might fold into a
     * different name: '_' (CGI and several frameworks read it as '-'), two
     * separators in a row, a separator at either end (prev starts as one). */
    unsigned int k, prev = T_DASH, odd = 0;
    while (q < end && (k = TCHAR[*q]) != 0) {
        odd |= k & (prev | 4);  /* bit 2: a separator after one; bit 4: a "_" */
        prev = k;
        q++;
    }
    if (q == p || q >= end || *q != ':')
        return NULL;
    f->line = p;
    f->name_len = q - p;
    f->foldable = (odd & (T_DASH | 4)) != 0 || (prev & T_DASH) != 0;
    q++;
    while (q < end && (*q == ' ' || *q == '\t'))
        q++;
    const unsigned char *v = q;
    while (q < end && VCHAR[*q])
        q++;
    if (q + 1 >= end || q[0] != '\r' || q[1] != '\n')
        return NULL;
    /* Trailing whitespace stays in the value, as llhttp leaves it (the
     * httptools path forwards it as is; so does this one). */
    f->value = v;
    f->value_len = q - v;
    f->line_len = q + 2 - p;
    return q + 2;
}

/* ASCII case-insensitive comparison with a lower-case literal.  Not
 * strncasecmp: that one follows the C locale, and under a Turkish locale 'I'
 * does not fold to 'i' (TRANSFER-ENCODING would pass as an ordinary field). */
static int
ascii_ieq(const unsigned char *s, const char *lower, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

static int
name_is(const Field *f, const char *lower, Py_ssize_t n)
{
    return f->name_len == n && ascii_ieq(f->line, lower, n);
}

static int
value_is(const Field *f, const char *lower, Py_ssize_t n)
{
    return f->value_len == n && ascii_ieq(f->value, lower, n);
}

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

static void
put(char **w, const void *src, Py_ssize_t n)
{
    memcpy(*w, src, (size_t)n);
    *w += n;
}

#define PUT_LIT(w, s) put((w), (s), (Py_ssize_t)(sizeof(s) - 1))

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

static PyTypeObject RequestScannerType = {
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

/* ------------------------------------------------------------------------ */

/* scan_response(data): a complete response head at the start of `data` that is
 * HTTP/1.1, status 200-599 but 204 and 304, framed by one Content-Length, with
 * no hop-by-hop field but Connection (keep-alive or close) and Keep-Alive, and
 * no more body bytes after it than Content-Length says.
 * Returns (status, out, remaining, keep_alive): `out` is the head without its
 * Connection and Keep-Alive lines, followed by the body bytes already read;
 * `remaining` body bytes are still to come. */
static PyObject *
scan_response(PyObject *module, PyObject *data)
{
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "scan_response(data: bytes)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    const unsigned char *p = buf, *end = buf + n;
    if (n < 17 || memcmp(p, "HTTP/1.1 ", 9) != 0)
        Py_RETURN_NONE;
    if (p[9] < '2' || p[9] > '5' || p[10] < '0' || p[10] > '9' || p[11] < '0' || p[11] > '9'
            || p[12] != ' ')
        Py_RETURN_NONE;
    int status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    if (status == 204 || status == 304)
        Py_RETURN_NONE;
    p += 13;
    while (p < end && VCHAR[*p])
        p++;
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
        Py_RETURN_NONE;
    p += 2;

    /* kept spans: [status line + fields before the first dropped one], ... */
    const unsigned char *keep_from = buf;
    const unsigned char *spans[MAX_FIELDS + 1][2];
    int ns = 0;
    Py_ssize_t kept = 0;
    long long length = -1;
    int keep_alive = 1;
    int nf = 0;
    for (;;) {
        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n') {
            p += 2;
            break;
        }
        if (++nf > MAX_FIELDS)
            Py_RETURN_NONE;
        Field f;
        const unsigned char *next = field_line(p, end, &f);
        if (next == NULL)
            Py_RETURN_NONE;
        int drop = 0;
        switch (f.name_len) {
        case 2:
            if (name_is(&f, "te", 2))
                Py_RETURN_NONE;
            break;
        case 7:
            if (name_is(&f, "trailer", 7) || name_is(&f, "upgrade", 7))
                Py_RETURN_NONE;
            break;
        case 10:
            if (name_is(&f, "connection", 10)) {
                if (value_is(&f, "keep-alive", 10))
                    drop = 1;
                else if (value_is(&f, "close", 5))
                    drop = 1, keep_alive = 0;
                else
                    Py_RETURN_NONE;
            } else if (name_is(&f, "keep-alive", 10)) {
                drop = 1;
            }
            break;
        case 14:
            if (name_is(&f, "content-length", 14)) {
                if (length >= 0 || f.value_len < 1 || f.value_len > 15)
                    Py_RETURN_NONE;
                length = 0;
                for (Py_ssize_t i = 0; i < f.value_len; i++) {
                    unsigned char c = f.value[i];
                    if (c < '0' || c > '9')
                        Py_RETURN_NONE;
                    length = length * 10 + (c - '0');
                }
            }
            break;
        case 16:
            if (name_is(&f, "proxy-connection", 16))
                Py_RETURN_NONE;
            break;
        case 17:
            if (name_is(&f, "transfer-encoding", 17))
                Py_RETURN_NONE;
            break;
        }
        if (drop) {
            /* the kept span ends at the CRLF before this line (which it keeps) */
            spans[ns][0] = keep_from;
            spans[ns][1] = p;
            kept += p - keep_from;
            ns++;
            keep_from = next;
        }
        p = next;
    }
    if (length < 0)
        Py_RETURN_NONE;
    Py_ssize_t body = end - p;
    if (body > length)
        Py_RETURN_NONE;  /* more than the body: the full path decides */
    spans[ns][0] = keep_from;
    spans[ns][1] = end;  /* the rest of the head, its blank line and the body read so far */
    kept += end - keep_from;
    ns++;
    PyObject *out;
    if (ns == 1) {
        out = data;
        Py_INCREF(out);
    } else {
        out = PyBytes_FromStringAndSize(NULL, kept);
        if (out == NULL)
            return NULL;
        char *w = PyBytes_AS_STRING(out);
        for (int i = 0; i < ns; i++)
            put(&w, spans[i][0], spans[i][1] - spans[i][0]);
    }
    return Py_BuildValue("(iNLO)", status, out, (long long)(length - body),
                         keep_alive ? Py_True : Py_False);
}

static PyMethodDef module_methods[] = {
    {"scan_response", scan_response, METH_O,
     "scan_response(data) -> None | (status, out, remaining, keep_alive)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "workers._fastpath",
    .m_doc = "The common request and response heads, recognised whole in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    init_tables();
    for (int i = 0; i < N_METHODS; i++) {
        if (METHODS[i] == NULL) {
            METHODS[i] = PyBytes_FromString(METHOD_NAMES[i]);
            if (METHODS[i] == NULL)
                return NULL;
        }
    }
    if (EMPTY == NULL && (EMPTY = PyBytes_FromStringAndSize("", 0)) == NULL)
        return NULL;
    if (PyType_Ready(&RequestScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RequestScannerType);
    if (PyModule_AddObject(m, "RequestScanner", (PyObject *)&RequestScannerType) < 0) {
        Py_DECREF(&RequestScannerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
