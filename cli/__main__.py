"""``python -m cli``: the same as the ``siteplan`` console script."""

import sys

from cli.main import main

sys.exit(main())
