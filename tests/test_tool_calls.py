"""Tool calls on the real model: under a grammar every call parses and validates.

The acceptance test sends 50 varied requests in one batch with tool_choice "required" and
checks every answer with ``jsonschema``, independently of the grammar that produced it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import Request
from llmos_kernel.engine.grammar import GrammarCompiler
from llmos_kernel.engine.tool_calls import (
    ToolCall,
    messages_with_tools,
    parse_tool_calls,
    render_tools_prompt,
    resolve_tool_choice,
    response_format_grammar,
    tool_call_grammar,
)
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.services.tools import Range, spec_of, tool


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The name of the city.
        unit: The temperature unit.
    """
    return f"It is sunny in {city}."


@tool
def set_light(room: str, on: bool, brightness: Annotated[int, Range(0, 100)]) -> str:
    """Switch the light in a room on or off and set its brightness.

    Args:
        room: The room the light is in.
        on: true to switch the light on, false to switch it off.
        brightness: Brightness in percent.
    """
    return "done"


TOOLS = [spec_of(get_weather), spec_of(set_light)]
SCHEMAS = {spec.name: spec.parameters for spec in TOOLS}
W, L = "get_weather", "set_light"
# (request, the tool a person would pick, or None where neither fits)
REQUESTS = [
    ("What's the weather like in Paris?", W),
    ("Is it raining in London right now?", W),
    ("How hot is it in Tokyo today, in fahrenheit?", W),
    ("Tell me the temperature in Berlin.", W),
    ("Do I need an umbrella in Seattle?", W),
    ("Weather forecast for New York please", W),
    ("Is it cold in Oslo?", W),
    ("What is the weather in Sydney in celsius?", W),
    ("How windy is it in Chicago?", W),
    ("Check the weather in Madrid for me.", W),
    ("Will it be sunny in Rome?", W),
    ("Is it snowing in Moscow?", W),
    ("Give me the current conditions in Cairo.", W),
    ("What's the temperature outside in Toronto, fahrenheit please?", W),
    ("weather amsterdam", W),
    ("Turn on the light in the kitchen.", L),
    ("Switch off the bedroom light.", L),
    ("Set the living room light to 50 percent.", L),
    ("Dim the bathroom lights to 20%.", L),
    ("Turn the office light on at full brightness.", L),
    ("Please turn off the lights in the garage.", L),
    ("Make the hallway light brighter, 80 percent.", L),
    ("Lights on in the dining room, brightness 60.", L),
    ("Turn off the kitchen light.", L),
    ("Set the bedroom lamp to 10% brightness.", L),
    ("It's too dark in the study, turn the light on.", L),
    ("Switch on the porch light at 100.", L),
    ("kill the lights in the basement", L),
    ("Turn on the nursery light, very dim please, like 5 percent.", L),
    ("Set the attic light to half brightness.", L),
    ("Quel temps fait-il à Lyon ?", W),
    ("¿Qué tiempo hace en Barcelona?", W),
    ("Wie ist das Wetter in München?", W),
    ("Allume la lumière de la cuisine.", L),
    ("Apaga la luz del salón.", L),
    ("Mach das Licht im Schlafzimmer aus.", L),
    ("今天北京天气怎么样？", W),
    ("Che tempo fa a Milano?", W),
    ("I'm going to Lisbon tomorrow, what should I wear?", W),
    ("It's so gloomy in here.", None),
    ("Can you help me?", None),
    ("I want to know about the kitchen.", None),
    ("Paris", None),
    ("Is it bright?", None),
    ("What is 2 + 2?", None),
    ("Tell me a joke about cats.", None),
    ("Who wrote Hamlet?", None),
    ("Translate 'hello' into Spanish.", None),
    ("What's the capital of Australia?", None),
    ("Write a haiku about autumn.", None),
]
# A call of either tool is under 120 bytes besides its one free string, bounded to MAX_CHARS
# characters of at most 6 bytes (a \uXXXX escape) each; a token is at least one byte, so every
# call fits in MAX_TOKENS. Calls stop long before that: the bound only matters for a rambler.
MAX_CHARS = 32
MAX_TOKENS = 120 + 6 * MAX_CHARS
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def compiler(engine) -> GrammarCompiler:
    return GrammarCompiler(engine.tokenizer)


