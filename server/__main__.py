"""`python -m server [flags]`: the same as `attnserve serve [flags]`."""

import sys

from server.cli import serve_main

sys.exit(serve_main(prog="python -m server"))
