"""Chat messages to prompt text with a model's Jinja chat template.

The Jinja environment matches the one Hugging Face transformers renders templates with (sandboxed, trim_blocks,
lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII, `raise_exception`, `strftime_now`, the
`{% generation %}` tag), so a prompt rendered here is the prompt the model was trained and evaluated with.
Templates come from untrusted model repositories and requests, so every failure is reported as a ValidationError.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import ValidationError

ROLES = ("system", "user", "assistant", "tool", "developer")

# Older names for a message's reasoning; templates read `reasoning_content` (Qwen3, DeepSeek) or `thinking` (gpt-oss).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(Exception):
    """The template called raise_exception(message): the conversation is one the model does not accept."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII, which would change the prompt the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    # Parsing a large template takes milliseconds; requests reuse a handful of templates.
    return _environment().from_string(template)


def normalize_messages(messages: Any) -> list[dict]:
    """Validate OpenAI-style chat messages and return copies shaped for a string-content chat template.

    A content list of text parts becomes one string joined with newlines; keys whose value is None are dropped
    (templates test for a key's presence, and would otherwise print "None").
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValidationError("messages must be a non-empty list of message objects", "messages")
    return [_normalize_message(i, message) for i, message in enumerate(messages)]


def _normalize_message(i: int, message: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ValidationError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}",
                              "messages")
    role = message.get("role")
    if role not in ROLES:
        raise ValidationError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", "messages")
    out = {key: value for key, value in message.items() if value is not None}
    content = out.get("content")
    if content is None:
        if not (role == "assistant" and out.get("tool_calls")):
            raise ValidationError(
                f"{where}.content is required (only an assistant message with tool_calls may omit it)", "messages"
            )
    elif isinstance(content, list):
        out["content"] = "\n".join(_part_text(f"{where}.content[{j}]", part) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise ValidationError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
                              "messages")
    if "tool_calls" in out and not isinstance(out["tool_calls"], list):
        raise ValidationError(f"{where}.tool_calls must be a list", "messages")
    reasoning = next((out[key] for key in _REASONING_KEYS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _part_text(where: str, part: Any) -> str:
    if not isinstance(part, dict):
        raise ValidationError(f"{where} must be a content part object, got {type(part).__name__}", "messages")
    kind = part.get("type")
    if kind != "text":
        raise ValidationError(f"{where} has type {kind!r}; this model accepts only 'text' content parts", "messages")
    text = part.get("text")
    if not isinstance(text, str):
        raise ValidationError(f"{where} is a text part without a string 'text'", "messages")
    return text


def load_chat_template_arg(value: str) -> str:
    """The template of `--chat-template FILE|TEMPLATE` (vLLM's rule): a file that exists is read; otherwise a value
    with Jinja's `{` or a line break is the template itself; anything else was meant as a file that is not there.
    A template that is not valid Jinja is refused here, at startup, rather than on every chat request."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationError(f"chat template file {value!r} cannot be read as UTF-8 text: {e}",
                                  "chat_template") from e
    elif any(c in value for c in "{}\n"):
        template = value
    else:
        raise ValidationError(f"chat template {value!r} is not a file that exists, nor a Jinja template (one "
                              "holds {{ ... }} or {% ... %}); give the path of a .jinja file or the template itself",
                              "chat_template")
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValidationError(f"chat template {value!r:.80} is not valid Jinja (line {e.lineno}): {e.message}",
                              "chat_template") from e
    return template


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    tools: list[dict] | None,
    special_tokens: dict[str, str],
    template_kwargs: dict[str, Any],
) -> str:
    """Render already-normalized messages. special_tokens (bos_token, eos_token, ...) are visible to the template;
    template_kwargs override them, as in transformers."""
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValidationError("tools must be a list of tool objects", "tools")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        message = f"chat template is not valid Jinja (line {e.lineno}): {e.message}"
        raise ValidationError(message, "chat_template") from e
    variables = {
        "documents": None,
        **special_tokens,
        **template_kwargs,
        "messages": messages,
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return compiled.render(**variables)
    except _TemplateRaised as e:
        raise ValidationError(str(e), "messages") from e
    except jinja2.TemplateError as e:
        raise ValidationError(f"chat template failed to render: {e}", "messages") from e
    except Exception as e:  # noqa: BLE001 - a template is untrusted code; any error it hits is a bad request
        raise ValidationError(f"chat template failed to render: {type(e).__name__}: {e}", "messages") from e