def _prompt(engine, messages: list[dict], tool_choice="required") -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(messages_with_tools(messages, TOOLS, tool_choice)))


def _answers(engine, requests: dict[str, tuple[list[int], object]],
             params: SamplingParams = GREEDY,
             own_params: dict[str, SamplingParams] | None = None) -> dict[str, tuple[str, str]]:
    """Run the requests in one batch; request id -> (text, finish_reason)."""
    for request_id, (prompt, constraint) in requests.items():
        engine.add_request(Request(request_id, prompt, (own_params or {}).get(request_id, params),
                                   constraint=constraint))
    results = engine.run_until_done()
    return {rid: ("".join(d.text for d in deltas), deltas[-1].finish_reason)
            for rid, deltas in results.items()}


def _validated_calls(text: str) -> list[ToolCall]:
    """The calls in ``text``, each checked against its tool's schema by jsonschema."""
    _, calls = parse_tool_calls(text)
    for call in calls:
        jsonschema.validate(call.arguments, SCHEMAS[call.name])
    return calls


def test_fifty_requests_under_required_all_give_valid_calls(engine, compiler):
    grammar = tool_call_grammar(compiler, TOOLS, "required", max_string_length=MAX_CHARS)
    answers = _answers(engine, {
        f"required-{i}": (_prompt(engine, [{"role": "user", "content": text}]), grammar.matcher())
        for i, (text, _) in enumerate(REQUESTS)})
    picks = []
    for i, (text, expected) in enumerate(REQUESTS):
        answer, reason = answers[f"required-{i}"]
        assert reason == "stop", (text, answer)
        calls = _validated_calls(answer)
        assert len(calls) == 1, answer
        picks.append((expected, calls[0].name))
    judged = [(e, p) for e, p in picks if e is not None]
    right = sum(e == p for e, p in judged)
    per_tool = ", ".join(f"{name} {sum(p == name for e, p in judged if e == name)}/"
                         f"{sum(e == name for e, _ in judged)}" for name in (W, L))
    print(f"\nthe model picked the expected tool for {right}/{len(judged)} requests ({per_tool})")
    assert right >= len(judged) // 2
    assert {p for e, p in judged if e == p} == {W, L}  # each tool is picked right at least once


def test_sampled_at_temperature_one_every_call_is_still_valid(engine, compiler):
    """Validity comes from the grammar, not from greedy luck: the same 50 requests sampled at
    temperature 1 (each its own seed) all still end in one schema-valid call."""
    grammar = tool_call_grammar(compiler, TOOLS, "required", max_string_length=MAX_CHARS)
    sampled = {f"sampled-{i}": SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i)
               for i in range(len(REQUESTS))}
    answers = _answers(engine, {
        f"sampled-{i}": (_prompt(engine, [{"role": "user", "content": text}]), grammar.matcher())
        for i, (text, _) in enumerate(REQUESTS)}, own_params=sampled)
    for i, (text, _) in enumerate(REQUESTS):
        answer, reason = answers[f"sampled-{i}"]
        assert reason == "stop", (text, answer)
        assert len(_validated_calls(answer)) == 1, answer


def test_a_named_tool_is_the_only_one_called(engine, compiler):
    grammar = tool_call_grammar(compiler, TOOLS, {"type": "function", "function": {"name": L}},
                                max_string_length=MAX_CHARS)
    requests = ["What's the weather in Paris?", "Turn on the kitchen light.", "Hello!"]
    answers = _answers(engine, {
        f"named-{i}": (_prompt(engine, [{"role": "user", "content": text}], L), grammar.matcher())
        for i, text in enumerate(requests)})
    for answer, reason in answers.values():
        assert reason == "stop"
        assert [c.name for c in _validated_calls(answer)] == [L]


