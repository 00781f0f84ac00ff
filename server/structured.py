"""Which constraint a request puts on its output, and how its tool calls are read back.

The API has several ways to ask for structured output: OpenAI's response_format, vLLM's structured_outputs and its
older guided_* fields, and (chat) a tool_choice of "required" or a named function, which forces the output to be
tool-call JSON. A request may use one of them; each becomes one StructuredOutputsParams (the engine compiles and
enforces it, engine/structured_output.py), and errors name the field the constraint came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import ValidationError
from engine.sampling_params import StructuredOutputsParams
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ConstrainedFields
from server.tool_parsers import REQUIRED_PARSER, ToolParser, get_tool_parser

_GUIDED = ("json", "regex", "choice", "grammar")
# JSON with nothing between its tokens (vLLM's disable_any_whitespace): whitespace that can only be empty.
NO_WHITESPACE = " {0}"


@dataclass(frozen=True)
class Constraint:
    params: StructuredOutputsParams
    field: str  # the request field it came from, for errors


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's tools shape its output: "none" (plain text), "auto" (the model decides; `parser` reads
    its calls), "required" (a JSON array of calls, forced), or "named" (the arguments of `name`, forced)."""

    mode: str
    name: str | None = None
    parser: ToolParser | None = None


def tool_plan(req: ChatCompletionRequest, auto_parser: str | None) -> ToolPlan:
    """What tool_choice asks for, checked against tools and the server's flags (vLLM's rules: tool_choice defaults
    to auto when tools are given, and auto needs --enable-auto-tool-choice with a --tool-call-parser)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: name the functions the model may call in tools",
                           "tool_choice")
        return ToolPlan("none")
    choice = "auto" if choice is None else choice
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        if auto_parser is None:
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                                'set; or set tool_choice to "none", "required" or a named function', "tool_choice")
        return ToolPlan("auto", parser=get_tool_parser(auto_parser))
    if choice == "required":
        return ToolPlan("required", parser=REQUIRED_PARSER)
    names = [tool.function.name for tool in req.tools]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                            f"({', '.join(map(repr, names))})", "tool_choice")
    return ToolPlan("named", name=choice.function.name)


def constraint(req: ConstrainedFields, tools: ToolPlan | None = None) -> Constraint | None:
    """The request's one output constraint, or None. Two at once (say response_format and guided_json) is a 400."""
    found: list[Constraint] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(_make("response_format", json_object=True))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema (a JSON schema)",
                           "response_format")
        found.append(_make("response_format", json=fmt.json_schema.schema_))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        whitespace = "" if so.disable_any_whitespace else so.whitespace_pattern
        found.append(_make("structured_outputs", json=so.json_, regex=so.regex, choice=so.choice,
                           grammar=so.grammar, json_object=so.json_object, whitespace_pattern=whitespace or None,
                           no_whitespace=so.disable_any_whitespace))
    for kind in _GUIDED:
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append(_make(f"guided_{kind}", whitespace_pattern=req.guided_whitespace_pattern, **{kind: value}))
    if tools is not None and tools.mode in ("required", "named"):
        found.append(_make("tools", json=_tool_schema(req, tools)))
    if len(found) > 1:
        raise APIError(400, f"only one structured-output constraint may be given, got {found[0].field} and "
                            f"{found[1].field}", found[1].field)
    return found[0] if found else None


def _make(field: str, no_whitespace: bool = False, **kwargs: Any) -> Constraint:
    if no_whitespace:
        kwargs["whitespace_pattern"] = NO_WHITESPACE
    try:
        return Constraint(StructuredOutputsParams(**{k: v for k, v in kwargs.items() if v is not None}), field)
    except ValidationError as exc:
        raise ValidationError(exc.message, field) from None


def _tool_schema(req: ChatCompletionRequest, plan: ToolPlan) -> dict:
    """The JSON the output must be: the named function's arguments, or (required) an array of calls
    [{"name": ..., "parameters": {...}}], one call at most unless parallel_tool_calls."""
    def parameters(tool) -> dict:
        return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}

    if plan.mode == "named":
        return parameters(next(t for t in req.tools if t.function.name == plan.name))
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in req.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def blame(exc: ValidationError, found: Constraint | None) -> ValidationError:
    """A compile error of the constraint (the engine calls the field structured_outputs), renamed to the request
    field the constraint came from."""
    if found is not None and exc.param == "structured_outputs" and found.field != "structured_outputs":
        return ValidationError(exc.message, found.field)
    return exc
