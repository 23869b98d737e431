"""``python -m cronfile`` is the ``cronfile`` command."""

import sys

from cronfile.cli import main

sys.exit(main())
