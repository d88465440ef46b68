/*
 * workers._fastpath.scan_response: the common response head, recognised whole
 * (see workers/_fastpath.c for what the module promises).
 */
#include "_fastpath.h"
/* ------------------------------------------------------------------------ */

/* scan_response(data): a complete response head at the start of `data` that is
 * HTTP/1.1, status 200-599 but 204 and 304, framed by one Content-Length, with
 * no hop-by-hop field but Connection (keep-alive or close) and Keep-Alive, and
 * no more body bytes after it than Content-Length says.
 * Returns (status, out, remaining, keep_alive): `out` is the head without its
 * Connection and Keep-Alive lines, followed by the body bytes already read;
 * `remaining` body bytes are still to come. */
PyObject *
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
