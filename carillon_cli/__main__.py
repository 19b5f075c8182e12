"""``python -m carillon_cli``: the same as the ``carillon`` command."""

import sys

from carillon_cli.main import main

sys.exit(main())
