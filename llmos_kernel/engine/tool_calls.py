"""OpenAI-style tool calls and response formats for models whose chat template knows no tools.

The tools are described in the system message and the model answers as SmolLM2-Instruct was
tuned to (a Hermes-style block holding a JSON list of calls)::

    <tool_call>[
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]</tool_call>

Under ``tool_choice`` "required" (or a named tool) a grammar makes that the whole output, with
arguments that validate against the tool's schema; under "auto" the model may write plain text
instead, but once it opens a ``<tool_call>`` the rest is forced to be a valid call. Past calls
and their results go back into the conversation in the same form, as user and assistant turns.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmos_kernel.engine.grammar import JSON_STYLE, Grammar, GrammarCompiler
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.tool_specs import ToolSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
TOOL_CHOICES = ("none", "auto", "required")

_JSON = json.JSONDecoder()
_SCHEMA_DEFS = ("$defs", "definitions")  # where "#/..." references point inside parameters
_SCHEMA_VALUES = frozenset({"enum", "const", "default", "examples"})  # data, not subschemas
_STRING_BOUNDS = frozenset({"maxLength", "enum", "const", "pattern", "format"})

Tool = ToolSpec | dict[str, Any]
ToolChoice = str | dict[str, Any]


@dataclass
class ToolCall:
    """One call the model made: which tool, with which arguments."""

    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The entry of an OpenAI assistant message's ``tool_calls`` (arguments as a string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}

    @classmethod
    def from_openai(cls, entry: Any) -> ToolCall:
        """Read a ``tool_calls`` entry of an OpenAI assistant message."""
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidArgument(
                "a tool call must look like {'id': ..., 'type': 'function', "
                f"'function': {{'name': ..., 'arguments': '{{...}}'}}}}, got {entry!r}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise InvalidArgument(
                    f"tool call {function['name']!r}: arguments are not JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise InvalidArgument(
                f"tool call {function['name']!r}: arguments must be a JSON object")
        return cls(str(entry.get("id") or _new_call_id()), function["name"], arguments)


# --- tools and tool_choice --------------------------------------------------------------------


def tool_spec(tool: Tool) -> ToolSpec:
    """A ToolSpec from a spec, an OpenAI ``{"type": "function", "function": {...}}`` entry, or
    its bare ``{"name", "description", "parameters"}``."""
    if isinstance(tool, ToolSpec):
        return tool
    if not isinstance(tool, dict):
        raise InvalidArgument(f"a tool must be a ToolSpec or an OpenAI tool dict, got {tool!r}")
    function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or "name" not in function:
        raise InvalidArgument(
            f"a tool dict must be {{'type': 'function', 'function': {{'name': ..., "
            f"'description': ..., 'parameters': {{...}}}}}}, got {tool!r}")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return ToolSpec(function["name"], str(function.get("description") or ""), parameters)


def resolve_tool_choice(tools: Sequence[Tool], tool_choice: ToolChoice) -> tuple[str, list[ToolSpec]]:
    """The mode ("none", "auto" or "required") and the tools the model may call under it."""
    specs = [tool_spec(t) for t in tools or ()]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"tool names must be unique, got {names}")
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(function, dict):
            raise InvalidArgument(
                "tool_choice must be 'none', 'auto', 'required', a tool name or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
        tool_choice = function.get("name")
    if not isinstance(tool_choice, str):
        raise InvalidArgument(f"tool_choice must be a string or a dict, got {tool_choice!r}")
    if tool_choice in TOOL_CHOICES:
        if tool_choice != "none" and not specs:
            raise InvalidArgument(f"tool_choice {tool_choice!r} needs at least one tool")
        return tool_choice, specs
    chosen = [s for s in specs if s.name == tool_choice]
    if not chosen:
        raise InvalidArgument(f"tool_choice names {tool_choice!r}, which is not among the "
                              f"tools given ({', '.join(names) or 'none'})")
    return "required", chosen


# --- the prompt -------------------------------------------------------------------------------


def render_tools_prompt(tools: Sequence[Tool], tool_choice: ToolChoice = "auto") -> str:
    """The system-prompt section that tells the model its tools and how to call them.

    It follows the function-calling format SmolLM2-Instruct was tuned on (tools as JSON inside
    ``<tools>``, calls as a JSON list inside ``<tool_call>``), which other models read too.
    """
    mode, specs = resolve_tool_choice(tools, tool_choice)
    if mode == "none":
        return ""
    listed = json.dumps([_described_tool(s) for s in specs], ensure_ascii=False)
    example = {"name": "function_name", "arguments": {"argument": "value"}}
    lines = [
        ("You can call functions. For the user's request, pick the function that fits it "
         "and take its arguments from the request."),
        f"You have access to the following tools:\n<tools>{listed}</tools>",
        "To call a function, reply with only this, using the right type for each argument:",
        _render_calls([example]),
    ]
    if mode == "auto":
        lines.append("If a function fits the request, call it; if none does, answer in plain text.")
    return "\n".join(lines)


def _described_tool(spec: ToolSpec) -> dict[str, Any]:
    parameters = {k: v for k, v in spec.parameters.items() if k != "additionalProperties"}
    return {"name": spec.name, "description": spec.description, "parameters": parameters}


def _render_calls(calls: list[dict[str, Any]]) -> str:
    body = ",\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
    return f"{CALL_OPEN}[\n{body}\n]{CALL_CLOSE}"


# --- grammars ---------------------------------------------------------------------------------


def tool_call_grammar(compiler: GrammarCompiler, tools: Sequence[Tool],
                      tool_choice: ToolChoice = "auto", parallel: bool = False,
                      max_string_length: int | None = None) -> Grammar | None:
    """The grammar of an answer under ``tool_choice``; None for "none" (no constraint).

    "required" or a tool name: a ``<tool_call>`` block of exactly one call (one or more with
    ``parallel``), nothing else. "auto": plain text without ``<tool_call>``, or text and a block.
    ``max_string_length`` bounds every string argument the schemas leave unbounded, so that a
    model rambling inside a string is made to close it and a call always fits a token budget.
    """
    mode, specs = resolve_tool_choice(tools, tool_choice)
    if mode == "none":
        return None
    if max_string_length is not None and (
            not isinstance(max_string_length, int) or max_string_length < 1):
        raise InvalidArgument(f"max_string_length must be a positive int, got {max_string_length!r}")
    opening = "TEXT | opening" if mode == "auto" else '"<tool_call>"'
    rules = [f'start: {opening} "[\\n" calls "\\n]</tool_call>"',
             'calls: call ("," "\\n" call)*' if parallel else "calls: call",
             "call: " + " | ".join(f"call_{i}" for i in range(len(specs)))]
    rules += [f"call_{i}: %json {json.dumps(_call_schema(s, max_string_length))}"
              for i, s in enumerate(specs)]
    if mode == "auto":
        rules += [r"TEXT: /(?s:.+)/ & ~/(?s:.*)<tool_call>(?s:.*)/",
                  r"opening[lazy]: /(?s:.*)<tool_call>/"]
    return compiler.lark("\n".join(rules))


def _call_schema(spec: ToolSpec, max_string_length: int | None) -> dict[str, Any]:
    """``{"name": <const>, "arguments": <parameters>}``, with the parameters' $defs at the root."""
    parameters = spec.parameters if max_string_length is None \
        else _bound_strings(spec.parameters, max_string_length)
    arguments = {k: v for k, v in parameters.items() if k not in _SCHEMA_DEFS}
    arguments.setdefault("additionalProperties", False)
    return {
        **{k: parameters[k] for k in _SCHEMA_DEFS if k in parameters},
        "type": "object",
        "properties": {"name": {"const": spec.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": JSON_STYLE,
    }


def _bound_strings(schema: Any, limit: int) -> Any:
    """``schema`` with ``maxLength: limit`` on every string schema that has no bound of its own."""
    if isinstance(schema, list):
        return [_bound_strings(s, limit) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _SCHEMA_VALUES else _bound_strings(v, limit) for k, v in schema.items()}
    kinds = out.get("type")
    if (kinds == "string" or isinstance(kinds, list) and "string" in kinds) \
            and not _STRING_BOUNDS & out.keys():
        out["maxLength"] = limit
    return out


def response_format_grammar(compiler: GrammarCompiler,
                            response_format: dict[str, Any] | None) -> Grammar | None:
    """The grammar of an OpenAI ``response_format``: text (None), json_object or json_schema."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return compiler.json_schema({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument("response_format json_schema needs "
                                  "{'json_schema': {'name': ..., 'schema': {...}}}")
        return compiler.json_schema(schema)
    raise InvalidArgument(f"response_format must have type 'text', 'json_object' or "
                          f"'json_schema', got {response_format!r}")


# --- reading the answer -----------------------------------------------------------------------


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The text outside ``<tool_call>`` blocks, and the calls; InvalidArgument if malformed.

    A block holds a JSON list of ``{"name": ..., "arguments": {...}}`` (or one such object).
    The JSON is read with a decoder, not cut at the next closing tag: a string argument may
    itself contain ``</tool_call>`` (the grammar allows any string), as sampling showed.
    """
    calls, outside, at = [], [], 0
    while (start := text.find(CALL_OPEN, at)) >= 0:
        outside.append(text[at:start])
        body = _skip_space(text, start + len(CALL_OPEN))
        try:
            block, end = _JSON.raw_decode(text, body)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"a tool call is not valid JSON ({e}): "
                                  f"{text[start:start + 400]!r}") from None
        close = _skip_space(text, end)
        if not text.startswith(CALL_CLOSE, close):
            raise InvalidArgument(f"a tool call's JSON is not followed by {CALL_CLOSE}: "
                                  f"{text[start:start + 400]!r}")
        for call in block if isinstance(block, list) else [block]:
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and isinstance(call.get("arguments"), dict)):
                raise InvalidArgument(f'a tool call must be {{"name": "<tool>", "arguments": '
                                      f"{{...}}}}, got {json.dumps(call)}")
            calls.append(ToolCall(_new_call_id(), call["name"], call["arguments"]))
        at = close + len(CALL_CLOSE)
    outside.append(text[at:])
    content = "".join(outside)
    if CALL_CLOSE in content:
        raise InvalidArgument(f"unbalanced {CALL_CLOSE} in the model's answer: {text!r}")
    return content.strip(), calls


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# --- the conversation -------------------------------------------------------------------------


