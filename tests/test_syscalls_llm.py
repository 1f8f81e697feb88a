"""The llm syscalls on a real kernel and the real default model.

Token counts are checked against the Hugging Face tokenizer of the same GGUF; generations
against each other (chat, stream and complete must agree on the same greedy request);
tool calls and JSON answers with ``jsonschema``, independently of the grammar that made them.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Annotated, Literal

import jsonschema

from llmos_kernel.errors import ContextOverflow, InvalidArgument, LlmosError, NotFound
from llmos_kernel.services.tools import Range, spec_of
from syscalls import ipc, llm, proc, tools

HELLO = [{"role": "user", "content": "Say hello to Ada in five words."}]


def test_tokenize_and_count_match_the_reference_tokenizer(kernel, hf_tokenizer):
    text = "Agents are processes; the model is their CPU. Ünïcödé, 数字 123!"

    async def scenario():
        return (await llm.tokenize(text), await llm.count(text), await llm.count(messages=HELLO))

    ids, n_text, n_messages = kernel.run(scenario())
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert n_text == len(ids)
    rendered = hf_tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert n_messages == len(hf_tokenizer.encode(rendered, add_special_tokens=False))


def test_chat_stream_and_complete_agree_and_report_usage(kernel, hf_tokenizer):
    async def scenario():
        chat = await llm.chat(HELLO, max_tokens=12, temperature=0)
        pieces = [p async for p in llm.stream(HELLO, max_tokens=12, temperature=0)]
        prompt = hf_tokenizer.apply_chat_template(HELLO, add_generation_prompt=True,
                                                  tokenize=False)
        done = await llm.complete(prompt, max_tokens=12, temperature=0)
        return chat, pieces, done, await llm.count(messages=HELLO)

    chat, pieces, done, prompt_tokens = kernel.run(scenario())
    assert chat.text and "".join(pieces) == chat.text
    assert done.token_ids == chat.token_ids
    assert chat.usage["prompt_tokens"] == prompt_tokens
    assert chat.usage["completion_tokens"] == len(chat.token_ids) <= 12
    assert chat.finish_reason in ("stop", "length")
    assert hf_tokenizer.decode(chat.token_ids, skip_special_tokens=True) == chat.text


def test_a_spawned_program_uses_every_llm_call(kernel, hf_tokenizer):
    async def scenario():
        pid = await proc.spawn("syscall_agents:llm_tour")
        return await proc.wait(pid, timeout=200)

    exit_ = kernel.run(scenario())
    assert exit_["reason"] == "normal", exit_
    tour = exit_["result"]
    assert tour["chat"] == tour["stream"]
    assert tour["chat_usage"]["completion_tokens"] >= 1
    assert tour["complete_ids"] and len(tour["complete_ids"]) <= 4
    assert tour["tokens"] == hf_tokenizer.encode("hello world", add_special_tokens=False)
    assert tour["count"] == len(tour["tokens"])
    (vector,) = tour["embed"]
    assert len(vector) == 384 and math.isclose(math.fsum(v * v for v in vector), 1, rel_tol=1e-4)


def test_embeddings_are_unit_vectors_independent_of_their_batch(kernel):
    texts = ["The cat sat on the mat.", "A kitten rests on a rug.", "Quarterly revenue rose."]

    async def scenario():
        return await llm.embed(texts), await llm.embed(texts[:1])

    batch, alone = kernel.run(scenario())
    assert len(batch) == 3 and all(len(v) == 384 for v in batch)
    assert all(math.isclose(math.fsum(x * x for x in v), 1, rel_tol=1e-4) for v in batch)
    assert max(abs(a - b) for a, b in zip(batch[0], alone[0])) < 1e-5


def test_a_token_quota_is_spent_then_refused(kernel):
    quota = 150

    async def scenario():
        pid = await proc.spawn("syscall_agents:spend_tokens", {"max_calls": 20},
                               quotas={"tokens": quota})
        return await proc.wait(pid, timeout=200)

    report = kernel.run(scenario())["result"]
    spent = sum(u["prompt_tokens"] + u["completion_tokens"] for u in report["usages"])
    assert report["error"] == "QuotaExceeded", report
    assert 1 <= len(report["usages"]) < 20
    assert spent <= quota
    assert report["self"]["tokens_used"] == spent


def test_a_higher_priority_process_is_served_ahead_of_a_backlog(kernel):
    """A priority -5 process fills the engine with long prompts; the driver's priority 0
    request, sent after them, waits in the queue less than most of that backlog."""
    async def scenario():
        low = await proc.spawn("syscall_agents:backlog", {"n": 10, "notify": kernel.pid},
                               priority=-5)
        await ipc.recv(sender=low, timeout=120)
        urgent = await llm.chat(HELLO, max_tokens=2, temperature=0)
        return urgent, await proc.wait(low, timeout=240)

    urgent, exit_ = kernel.run(scenario())
    assert exit_["reason"] == "normal", exit_
    waits = sorted(u["queue_s"] for u in exit_["result"])
    print(f"\nqueue wait: urgent {urgent.usage['queue_s']:.2f}s, backlog median "
          f"{waits[len(waits) // 2]:.2f}s, max {waits[-1]:.2f}s")
    assert urgent.usage["queue_s"] < waits[len(waits) // 2]


def test_oversized_input_gets_typed_errors(kernel):
    async def scenario():
        errors = []
        for call in (lambda: llm.chat([{"role": "user", "content": "word " * 9000}], max_tokens=1),
                     lambda: llm.tokenize("x" * (2 << 20)),
                     lambda: llm.chat([{"role": "user", "content": 5}], max_tokens=1),
                     lambda: llm.chat(HELLO, max_tokens=-3)):
            try:
                await call()
            except InvalidArgument as e:
                errors.append(type(e))
        return errors

    errors = kernel.run(scenario())
    assert len(errors) == 4 and errors[0] is ContextOverflow


def test_a_stream_abandoned_early_is_cancelled_in_the_engine(kernel):
    async def scenario():
        stream = llm.stream([{"role": "user", "content": "Write a long story."}],
                            max_tokens=400, temperature=0)
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return first

    assert all(kernel.run(scenario()))
    deadline = time.monotonic() + 20
    while kernel.call("status")["queues"]["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kernel.call("status")["queues"]["running"] == 0


def test_response_format_gives_json_that_validates(kernel):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
        "required": ["name", "age", "pets"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    asks = ["Ada is 36 and has two cats.", "Describe a person.", "Bob, 71, keeps fish.",
            "Invent someone with no pets."]

    async def scenario():
        return await asyncio.gather(*(
            llm.chat([{"role": "user", "content": f"As JSON: {a}"}], response_format=fmt,
                     max_tokens=64, temperature=0) for a in asks))

    for result in kernel.run(scenario()):
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)


# -- the acceptance test: 50 varied requests, every tool call valid -------------------------


@tools.tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: The city name, e.g. "Paris".
        unit: The temperature unit.
    """
    return {"city": city, "temperature": 12, "unit": unit}


