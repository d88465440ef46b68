"""The C fast path (`workers/_fastpath.c`), when it is built and not switched off.

It recognises the common request head and the common response head whole, in
one call each, and declines everything else to the httptools path, which
handles every request the same way (only slower).  `LB_NO_FASTPATH=1` in the
environment switches it off.  tests/unit/test_fastpath.py compares the two paths
byte for byte; the request corpus runs over real sockets against both.
"""

from __future__ import annotations

import os

RequestScanner = scan_response = None
if os.environ.get("LB_NO_FASTPATH", "") in ("", "0"):
    try:
        from workers._fastpath import RequestScanner, scan_response  # noqa: F401, F811
    except ImportError:  # not compiled (no C compiler at install time)
        pass

AVAILABLE = scan_response is not None
