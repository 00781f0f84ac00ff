"""--model as a Hugging Face Hub id, resolved from a cache laid out the way huggingface_hub lays it out.

No test here reaches the network. huggingface_hub reads its HF_* environment variables once, at import, and conftest
has imported it (through transformers) before any test runs, so setting them in-process would change nothing. The
in-process tests therefore patch the two values engine.hub reads at call time, huggingface_hub.constants.HF_HUB_CACHE
and HF_HUB_OFFLINE, and make any socket connect fail. The subprocess tests then check the way a user does it:
HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE set before the import, and a Hub that cannot be reached (HF_ENDPOINT on a
closed local port).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import constants

from engine import LLM, EngineArgs, ModelLoadError, SamplingParams

REPO = "tiny-org/tiny-model"  # main: the "llama" checkpoint; branch v2: the "qwen2" one
NOT_CACHED = "tiny-org/not-cached"
NO_CONFIG = "tiny-org/no-config"  # a repo without config.json, like a GGUF-only one
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HubCache:
    home: Path  # HF_HOME; the hub cache is home / "hub", huggingface_hub's default under it
    snapshots: dict[str, Path]  # REPO's revision name -> its snapshot directory

    @property
    def cache(self) -> Path:
        return self.home / "hub"


def lay_out_repo(cache: Path, repo_id: str, revisions: dict[str, Path]) -> dict[str, Path]:
    """Cache each checkpoint directory as revision `name` of `repo_id`, as huggingface_hub does:
    models--ORG--NAME/blobs/<hash> holds the bytes, snapshots/<commit>/<path> are relative symlinks to the blobs, and
    refs/<name> holds the commit hash (no newline, as huggingface_hub writes it). Returns name -> snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = {}
    for name, src in revisions.items():
        commit = hashlib.sha1(f"{repo_id}@{name}".encode()).hexdigest()  # 40 hex digits, like a git commit
        snapshot = repo / "snapshots" / commit
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / file.relative_to(src)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
        snapshots[name] = snapshot
    return snapshots


@pytest.fixture(scope="module")
def hub(tmp_path_factory, make_ckpt) -> HubCache:
    home = tmp_path_factory.mktemp("hf_home")
    snapshots = lay_out_repo(home / "hub", REPO, {"main": make_ckpt("llama"), "v2": make_ckpt("qwen2")})
    tokenizer_only = tmp_path_factory.mktemp("tokenizer_only")
    shutil.copy(make_ckpt("llama") / "tokenizer.json", tokenizer_only)
    lay_out_repo(home / "hub", NO_CONFIG, {"main": tokenizer_only})
    return HubCache(home, snapshots)


@pytest.fixture(autouse=True)
def offline_hub(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(sock, address):
        raise AssertionError(f"a test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_hub_id_loads_the_cached_snapshot_and_generates_like_the_local_dir(hub, make_ckpt):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = ["The quick brown fox", "Once upon a time, in a small village,"]
    from_hub = LLM(REPO, max_model_len=64, num_kv_blocks=16)
    assert from_hub.engine.core.config.model.path == hub.snapshots["main"]
    local = LLM(str(make_ckpt("llama")), max_model_len=64, num_kv_blocks=16)
    hub_tokens = [o.outputs[0].token_ids for o in from_hub.generate(prompts, params, use_tqdm=False)]
    local_tokens = [o.outputs[0].token_ids for o in local.generate(prompts, params, use_tqdm=False)]
    assert hub_tokens == local_tokens
    assert all(len(t) == 6 for t in hub_tokens)


@pytest.mark.parametrize("by", ["branch", "commit"])
def test_revision_selects_its_snapshot(hub, by):
    revision = "v2" if by == "branch" else hub.snapshots["v2"].name
    model = EngineArgs(model=REPO, revision=revision).create_config().model
    assert model.path == hub.snapshots["v2"]
    assert model.architecture == "Qwen2ForCausalLM"  # main is the Llama checkpoint


@pytest.mark.parametrize("repo_id,revision", [(NOT_CACHED, None), (REPO, "v3")])
def test_model_not_in_the_cache_is_a_clear_error(hub, repo_id, revision):
    with pytest.raises(ModelLoadError) as err:
        EngineArgs(model=repo_id, revision=revision).create_config()
    message = str(err.value)
    for expected in (repr(repo_id), repr(revision or "main"), str(hub.cache), "HF_HUB_OFFLINE is set",
                     f"download {repo_id}", "local model directory"):
        assert expected in message


def test_repo_without_config_json_is_named():
    with pytest.raises(ModelLoadError, match=f"'{NO_CONFIG}'.*has no config.json"):
        EngineArgs(model=NO_CONFIG).create_config()


def test_local_path_wins_over_a_same_named_hub_id(tmp_path, monkeypatch, make_ckpt, caplog):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(make_ckpt("qwen2"), tmp_path / REPO)
    model = EngineArgs(model=REPO).create_config().model
    assert model.path == Path(REPO)
    assert model.architecture == "Qwen2ForCausalLM"  # the cached hub model of that name is the Llama checkpoint
    # A revision cannot apply to a local directory: it is ignored, and the log says so.
    with caplog.at_level("WARNING", logger="engine.hub"):
        assert EngineArgs(model=REPO, revision="v2").create_config().model.path == Path(REPO)
    assert "revision 'v2' ignored" in caplog.text


@pytest.mark.parametrize("missing", ["./nope", "/abs/missing/model", "nope", "a/b/c"])
def test_missing_local_path_keeps_the_does_not_exist_error(missing):
    with pytest.raises(ModelLoadError, match=f"model directory '{missing}' does not exist"):
        EngineArgs(model=missing).create_config()


# Runs in a fresh interpreter, so that huggingface_hub reads the environment at import as it does for a user.
_RESOLVE = """
import json, sys
from engine.errors import ModelLoadError
from engine.hub import resolve_model
for repo_id in sys.argv[1:]:
    try:
        print(json.dumps(str(resolve_model(repo_id))))
    except ModelLoadError as e:
        print(json.dumps("ModelLoadError: " + str(e)))
"""


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


@pytest.mark.parametrize("setup", ["HF_HOME, offline", "HF_HUB_CACHE, Hub unreachable"])
def test_huggingface_environment_variables_are_honoured(hub, setup):
    # None of the caller's own Hugging Face settings (a token, another cache, offline mode) may leak in, nor a proxy,
    # which would turn the closed local endpoint into a proxy error.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and not k.lower().endswith("_proxy")}
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if setup == "HF_HOME, offline":
        env |= {"HF_HOME": str(hub.home), "HF_HUB_OFFLINE": "1"}
        reason = "HF_HUB_OFFLINE is set"
    else:
        env |= {"HF_HUB_CACHE": str(hub.cache), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
        reason = "the Hub could not be reached"
    proc = subprocess.run([sys.executable, "-c", _RESOLVE, REPO, NOT_CACHED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved, missing = (json.loads(line) for line in proc.stdout.splitlines())
    assert resolved == str(hub.snapshots["main"])
    assert missing.startswith("ModelLoadError: ") and f"'{NOT_CACHED}'" in missing
    assert str(hub.cache) in missing and reason in missing