@tools.tool
def set_light(room: str, on: bool,
              brightness: Annotated[int, "Brightness in percent", Range(0, 100)] = 100) -> dict:
    """Switch the light in a room on or off.

    Args:
        room: The room, e.g. "kitchen".
        on: true to switch it on, false to switch it off.
        brightness: Brightness in percent.
    """
    return {"room": room, "on": on, "brightness": brightness}


REQUESTS = [
    "What's the weather in Paris?", "Is it raining in London?", "Temperature in Tokyo, in F?",
    "How cold is Oslo right now?", "Weather for New York please.", "Do I need a coat in Berlin?",
    "Is it sunny in Madrid?", "Check the forecast for Sydney.", "How warm is it in Cairo?",
    "Any snow in Moscow today?", "weather lisbon", "What's it like outside in Toronto?",
    "Give me the temperature in Rome in fahrenheit.", "Is Seattle wet today?",
    "Quel temps fait-il à Lyon ?", "¿Qué tiempo hace en Sevilla?", "Wie ist das Wetter in Wien?",
    "Turn on the kitchen light.", "Switch off the bedroom light.", "Dim the hall to 20%.",
    "Lights on in the garage, full brightness.", "Turn the office lamp off.",
    "Set the living room light to 60 percent.", "It's dark in the study, light it up.",
    "Kill the lights in the basement.", "Porch light on please.", "Bathroom light off.",
    "Make the nursery light very dim, 5%.", "Allume la lumière du salon.",
    "Apaga la luz de la cocina.", "Mach das Licht im Flur an.",
    "Turn on the light in the attic at half brightness.",
    "Check the weather in Paris and turn on the living room light if it is cold.",
    "If it's raining in Dublin, switch on the porch light.", "Good morning! How's Vienna?",
    "I'm flying to Lima, what's the weather?", "Brighten the dining room to 90.",
    "Hello there.", "What is 2 + 2?", "Tell me a joke.", "Who wrote Hamlet?",
    "Translate 'cat' to French.", "I'm bored.", "What time is it?", "Paris",
    "Is it bright?", "Write a haiku about rain.", "Help!", "kitchen", "Thanks, that's all.",
]


