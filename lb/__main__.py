"""`python -m lb`: the same as the `lb` console script.

`python -m` puts the current directory first on sys.path.  Unless lb itself
was found there (a source checkout run in place), nothing else may come from
it: a `workers/` or `inference/` package in the current directory would
otherwise be imported by `lb train`, and modules of the same name as a
dependency would shadow it.  The console script never had the directory on
sys.path; this makes both the same.  (The processes lb starts take lb's own
packages explicitly: lb/core/boot.py.)
"""

import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and sys.path[0] and not sys.flags.safe_path:
    _first = os.path.realpath(sys.path[0])
    if _first == os.path.realpath(os.getcwd()) and _first != os.path.realpath(_root):
        del sys.path[0]

from lb.cli import main  # noqa: E402

raise SystemExit(main())