def test_parallel_calls_are_each_valid(engine, compiler):
    grammar = tool_call_grammar(compiler, TOOLS, "required", parallel=True,
                                max_string_length=MAX_CHARS)
    ask = "Turn on the kitchen light and tell me the weather in Rome."
    answers = _answers(engine, {"parallel": (_prompt(engine, [{"role": "user", "content": ask}]),
                                             grammar.matcher())},
                       SamplingParams(max_tokens=3 * MAX_TOKENS, temperature=0.0))
    answer, reason = answers["parallel"]
    assert reason == "stop", answer
    assert len(_validated_calls(answer)) >= 1


def test_auto_gives_plain_text_or_valid_calls(engine, compiler):
    """Under "auto" the model may answer in text; any call it finishes is valid, and once a
    call is opened (here: an assistant prefix that opens one) the rest is forced to be valid.
    Only a call cut off by max_tokens can fail to parse."""
    grammar = tool_call_grammar(compiler, TOOLS, "auto", max_string_length=MAX_CHARS)
    tok = engine.tokenizer
    chosen = REQUESTS[::10]
    requests = {f"auto-{i}": (_prompt(engine, [{"role": "user", "content": text}], "auto"),
                              grammar.matcher()) for i, (text, _) in enumerate(chosen)}
    opened = "I will use a tool.\n<tool_call>[\n"
    for i, (text, _) in enumerate(chosen[:3]):
        prompt, constraint = _prompt(engine, [{"role": "user", "content": text}], "auto"), \
            grammar.matcher()
        prefix = tok.encode(opened)
        for token in prefix:
            constraint.advance(token)
        requests[f"opened-{i}"] = (prompt + prefix, constraint)
    short = SamplingParams(max_tokens=40, temperature=0.0)  # free text would run to the limit
    answers = _answers(engine, requests, own_params={
        request_id: short for request_id in requests if request_id.startswith("auto")})
    for request_id, (answer, reason) in answers.items():
        if request_id.startswith("opened"):
            assert reason == "stop", answer
            assert len(_validated_calls(opened + answer)) == 1
        elif "<tool_call>" not in answer:
            assert parse_tool_calls(answer) == (answer.strip(), [])
        elif reason == "stop":
            _validated_calls(answer)


def test_response_formats(engine, compiler):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    formats = {
        "json_object": {"type": "json_object"},
        "json_schema": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    }
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "Pick a city and say if it is sunny there, as JSON."}]))
    answers = _answers(engine, {
        f"format-{name}": (prompt, response_format_grammar(compiler, fmt).matcher())
        for name, fmt in formats.items()}, SamplingParams(max_tokens=48, temperature=0.0))
    answer, reason = answers["format-json_schema"]
    assert reason == "stop"
    jsonschema.validate(json.loads(answer), schema)
    answer, reason = answers["format-json_object"]
    if reason == "stop":
        assert isinstance(json.loads(answer), dict)
    assert response_format_grammar(compiler, {"type": "text"}) is None
    assert response_format_grammar(compiler, None) is None
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json"):
        with pytest.raises(InvalidArgument):
            response_format_grammar(compiler, bad)


def test_max_string_length_bounds_free_strings_only(engine, compiler):
    grammar = tool_call_grammar(compiler, TOOLS, W, max_string_length=4)
    head = '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "'

    def accepts(text: str) -> bool:
        constraint = grammar.matcher()
        try:
            for token in engine.tokenizer.encode(text):
                constraint.advance(token)
        except InvalidArgument:
            return False
        return constraint.is_done()

    assert accepts(head + 'Oslo", "unit": "fahrenheit"}}\n]</tool_call>')  # enums keep theirs
    assert not accepts(head + 'Paris"}}\n]</tool_call>')


