"""`make serve` runs engine.demo until the server lands: it must stream from the built-in model on a fresh cache."""

import os
import subprocess
import sys


def test_demo_streams_from_the_builtin_model(tmp_path):
    env = {**os.environ, "ATTNSERVE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "engine.demo", "--max-tokens", "5", "--prompt", "Hello", "--prompt", "The sky"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "output is noise" in out.stdout  # the README's warning is repeated at run time
    assert "[0] finished: length" in out.stdout and "[1] finished: length" in out.stdout
    assert (tmp_path / "default-model-v1" / "model.safetensors").exists()


def test_demo_bad_model_dir_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.demo", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error:") and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
