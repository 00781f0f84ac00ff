"""The tokenizer of a Hugging Face model directory, read the way transformers 5 reads it.

Token ids must be exactly the ones `AutoTokenizer.from_pretrained(dir)` produces, since the model was trained on
them. transformers 5 builds its fast tokenizer from tokenizer.json, then registers every special token named in
tokenizer_config.json (or special_tokens_map.json) that tokenizer.json does not already hold as an added token, and
lets tokenizer.json's post-processor alone decide about BOS/EOS (`add_bos_token`/`add_eos_token` are ignored when
tokenizer.json exists). This module does the same with the `tokenizers` library directly.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from engine.chat_template import normalize_messages, render_chat_template
from engine.config import read_json
from engine.errors import ModelLoadError, ValidationError
from engine.token_bound import max_chars_per_token, min_tokens

# The named special tokens transformers knows; their strings are also visible to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")
# transformers stores int(1e30) as model_max_length when a tokenizer has no limit of its own.
_NO_LIMIT = 10**20
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


class Tokenizer:
    """Encode/decode and chat-template rendering for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_templates: dict[str, str] | None = None,
        generation_eos_ids: Iterable[int] = (),
        model_max_length: int | None = None,
        tokenizer_class: str = "PreTrainedTokenizerFast",
    ):
        """`backend` must already hold every token named in `special_tokens` (name -> token string, e.g.
        {"eos_token": "</s>"}). `chat_templates` maps template names to Jinja source; "default" is the main one."""
        # A serving engine never wants tokenizer.json's padding/truncation applied to a prompt behind its back.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._special_tokens = {name: tok for name, tok in (special_tokens or {}).items() if tok is not None}
        self._chat_templates = dict(chat_templates or {})
        self._model_max_length = model_max_length
        self.tokenizer_class = tokenizer_class  # tokenizer_config.json's, as transformers would name it
        vocab = backend.get_vocab(with_added_tokens=True)
        # Ids index embedding rows, so the bound that matters is the largest id, not the count of entries.
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        eos = {self._token_id(self._special_tokens.get("eos_token"))} | set(generation_eos_ids)
        self._eos_ids = frozenset(i for i in eos if i is not None)
        self._token_texts: dict[int, str] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json (required) plus tokenizer_config.json, chat_template.jinja, chat_templates/*.jinja,
        special_tokens_map.json and generation_config.json when present."""
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{tokenizer_file} not found: a fast tokenizer.json is required "
                "(slow-only tokenizers such as a bare tokenizer.model are not supported)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # noqa: BLE001 - the Rust loader raises a bare Exception for any parse error
            raise ModelLoadError(f"{tokenizer_file} is not a valid tokenizer.json: {e}") from e

        config = read_json(model_dir / "tokenizer_config.json")
        named: dict[str, Any] = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
        extra = [tok for key in _EXTRA_SPECIAL_KEYS for tok in _as_token_list(config.get(key))]
        # transformers consults special_tokens_map.json only for configs that predate added_tokens_decoder.
        if "added_tokens_decoder" not in config:
            token_map = read_json(model_dir / "special_tokens_map.json")
            named.update({name: value for name, value in token_map.items() if name in SPECIAL_TOKEN_NAMES})
            extra += [tok for key in _EXTRA_SPECIAL_KEYS for tok in _as_token_list(token_map.get(key))]
        if named["pad_token"] is None and "pad_token" not in config and backend.padding:
            named["pad_token"] = backend.padding["pad_token"]

        declared = _added_tokens_decoder(config, model_dir / "tokenizer_config.json")
        _register_tokens(backend, declared, named, extra)
        generation = read_json(model_dir / "generation_config.json")
        return cls(
            backend,
            special_tokens={name: _token_content(value) for name, value in named.items()},
            chat_templates=_load_chat_templates(model_dir, config),
            generation_eos_ids=_eos_ids(generation, model_dir / "generation_config.json"),
            model_max_length=_max_length(config.get("model_max_length")),
            tokenizer_class=str(config.get("tokenizer_class") or "PreTrainedTokenizerFast"),
        )

    # ----- encoding and decoding -----

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None,
               what: str = "the prompt") -> list[int]:
        """Token ids of text. With max_tokens, a text that certainly encodes to more tokens is refused before it is
        tokenized (a ValidationError on "prompt" that calls the text `what`), in time proportional to the limit's
        worth of text rather than to the text (engine/token_bound.py)."""
        if max_tokens is not None and len(text) > max_tokens:
            at_least = min_tokens(self._backend, self._chars_per_token, text)
            if at_least > max_tokens:
                raise ValidationError(
                    f"{what} is too long: its {len(text)} characters make at least {at_least} tokens, and this "
                    f"model's maximum context length is {max_tokens} tokens", "prompt")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def _chars_per_token(self) -> int | None:
        """engine/token_bound.py's bound for this tokenizer, read from the vocabulary on the first long text."""
        return max_chars_per_token(self._backend)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """Raw vocabulary strings (e.g. "Ġthe", "▁the", "<0xE4>"); None for an id the vocabulary lacks."""
        return [self._backend.id_to_token(i) for i in ids]

    def token_text(self, token_id: int) -> str:
        """The text one token adds in the middle of a sequence (for logprobs): " the" for "▁the" even though
        decoding it alone strips the space. A token holding part of a UTF-8 character gives U+FFFD."""
        text = self._token_texts.get(token_id)
        if text is None:
            # Decoding the token twice and removing the first copy leaves the second one, which is not first in
            # its sequence: decoders that strip a leading space or a "##" only do so for the first token.
            once = self._backend.decode([token_id], skip_special_tokens=False)
            twice = self._backend.decode([token_id, token_id], skip_special_tokens=False)
            text = twice[len(once):] if twice.startswith(once) else once
            self._token_texts[token_id] = text
        return text

    # ----- properties -----

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Largest token id + 1, added tokens included."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self._special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self._special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self._special_tokens.get("pad_token"))

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokenizer's eos plus generation_config.json's eos_token_id(s): each of them ends a sequence."""
        return self._eos_ids

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens, i.e. exactly the tokens decode(skip_special_tokens=True) drops."""
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens that are set, e.g. {"bos_token": "<s>", "eos_token": "</s>"}."""
        return dict(self._special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get("default")

    @property
    def model_max_length(self) -> int | None:
        """tokenizer_config.json's model_max_length; None when the tokenizer sets no limit."""
        return self._model_max_length

    # ----- chat -----

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render messages into a prompt string. `chat_template` is either Jinja source or the name of one of the
        model's templates; by default the model's "tool_use" template is used when tools are given and it has one,
        else its default template. Raises ValidationError for bad messages or a template that fails to render."""
        template = self._select_template(chat_template, tools)
        return render_chat_template(
            template,
            normalize_messages(messages),
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self._special_tokens,
            template_kwargs=template_kwargs,
        )

    def encode_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt token ids for a chat. The template writes any BOS itself, so no special tokens are added."""
        prompt = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, chat_template=chat_template,
            **template_kwargs,
        )
        return self.encode(prompt, add_special_tokens=False)

    def override_chat_template(self, template: str) -> None:
        """--chat-template: `template` replaces the model's own for every conversation, with tools or without (as in
        vLLM); the model's other named templates stay selectable by name."""
        self._chat_templates.pop("tool_use", None)
        self._chat_templates["default"] = template

    def _select_template(self, chat_template: str | None, tools: list[dict] | None) -> str:
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        raise ValidationError(
            "this model has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja), "
            "so chat messages cannot be turned into a prompt; send a plain prompt to the completions API instead",
            "messages",
        )

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{path} is not UTF-8 text: {e}") from e


def _as_token_list(value: Any) -> list[Any]:
    # extra_special_tokens is a list in most configs, but a {name: token} dict for multimodal models.
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list) else []


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: Any, *, force_special: bool) -> AddedToken | None:
    """An AddedToken from a config entry: a bare string, or a dict with content and flags. Named and extra special
    tokens are special whatever their flags say; added_tokens_decoder entries keep their own flag."""
    content = _token_content(value)
    if content is None:
        return None
    flags = {k: value[k] for k in _ADDED_TOKEN_FLAGS if isinstance(value, dict) and k in value}
    if force_special:
        flags["special"] = True
    flags.setdefault("special", False)
    flags.setdefault("normalized", not flags["special"])
    return AddedToken(content, **flags)


def _added_tokens_decoder(config: dict, path: Path) -> list[AddedToken]:
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise ModelLoadError(f"{path}: added_tokens_decoder must map token ids to tokens")
    try:
        ordered = sorted(entries.items(), key=lambda kv: int(kv[0]))
    except ValueError as e:
        raise ModelLoadError(f"{path}: added_tokens_decoder keys must be token ids: {e}") from e
    return [tok for _, value in ordered if (tok := _added_token(value, force_special=False)) is not None]


def _register_tokens(backend: tokenizers.Tokenizer, declared: list[AddedToken], named: dict[str, Any],
                     extra: list[Any]) -> None:
    """Add the tokens the configs declare but tokenizer.json lacks as added tokens, in transformers' order:
    added_tokens_decoder entries first, then the named special tokens, then the extra special tokens."""
    present = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    missing: list[AddedToken] = []
    candidates = declared + [_added_token(v, force_special=True) for v in list(named.values()) + extra]
    for token in candidates:
        if token is not None and token.content not in present:
            present.add(token.content)
            missing.append(token)
    if missing:
        backend.add_tokens(missing)


def _load_chat_templates(model_dir: Path, config: dict) -> dict[str, str]:
    # Template files (what transformers >= 4.50 saves) replace any template in tokenizer_config.json.
    templates: dict[str, str] = {}
    default_file = model_dir / "chat_template.jinja"
    if default_file.is_file():
        templates["default"] = _read_text(default_file)
    extra_dir = model_dir / "chat_templates"
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}


def _eos_ids(generation: dict, path: Path) -> list[int]:
    value = generation.get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelLoadError(f"{path}: eos_token_id must be a token id or a list of token ids, got {value!r}")
    return ids


def _max_length(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or value >= _NO_LIMIT:
        return None
    return int(value)
