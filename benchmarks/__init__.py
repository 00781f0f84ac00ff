"""In-process benchmarks of the engine: `attnserve bench offline` (offline.py), prefix_cache.py and the GPU suite
(gpu_suite.py, gpusuite/). They import the engine and torch; the HTTP load tools, which import neither, are in
clients/bench/."""
