"""``python -m orchestrator``: see orchestrator/cli.py."""

import sys

from .cli import main

sys.exit(main())