def messages_with_tools(messages: list[dict[str, Any]], tools: Sequence[Tool] = (),
                        tool_choice: ToolChoice = "auto") -> list[dict[str, str]]:
    """An OpenAI conversation with tools, as plain role/content messages for a ChatML template.

    The tools section leads the system message (one is added if there is none); an assistant's
    ``tool_calls`` become a ``<tool_call>`` block after its content; each run of ``tool`` results
    becomes one user message of ``<tool_response>`` blocks, in the order of the calls.
    """
    if not isinstance(messages, list):
        raise InvalidArgument("messages must be a list of {'role', 'content'} dicts")
    prompt = render_tools_prompt(tools, tool_choice) if tools else ""
    out: list[dict[str, str]] = []
    called: set[str] = set()  # tool_call ids the results may answer
    previous = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidArgument(f"messages[{i}] must be a dict with a string 'role'")
        role, content = message["role"], message.get("content") or ""
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}]['content'] must be a string")
        if role == "assistant" and message.get("tool_calls"):
            calls = [c if isinstance(c, ToolCall) else ToolCall.from_openai(c)
                     for c in message["tool_calls"]]
            called.update(c.id for c in calls)
            block = _render_calls([{"name": c.name, "arguments": c.arguments} for c in calls])
            out.append({"role": "assistant", "content": f"{content}\n{block}" if content else block})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in called:
                raise InvalidArgument(f"messages[{i}] answers tool_call_id {call_id!r}, which no "
                                      "earlier assistant message called")
            block = f"{RESULT_OPEN}\n{content}\n{RESULT_CLOSE}"
            if previous == "tool":
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": role, "content": content})
        previous = role
    if prompt:
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{prompt}\n\n{out[0]['content']}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
