"""Maintainer scripts, run from the repository root as modules (`python -m tools.<name>`); not part of the package."""
