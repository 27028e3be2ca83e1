"""``python -m ptx_numba.cli``."""
import sys

from . import main

sys.exit(main())
