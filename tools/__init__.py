"""Maintainer code, not part of the installed package: the demo model's training and evaluation (run from the
repository root as modules, `python -m tools.<name>`), and the byte-level BPE training that the tests' checkpoints
and the offline benchmark's model also use."""
