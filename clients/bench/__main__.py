"""`python -m clients.bench serve|sweep ...`: the same as `attnserve bench serve|sweep ...`."""

import sys

from clients.bench.cli import main

sys.exit(main())
