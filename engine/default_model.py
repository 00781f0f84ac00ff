"""The built-in demo model's location.

With no model given, `make serve`, `attnserve serve`, `LLM()` and the Docker image serve `models/demo/`: a small
Llama-architecture code-completion model the project trained on the Python standard library
(tools/train_demo_model.py; models/demo/README.md says how and what to expect of it). It is a real checkpoint in
Hugging Face format, loaded by the same path as any other model. `--load-format dummy` borrows its tokenizer for a
model directory that has none (engine/models/dummy.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import ModelLoadError

# Where the demo checkpoint lives: in the source tree, or where $ATTNSERVE_DEMO_MODEL points (the Docker image,
# whose installed package sits apart from the checkpoint).
DEMO_MODEL_ENV = "ATTNSERVE_DEMO_MODEL"
_REPO_DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo"


def demo_model_path() -> Path:
    """Where the demo checkpoint is expected, whether or not it is there."""
    return Path(os.environ.get(DEMO_MODEL_ENV) or _REPO_DEMO_MODEL)


def default_model_dir() -> Path:
    """The demo model's directory; raises ModelLoadError naming where it was looked for if it is not there."""
    path = demo_model_path()
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"no model given, and the built-in demo model is not at {path} (it ships in the source tree's "
            f"models/demo; set ${DEMO_MODEL_ENV} to its directory). Pass a model directory with --model DIR")
    return path
