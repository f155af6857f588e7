"""``python -m hdrq ...`` is the ``hdrq`` command (see :mod:`hdrq.cli`)."""
import sys

from .cli import main

sys.exit(main())