def test_fifty_concurrent_tool_call_requests_all_validate(kernel):
    """Acceptance: with tool_choice "required", every answer is a tool call whose arguments
    validate against its tool's schema — for relevant, foreign-language and unrelated asks."""
    assert len(REQUESTS) == 50
    schemas = {spec_of(f).name: spec_of(f).parameters for f in (get_weather, set_light)}

    async def scenario():
        return await asyncio.gather(*(
            llm.chat([{"role": "user", "content": ask}], tools=[get_weather, set_light],
                     tool_choice="required", max_tokens=96, temperature=0)
            for ask in REQUESTS))

    started = time.monotonic()
    results = kernel.run(scenario(), timeout=600)
    elapsed = time.monotonic() - started
    valid, picks = 0, {"get_weather": 0, "set_light": 0}
    failures = []
    for ask, result in zip(REQUESTS, results):
        try:
            assert result.finish_reason == "stop", f"finish_reason {result.finish_reason}"
            assert len(result.tool_calls) >= 1, "no tool call"
            for entry in result.tool_calls:
                name = entry["function"]["name"]
                jsonschema.validate(json.loads(entry["function"]["arguments"]), schemas[name])
                picks[name] += 1
            valid += 1
        except (AssertionError, KeyError, json.JSONDecodeError,
                jsonschema.ValidationError) as e:
            failures.append((ask, result.text, str(e)))
    tokens = sum(r.usage["completion_tokens"] for r in results)
    print(f"\nschema-valid tool calls: {valid}/50 ({picks}); {tokens} tokens in {elapsed:.1f}s")
    assert not failures, failures


def test_tool_choice_auto_gives_text_or_valid_calls(kernel):
    schemas = {spec_of(f).name: spec_of(f).parameters for f in (get_weather, set_light)}

    async def scenario():
        return await asyncio.gather(*(
            llm.chat([{"role": "user", "content": ask}], tools=[get_weather, set_light],
                     max_tokens=48, temperature=0)
            for ask in ("Turn on the kitchen light.", "Who wrote Hamlet?")))

    for result in kernel.run(scenario()):
        assert result.text or result.tool_calls
        for entry in result.tool_calls:
            args = json.loads(entry["function"]["arguments"])
            jsonschema.validate(args, schemas[entry["function"]["name"]])


def test_a_kept_context_continues_without_recompute_and_only_for_its_owner(kernel):
    """keep_context parks a conversation's KV (an agent waiting on a tool); its owner continues
    it with only the new tokens computed, nobody else can continue or release it, and once
    released it is gone."""
    async def scenario():
        first = await llm.chat([{"role": "user", "content": "Name three colours."}],
                               keep_context=True, max_tokens=8, temperature=0)
        ctx = first.context_id
        child = await proc.spawn("syscall_agents:probe", {"calls": [
            ["llm.release", {"context_id": ctx}],
            ["llm.generate", {"spec": {"prompt": " more", "context": ctx,
                                       "params": {"max_tokens": 2}}}]]})
        theirs = (await proc.wait(child, timeout=60))["result"]
        second = await llm.complete("\nThree more:", context=ctx, keep_context=True,
                                    max_tokens=8, temperature=0)
        await llm.release(second.context_id)
        try:
            await llm.complete(" again", context=second.context_id, max_tokens=2)
            gone = None
        except LlmosError as e:
            gone = e
        return first, theirs, second, gone

    first, theirs, second, gone = kernel.run(scenario())
    assert first.context_id and first.finish_reason == "length"
    assert [t.get("error") for t in theirs] == ["NotFound", "NotFound"], theirs
    kept = first.usage["prompt_tokens"] + first.usage["completion_tokens"] - 1
    assert second.usage["cached_tokens"] >= kept  # the parked KV, not a recompute
    assert second.usage["prompt_tokens"] > kept
    assert isinstance(gone, NotFound)
