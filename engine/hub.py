"""`--model ORG/NAME`: a Hugging Face Hub model id, resolved to a snapshot directory in huggingface_hub's cache.

A path that exists always wins, as in vLLM and transformers; an ORG/NAME that is not a path is a hub id. The cache,
offline mode, token and endpoint are huggingface_hub's own (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN,
HF_ENDPOINT): nothing here invents another knob. Only the files the engine reads are downloaded, and only where the
network allows; offline, or when the Hub cannot be reached, a model already in the cache still loads.

huggingface_hub is imported inside the functions, so serving a local directory never pays for the import. The code
sticks to what huggingface_hub 0.23 through 2.x all provide: `snapshot_download(repo_id, revision=, cache_dir=,
local_files_only=, allow_patterns=, ignore_patterns=)`, the errors re-exported by `huggingface_hub.utils`, and
`huggingface_hub.constants`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import read_json
from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

# Every file besides the weights that engine.config, engine.tokenizer and engine.llm_engine read from a model
# directory, plus the index that says which weight files there are.
_METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_templates/*.jinja",
)


def resolve_model(model: str | Path, revision: str | None = None, load_format: str = "auto") -> Path:
    """The directory to load `model` from: the path itself when it exists, else the snapshot of hub id `model` at
    `revision` (None: "main"), fetched into the cache where the network allows. load_format "dummy" fetches no
    weights, since it builds random ones from config.json."""
    path = Path(model)
    if path.exists():
        if revision is not None:
            logger.warning("revision %r ignored: %s is a local path, not a Hugging Face Hub id", revision, path)
        return path
    if not _is_hub_id(str(model)):
        raise ModelLoadError(
            f"model directory {str(model)!r} does not exist or is not a directory "
            "(nor is it a Hugging Face Hub model id, which has the form ORG/NAME)"
        )
    return _snapshot(str(model), revision, load_format)


def _is_hub_id(name: str) -> bool:
    """ORG/NAME with the characters the Hub allows. A bare NAME (a few legacy models) is not taken as one: it is far
    more often a mistyped local directory, and the hub's own ids for those models have an ORG."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _snapshot(repo_id: str, revision: str | None, load_format: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Read when called rather than left to snapshot_download's defaults: huggingface_hub 0.23 bound the cache
    # directory at import, and its offline check lives in a cached HTTP session; passing both explicitly makes every
    # version honour the same values, and keeps offline mode from opening any connection at all.
    cache_dir = constants.HF_HUB_CACHE
    offline = constants.HF_HUB_OFFLINE
    shown_revision = revision or "main"

    def fetch(rev: str | None, allow: list[str], ignore: list[str] | None = None) -> Path:
        return Path(snapshot_download(repo_id, revision=rev, cache_dir=cache_dir, local_files_only=offline,
                                      allow_patterns=allow, ignore_patterns=ignore))

    try:
        snapshot = fetch(revision, list(_METADATA_FILES))
        if not (snapshot / "config.json").is_file():
            # Checked before the weights are fetched: a GGUF or other non-transformers repo would download for nothing.
            raise ModelLoadError(
                f"Hugging Face Hub model {repo_id!r} (revision {shown_revision!r}) has no config.json in {snapshot}: "
                "it is not a transformers checkpoint this engine can load"
            )
        # Asking again only for weights not yet in the snapshot spares a cached model a second round of Hub calls,
        # which when the Hub is unreachable means retries with backoff, tens of seconds for nothing.
        missing = None if load_format == "dummy" else _missing_weights(snapshot)
        if missing:
            # Pinned to the commit the first call resolved, so that a branch moving in between cannot mix revisions.
            fetch(snapshot.name, *missing)
    except LocalEntryNotFoundError as exc:
        # Checked first: in huggingface_hub 0.x this error is also an HfHubHTTPError.
        cause = exc.__cause__
        why = ("HF_HUB_OFFLINE is set" if offline
               else f"the Hub could not be reached: {type(cause).__name__}: {cause}" if cause else str(exc))
        revision_flag = f" --revision {revision}" if revision else ""
        raise ModelLoadError(
            f"model {repo_id!r} is not a local directory, and revision {shown_revision!r} of the Hugging Face Hub "
            f"model {repo_id!r} is not (completely) in the cache {cache_dir} ({why}). Download it where the network "
            f"allows (start once with network access, or run `{_cli('download')} {repo_id}{revision_flag}`), "
            "point HF_HOME or HF_HUB_CACHE at a cache that holds it, or pass a local model directory."
        ) from None
    except GatedRepoError:
        raise ModelLoadError(
            f"Hugging Face Hub model {repo_id!r} is gated: accept its terms on the Hub, then log in "
            f"(`{_cli('login')}`) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local directory nor a model on the Hugging Face Hub "
            f"(if it is private, log in with `{_cli('login')}` or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"Hugging Face Hub model {repo_id!r} has no revision {shown_revision!r}") from None
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"downloading Hugging Face Hub model {repo_id!r} failed: {exc}") from exc
    return snapshot


def _missing_weights(snapshot: Path) -> tuple[list[str], list[str] | None] | None:
    """allow_patterns and ignore_patterns for the weight files engine.models.loader.checkpoint_files will read, or
    None when the snapshot holds them already (huggingface_hub links a file into a snapshot only once it is whole)."""
    weight_map = read_json(snapshot / "model.safetensors.index.json").get("weight_map")
    if isinstance(weight_map, dict) and weight_map:
        # Only the shards the index names: repos such as Mistral's also hold a consolidated copy of every weight.
        files = sorted({str(f) for f in weight_map.values()})
        return None if all((snapshot / f).is_file() for f in files) else (files, None)
    if any(snapshot.glob("*.safetensors")):
        return None
    # No index: the loader reads the top-level *.safetensors. In these patterns "*" also matches "/", hence the ignore.
    return ["*.safetensors"], ["*/*"]


def _cli(action: str) -> str:
    """How the installed huggingface_hub's command line spells `action` ("download" or "login"): `hf download` and
    `hf auth login` from 0.34 on; before that only `huggingface-cli download` and `huggingface-cli login`, a name
    that is gone from 2.0."""
    from huggingface_hub import __version__

    major, minor = (int(part) for part in __version__.split(".")[:2])
    if (major, minor) >= (0, 34):
        return "hf auth login" if action == "login" else f"hf {action}"
    return f"huggingface-cli {action}"
