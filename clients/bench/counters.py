"""Token counters (datasets.TokenCounter): the target server's /tokenize and /detokenize, or a local tokenizer.

`--tokenizer PATH` counts without the server, so it must count as the server does. The server's engine reads a
Hugging Face tokenizer directory the way transformers 5 does (engine/tokenizer.py); LocalTokenizer repeats the
part of that which decides a count, with the `tokenizers` library and jinja2 only, so that a load generator pulls
in neither the engine nor torch:
- tokenizer.json, padding and truncation off; BOS/EOS are added by its own post-processor alone;
- the special tokens tokenizer_config.json (or special_tokens_map.json) names but tokenizer.json lacks, added
  as transformers adds them (a template that writes them must get one id for each, as on the server);
- the chat template (chat_template.jinja, else tokenizer_config.json's) rendered in Hugging Face's sandboxed
  Jinja environment with the special tokens as variables, then encoded without special tokens.
A count that still differs shows in the results as a record whose prompt_len is not its expected_prompt_len.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from clients.bench import BenchError

# The named special tokens transformers knows; chat templates see them as variables.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class ServerTokenizer:
    """Counts with the target's /tokenize and /detokenize (an httpx.AsyncClient on its base URL)."""

    def __init__(self, client: Any, model: str):
        self.client = client
        self.model = model

    async def _post(self, route: str, body: dict) -> dict:
        import httpx

        try:
            response = await self.client.post(route, json={"model": self.model, **body})
        except httpx.HTTPError as exc:
            raise BenchError(f"POST {route} failed: {exc!r}") from None
        if response.status_code != 200:
            # 404 is also how a server answers an unknown model, so the server's own message is shown first.
            hint = "; a server without this route needs --tokenizer PATH" if response.status_code in (404, 405) else ""
            raise BenchError(f"POST {route} answered {response.status_code}: {response.text[:300]}{hint}")
        return response.json()

    async def encode(self, text: str) -> list[int]:
        return (await self._post("/tokenize", {"prompt": text, "add_special_tokens": False}))["tokens"]

    async def decode(self, ids: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": ids}))["prompt"]

    async def count_prompt(self, text: str) -> int:
        return (await self._post("/tokenize", {"prompt": text, "add_special_tokens": True}))["count"]

    async def count_chat(self, messages: list[dict]) -> int:
        return (await self._post("/tokenize", {"messages": messages, "add_generation_prompt": True}))["count"]


class LocalTokenizer:
    """Counts with a local tokenizer.json, or a model directory (which also gives the chat template)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise BenchError(f"--tokenizer {path}: " + ("no tokenizer.json in it (a fast tokenizer.json is required)"
                                                        if path.is_dir() else
                                                        "no such file or directory (give a tokenizer.json or a "
                                                        "model dir)"))
        try:
            self._backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - the Rust loader raises a bare Exception
            raise BenchError(f"--tokenizer {file} is not a valid tokenizer.json: {exc}") from None
        self._is_dir = path.is_dir()
        self._special_tokens: dict[str, str] = {}
        self._template_source: str | None = None
        self._template: jinja2.Template | None = None  # compiled on the first chat count
        if self._is_dir:
            try:
                self._special_tokens, self._template_source = _read_tokenizer_dir(path, self._backend)
            except (OSError, ValueError) as exc:
                raise BenchError(f"--tokenizer {path}: {exc}") from None
        # The server never pads or truncates a prompt, whatever tokenizer.json asks for.
        self._backend.no_padding()
        self._backend.no_truncation()

    async def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    async def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)

    async def count_prompt(self, text: str) -> int:
        return len(self._backend.encode(text, add_special_tokens=True).ids)

    async def count_chat(self, messages: list[dict]) -> int:
        if not self._is_dir:
            raise BenchError("--endpoint chat with --tokenizer needs a model directory (for its chat template), "
                             "not a bare tokenizer.json")
        if self._template_source is None:
            raise BenchError("--endpoint chat: the --tokenizer directory has no chat template (chat_template.jinja "
                             "or tokenizer_config.json's chat_template), so chat prompts cannot be counted")
        try:
            if self._template is None:
                self._template = _environment().from_string(self._template_source)
            text = self._template.render(documents=None, **self._special_tokens, messages=messages, tools=None,
                                         add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template is code from the model repository; its error says why
            raise BenchError(f"--tokenizer: rendering the chat template failed: {exc}") from None
        # The template writes any BOS itself.
        return len(self._backend.encode(text, add_special_tokens=False).ids)


# ----- a Hugging Face tokenizer directory, as transformers 5 (and so the server) reads it -----


def _read_tokenizer_dir(path: Path, backend: tokenizers.Tokenizer) -> tuple[dict[str, str], str | None]:
    """(named special tokens that are set, the default chat template). Adds to `backend` the tokens the configs
    declare and tokenizer.json lacks."""
    config = _read_json(path / "tokenizer_config.json")
    named: dict[str, Any] = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    extra = [tok for key in _EXTRA_SPECIAL_KEYS for tok in _token_list(config.get(key))]
    # transformers consults special_tokens_map.json only for configs that predate added_tokens_decoder.
    if "added_tokens_decoder" not in config:
        token_map = _read_json(path / "special_tokens_map.json")
        named.update({name: value for name, value in token_map.items() if name in SPECIAL_TOKEN_NAMES})
        extra += [tok for key in _EXTRA_SPECIAL_KEYS for tok in _token_list(token_map.get(key))]
    if named["pad_token"] is None and "pad_token" not in config and backend.padding:
        named["pad_token"] = backend.padding["pad_token"]
    declared = sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0]))
    # transformers' order: added_tokens_decoder entries (their own special flag), then the named and the extra
    # special tokens (special whatever their flags say).
    candidates = [_added_token(value, force_special=False) for _, value in declared]
    candidates += [_added_token(value, force_special=True) for value in [*named.values(), *extra]]
    present = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    missing = []
    for token in candidates:
        if token is not None and token.content not in present:
            present.add(token.content)
            missing.append(token)
    if missing:
        backend.add_tokens(missing)
    special = {name: content for name, value in named.items() if (content := _token_content(value)) is not None}
    return special, _default_chat_template(path, config)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return data


def _token_list(value: Any) -> list[Any]:
    # extra_special_tokens is a list in most configs, but a {name: token} dict for multimodal models.
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list) else []


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: Any, *, force_special: bool) -> tokenizers.AddedToken | None:
    content = _token_content(value)
    if content is None:
        return None
    flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if isinstance(value, dict) and k in value}
    if force_special:
        flags["special"] = True
    flags.setdefault("special", False)
    flags.setdefault("normalized", not flags["special"])
    return tokenizers.AddedToken(content, **flags)


def _default_chat_template(path: Path, config: dict) -> str | None:
    # Template files (what transformers >= 4.50 saves) replace every template in tokenizer_config.json: the default
    # is chat_template.jinja, or chat_templates/default.jinja, which is read after it and so wins.
    files = [path / "chat_templates" / "default.jinja", path / "chat_template.jinja"]
    if files[1].is_file() or any((path / "chat_templates").glob("*.jinja")):
        default = next((f for f in files if f.is_file()), None)
        return None if default is None else default.read_text(encoding="utf-8")
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
        return named.get("default")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (the server's too)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
