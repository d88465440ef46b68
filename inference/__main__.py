"""`python -m inference --runtime DIR` (see inference/process.py)."""

import sys

from inference.process import main

sys.exit(main())
