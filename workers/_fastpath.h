/*
 * What the C fast path's files share (workers/_fastpath.c: the module, the
 * character tables and the field-line reader; _fastpath_request.c: the
 * request scanner; _fastpath_response.c: the response scanner).
 */
#ifndef LB_FASTPATH_H
#define LB_FASTPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_FIELDS 128 /* more than this many fields: decline */

extern unsigned char TCHAR[256];  /* RFC 9110 token characters: T_PLAIN, T_DASH or T_UNDERSCORE */
extern unsigned char VCHAR[256];  /* field value: VCHAR, SP, HTAB (no obs-text) */
extern unsigned char UCHAR[256];  /* request target: VCHAR but '#' */
extern unsigned char HCHAR[256];  /* a plain Host name: letters, digits, "-._~" */

enum { T_PLAIN = 1, T_DASH = 2, T_UNDERSCORE = 2 | 4 };  /* TCHAR values (0: not a tchar) */

typedef struct {
    const unsigned char *line;  /* start of the line (the name) */
    Py_ssize_t line_len;        /* with its CRLF */
    Py_ssize_t name_len;
    const unsigned char *value;
    Py_ssize_t value_len;       /* without the whitespace before it */
    int foldable;               /* the name has '_', two separators in a row, or one at an end */
} Field;

/* _fastpath.c */
const unsigned char *field_line(const unsigned char *p, const unsigned char *end, Field *f);
int ascii_ieq(const unsigned char *s, const char *lower, Py_ssize_t n);
int name_is(const Field *f, const char *lower, Py_ssize_t n);
int value_is(const Field *f, const char *lower, Py_ssize_t n);

static inline void
put(char **w, const void *src, Py_ssize_t n)
{
    memcpy(*w, src, (size_t)n);
    *w += n;
}

#define PUT_LIT(w, s) put((w), (s), (Py_ssize_t)(sizeof(s) - 1))

/* _fastpath_request.c */
extern PyTypeObject RequestScannerType;
int request_scanner_ready(void);  /* the type and its constants, once: 0, or -1 with an exception */

/* _fastpath_response.c */
PyObject *scan_response(PyObject *module, PyObject *data);

#endif
