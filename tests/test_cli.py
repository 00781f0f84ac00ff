"""The `attnserve serve` command line in vLLM's shapes: the model as a positional argument, --version, vLLM's
--num-gpu-blocks-override, --chat-template (a file or the template itself), and one clear line for vLLM flags that
attnserve does not support."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import UNSUPPORTED_VLLM_FLAGS, parse_serve_args
from server_process import REPO, ServerProcess

SCRIPT = Path(sys.executable).parent / "attnserve"


@pytest.fixture(scope="module")
def llama_ckpt(make_ckpt) -> Path:
    return make_ckpt("llama")


def run(*cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATTNSERVE_API_KEY"}
    return subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "server"], [str(SCRIPT)], [str(SCRIPT), "serve"]],
                         ids=["python-m-server", "attnserve", "attnserve-serve"])
def test_version_prints_the_installed_version(cmd):
    result = run(*cmd, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"attnserve {importlib.metadata.version('attnserve')}"


def test_model_as_positional_argument_is_the_same_as_model_flag():
    assert parse_serve_args(["org/name"]).model == "org/name"
    assert parse_serve_args(["--model", "org/name"]).model == "org/name"
    assert parse_serve_args(["org/name", "--model", "org/name"]).model == "org/name"
    assert parse_serve_args([]).model is None


def test_model_given_twice_differently_is_one_line():
    result = run(sys.executable, "-m", "server", "one/model", "--model", "other/model")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "python -m server: error: the model is given twice, as 'one/model' and as --model 'other/model'; give one "
        "(see --help)"]


def test_num_gpu_blocks_override_is_vllms_name_for_num_kv_blocks():
    assert parse_serve_args(["--num-gpu-blocks-override", "64"]).num_kv_blocks == 64
    assert parse_serve_args(["--num-kv-blocks", "64"]).num_kv_blocks == 64


@pytest.mark.parametrize("argv", [["--trust-remote-code"], ["-pp", "2"], ["--data-parallel-size=4"],
                                  ["--quantization", "awq"], ["--enable-lora"], ["--kv-cache-dtype", "fp8"]])
def test_unsupported_vllm_flag_is_one_line_naming_it(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_serve_args(argv, prog="python -m server")
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    flag = argv[0].split("=")[0]
    assert line.startswith(f"python -m server: error: {flag} is a vLLM flag that attnserve does not support: ")


def test_unsupported_flags_with_a_no_op_value_pass():
    """A parallel size of 1 or kv-cache-dtype auto is what attnserve does anyway: launch scripts keep working."""
    args = parse_serve_args(["-tp", "1", "--pipeline-parallel-size", "1", "--kv-cache-dtype", "auto", "--swap-space",
                             "0"])
    assert args.model is None
    for names, *_ in UNSUPPORTED_VLLM_FLAGS:
        assert not any(hasattr(args, name.lstrip("-").replace("-", "_")) for name in names)


def test_unsupported_flags_are_hidden_from_help():
    result = run(sys.executable, "-m", "server", "--help")
    assert result.returncode == 0
    for names, *_ in UNSUPPORTED_VLLM_FLAGS:
        assert not any(f"{name} " in result.stdout or f"{name}," in result.stdout for name in names), names
    for flag in ("MODEL", "--revision", "--chat-template", "--num-gpu-blocks-override", "--version"):
        assert flag in result.stdout, flag


# A template that makes the rendering recognisable: each message as [role] content, then the assistant cue.
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}[assistant]{% endif %}"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.mark.parametrize("as_file", [True, False], ids=["file", "string"])
def test_positional_model_and_chat_template_serve_end_to_end(tmp_path, llama_ckpt, as_file):
    """`attnserve serve DIR --chat-template T`: the model is served and the chat route and /tokenize render with T,
    not the model's own template."""
    from engine.tokenizer import Tokenizer

    template_arg = TEMPLATE
    if as_file:
        template_arg = str(tmp_path / "template.jinja")
        Path(template_arg).write_text(TEMPLATE, encoding="utf-8")
    expected = Tokenizer.from_dir(llama_ckpt).encode("[user] hello there\n[assistant]", add_special_tokens=False)
    with ServerProcess(None, str(llama_ckpt), "--chat-template", template_arg, "--num-gpu-blocks-override", "40",
                       "--max-model-len", "256") as proc, proc.client() as client:
        tokens = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert tokens == expected
        chat = client.post("/v1/chat/completions", json={"model": str(llama_ckpt), "messages": MESSAGES,
                                                         "max_tokens": 2}).json()
        assert chat["usage"]["prompt_tokens"] == len(expected)
        assert "KV cache: 40 blocks" in proc.log()


def test_chat_template_that_looks_like_a_missing_file_is_a_clear_error(llama_ckpt):
    result = run(sys.executable, "-m", "server", str(llama_ckpt), "--chat-template", "templates/missing.jinja",
                 "--port", "0")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "templates/missing.jinja" in line and "chat template" in line, line


def test_bench_offline_from_an_installed_package_says_it_needs_the_source_tree(tmp_path):
    """benchmarks/ is not installed; outside a clone the console script says where the benchmark lives."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNSERVE_API_KEY", "PYTHONPATH")}
    result = subprocess.run([str(SCRIPT), "bench", "offline", "--num-prompts", "4"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "benchmarks/offline.py" in line and "python -m attnserve bench offline" in line, line