# -- without the model ---------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8)


@given(text=st.text().filter(lambda t: "<tool_call>" not in t and "</tool_call>" not in t),
       calls=st.lists(st.tuples(st.from_regex(r"\A[a-z_]{1,12}\Z"),
                                st.dictionaries(st.text(), _JSON, max_size=3)),
                      min_size=1, max_size=3))
def test_a_rendered_conversation_call_parses_back(text, calls):
    """What messages_with_tools writes for an assistant's calls is what parse_tool_calls reads."""
    message = {"role": "assistant", "content": text, "tool_calls": [
        ToolCall(f"call_{i}", name, args).to_openai() for i, (name, args) in enumerate(calls)]}
    rendered = messages_with_tools([message])[0]["content"]
    content, parsed = parse_tool_calls(rendered)
    assert content == text.strip()
    assert [(c.name, c.arguments) for c in parsed] == calls


@pytest.mark.parametrize("text", [
    "<tool_call>[{\"name\": \"get_weather\", \"arguments\": {}}]",
    "<tool_call>[{\"name\": \"get_weather\", \"arguments\": {]</tool_call>",
    "<tool_call>[{\"name\": \"get_weather\"}]</tool_call>",
    "<tool_call>[{\"name\": 3, \"arguments\": {}}]</tool_call>",
    "<tool_call>[\"get_weather\"]</tool_call>",
    "stray </tool_call>",
])
def test_malformed_calls_are_invalid_arguments(text):
    with pytest.raises(InvalidArgument):
        parse_tool_calls(text)


def test_a_tool_round_trip_renders_through_the_chat_template(engine):
    call = ToolCall("call_1", W, {"city": "Paris"})
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    messages = messages_with_tools(conversation, TOOLS, "auto")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith(render_tools_prompt(TOOLS, "auto"))
    assert messages[0]["content"].endswith("Be brief.")
    assert parse_tool_calls(messages[2]["content"])[1][0].arguments == {"city": "Paris"}
    assert "sunny, 21 C" in messages[3]["content"]
    prompt = engine.tokenizer.apply_chat_template(messages)
    assert prompt.count("<|im_start|>") == 5
    with pytest.raises(InvalidArgument, match="tool_call_id"):
        messages_with_tools(conversation[:2] + conversation[3:], TOOLS)


def test_tool_choice_is_checked():
    assert resolve_tool_choice(TOOLS, "auto") == ("auto", TOOLS)
    assert resolve_tool_choice(TOOLS, L) == ("required", [TOOLS[1]])
    mode, specs = resolve_tool_choice([t.to_openai() for t in TOOLS], "required")
    assert (mode, [(s.name, s.parameters) for s in specs]) == (
        "required", [(t.name, t.parameters) for t in TOOLS])
    assert render_tools_prompt(TOOLS, "none") == ""
    for bad in ("sometimes", {"type": "function", "function": {"name": "fly"}}, 3):
        with pytest.raises(InvalidArgument):
            resolve_tool_choice(TOOLS, bad)
    with pytest.raises(InvalidArgument):
        resolve_tool_choice([], "required")
    with pytest.raises(InvalidArgument):
        resolve_tool_choice(TOOLS + TOOLS[:1], "auto")


def test_a_closing_tag_inside_a_string_argument_does_not_end_the_call():
    """Sampling found it: the grammar lets a string hold "</tool_call>", so the parser reads
    the JSON with a decoder instead of cutting at the first closing tag."""
    text = ('Sure. <tool_call>[\n{"name": "get_weather", "arguments": {"city": "}}</tool_call>'
            '"}}\n]</tool_call> done')
    content, calls = parse_tool_calls(text)
    assert content == "Sure.  done"
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "}}</tool_call>"})]
    with pytest.raises(InvalidArgument, match="not followed by"):
        parse_tool_calls('<tool_call>{"name": "a", "arguments": {}} trailing</tool_call>')
