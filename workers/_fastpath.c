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
 *
 * Files: this one (the module, the character tables, the field-line reader),
 * _fastpath_request.c (RequestScanner), _fastpath_response.c (scan_response),
 * _fastpath.h (what they share).
 */
#include "_fastpath.h"

unsigned char TCHAR[256];  /* RFC 9110 token characters: T_PLAIN, T_DASH or T_UNDERSCORE */
unsigned char VCHAR[256];  /* field value: VCHAR, SP, HTAB (no obs-text) */
unsigned char UCHAR[256];  /* request target: VCHAR but '#' */
unsigned char HCHAR[256];  /* a plain Host name: letters, digits, "-._~" */

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

/* One field line at p: "name:" OWS value CRLF.  Returns the byte after its
 * CRLF, or NULL to decline (not a token name, a byte outside VCHAR/SP/HTAB,
 * a bare CR or LF, or no CRLF before `end`). */
const unsigned char *
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
int
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

int
name_is(const Field *f, const char *lower, Py_ssize_t n)
{
    return f->name_len == n && ascii_ieq(f->line, lower, n);
}

int
value_is(const Field *f, const char *lower, Py_ssize_t n)
{
    return f->value_len == n && ascii_ieq(f->value, lower, n);
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
    if (request_scanner_ready() < 0)
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
