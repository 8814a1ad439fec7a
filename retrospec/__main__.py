"""``python -m retrospec``: the command line."""

import sys

from retrospec.tools.cli import main

sys.exit(main())
