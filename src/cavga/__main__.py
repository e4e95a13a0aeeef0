"""`python -m cavga`: the command line."""

import sys

from cavga.cli import main

sys.exit(main())
