"""`python -m clients.bench serve|sweep|offline ...`, the same as `attnserve bench ...`."""

import sys

from clients.bench.cli import main

sys.exit(main())
