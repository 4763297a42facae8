"""``python -m storefed``: the same as the ``storefed`` command."""

import sys

from storefed.cli import main

sys.exit(main())
