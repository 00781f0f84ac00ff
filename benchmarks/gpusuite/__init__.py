"""The parts of benchmarks/gpu_suite.py: kernel correctness at real shapes, decode attention timing, end-to-end
decode step time. Each part is a module; the script runs them and prints their tables."""
