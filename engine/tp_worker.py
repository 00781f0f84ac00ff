"""Tensor-parallel worker ranks (engine/parallel.py): the entry point of a worker process, and what a node other than
rank 0's runs.

`python -m engine.tp_worker` is how rank 0 (or a headless node) starts one worker: its config, rank, local rank and
rendezvous port come as one JSON object on stdin from the process that started it.
"""

from __future__ import annotations

import json
import os
import sys

from engine import parallel
from engine.config import EngineConfig
from engine.model_runner import worker_main


def run_worker_node(config: EngineConfig) -> int:
    """Run this process's share of the ranks without serving: under torchrun (external_launcher) the one rank torchrun
    gave it, in this process; else (mp, a node other than 0) each of the node's ranks as a child process. Returns when
    rank 0 stops them; the exit status is 0 when they ended cleanly."""
    if config.parallel.distributed_executor_backend == "external_launcher":
        try:
            worker_main(config, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), None)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0
    return parallel.run_headless(config)


if __name__ == "__main__":
    args = json.loads(sys.stdin.buffer.read())
    worker_main(parallel.decode_config(args["config"]), args["rank"], args["local_rank"], args["port"])
