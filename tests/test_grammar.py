"""Grammar-constrained generation on the real model, checked by independent validators.

JSON outputs are checked with ``jsonschema``, regex outputs with Python's ``re``, and the
masks themselves against llguidance's own token-by-token validation.
"""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.engine.engine import Request
from llmos_kernel.engine.grammar import GrammarCompiler
from llmos_kernel.errors import InvalidArgument

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "hobbies": {
            "type": "array",
            "items": {"enum": ["reading", "chess", "running", "cooking"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "address", "hobbies"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "status": {"enum": ["open", "shipped", "closed"]},
        "lines": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "express": {"type": "boolean"},
    },
    "required": ["id", "status", "lines", "express"],
    "additionalProperties": False,
}
FORECAST = {
    "type": "array",
    "minItems": 2,
    "maxItems": 3,
    "items": {
        "type": "object",
        "properties": {
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
            "high_c": {"type": "integer", "minimum": -40, "maximum": 50},
            "note": {"type": "string", "maxLength": 8},
        },
        "required": ["day", "high_c"],
        "additionalProperties": False,
    },
}
SCHEMAS = {
    "person": (PERSON, "Invent a person and describe them as JSON."),
    "order": (ORDER, "Write a shop order as JSON."),
    "forecast": (FORECAST, "Give a short weather forecast for a few days as JSON."),
}
# Greedy, then temperature 1.0 with three seeds. Every string and array above is bounded, so
# no schema admits an output longer than max_tokens (a token is at least one byte): every
# output must end by "stop", complete.
SETTINGS = [SamplingParams(max_tokens=384, temperature=0.0)] + [
    SamplingParams(max_tokens=384, temperature=1.0, seed=seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def compiler(engine) -> GrammarCompiler:
    return GrammarCompiler(engine.tokenizer)


def _chat(engine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def _generate(engine, jobs: dict[str, tuple[list[int], SamplingParams, object]]) -> dict:
    """Run all jobs in one batch; request id -> (text, finish_reason, token ids)."""
    for request_id, (prompt, params, constraint) in jobs.items():
        engine.add_request(Request(request_id, prompt, params, constraint=constraint))
    results = engine.run_until_done()
    return {rid: ("".join(d.text for d in deltas), deltas[-1].finish_reason,
                  [t for d in deltas for t in d.token_ids])
            for rid, deltas in results.items() if rid in jobs}


def test_json_schema_outputs_always_validate(engine, compiler):
    jobs = {}
    for name, (schema, ask) in SCHEMAS.items():
        grammar = compiler.json_schema(schema)
        prompt = _chat(engine, f"{ask} Use this JSON schema: {json.dumps(schema)}")
        for i, params in enumerate(SETTINGS):
            jobs[f"json-{name}-{i}"] = (prompt, params, grammar.matcher())
    outputs = _generate(engine, jobs)
    assert outputs.keys() == jobs.keys()
    for request_id, (text, reason, _) in outputs.items():
        schema = SCHEMAS[request_id.split("-")[1]][0]
        assert reason == "stop", (request_id, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_choice_grammars(engine, compiler):
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    answers = ["yes", "no", "not sure"]
    date_prompt = _chat(engine, "When did the Berlin Wall fall? Answer with a date, YYYY-MM-DD.")
    choice_prompt = _chat(engine, "Is Paris the capital of France? Answer yes, no or not sure.")
    jobs = {}
    for i, params in enumerate(SETTINGS):
        jobs[f"regex-{i}"] = (date_prompt, params, compiler.regex(date).matcher())
        jobs[f"choice-{i}"] = (choice_prompt, params, compiler.choice(answers).matcher())
    outputs = _generate(engine, jobs)
    for request_id, (text, reason, _) in outputs.items():
        assert reason == "stop", (request_id, text)
        if request_id.startswith("regex"):
            assert re.fullmatch(date, text), text
        else:
            assert text in answers


def test_constrained_rows_leave_unconstrained_greedy_output_alone(engine, compiler):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    free = {f"free-{i}": (_chat(engine, q), greedy, None) for i, q in enumerate(
        ["Name three rivers in Europe.", "What is a compiler?", "Write a line about the sea."])}
    alone = _generate(engine, {f"alone-{k}": v for k, v in free.items()})
    person = compiler.json_schema(PERSON)
    sampled = SamplingParams(max_tokens=24, temperature=1.0)  # constrained for all 24 steps
    beside = _generate(engine, {
        **{f"beside-{k}": v for k, v in free.items()},
        **{f"constrained-{i}": (_chat(engine, "Invent a person as JSON."), sampled,
                                person.matcher()) for i in range(3)},
    })
    for key in free:
        assert beside[f"beside-{key}"][2] == alone[f"alone-{key}"][2], key
    assert all(beside[f"constrained-{i}"][0].startswith('{"name": "') for i in range(3))


# -- masks against llguidance's own check --------------------------------------------------------

def _people() -> st.SearchStrategy[dict]:
    """Documents that validate against PERSON, keys in the schema's order.

    City names leave out control characters (llguidance writes those only as escapes, where
    ``json.dumps`` leaves DEL raw) and code points Unicode has not assigned.
    """
    city = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Cn"]),
                   min_size=1, max_size=20)
    address = st.builds(lambda city, zip_code: {"city": city, "zip": zip_code},
                        city, st.from_regex(r"\A[0-9]{5}\Z"))
    hobbies = st.lists(st.sampled_from(["reading", "chess", "running", "cooking"]),
                       min_size=1, max_size=3)
    return st.builds(
        lambda name, age, address, hobbies: {"name": name, "age": age, "address": address,
                                             "hobbies": hobbies},
        st.from_regex(r"\A[A-Z][a-z]{1,11}\Z"), st.integers(0, 120), address, hobbies)


@settings(max_examples=25)
@given(doc=_people(), cut=st.integers(0, 2**31),
       probes=st.lists(st.integers(0, 2**31), min_size=32, max_size=32))
def test_mask_agrees_with_llguidance_token_check(engine, compiler, doc, cut, probes):
    """Anywhere in any valid document: the mask allows the document's next token, equals
    llguidance's own logit-bias mask over the whole vocabulary, and every token it allows
    passes llguidance's token-by-token validation (the mask may be stricter where bytes are
    forced: there it allows only their canonical token), stop tokens once the JSON is whole."""
    jsonschema.validate(doc, PERSON)
    vocab = engine.tokenizer.vocab_size
    grammar = compiler.json_schema(PERSON)
    ids = engine.tokenizer.encode(json.dumps(doc, ensure_ascii=False))
    prefix = ids[:cut % (len(ids) + 1)]
    ours = grammar.matcher()
    reference = llguidance.LLMatcher(compiler.lltokenizer, grammar.text)
    for token in prefix:
        ours.advance(token)
        assert reference.consume_token(token)
    bits = np.unpackbits(np.frombuffer(ours.allowed_mask(), np.uint8), bitorder="little")
    assert len(bits) >= vocab and not bits[vocab:].any()
    allowed = bits[:vocab].astype(bool)
    assert np.array_equal(allowed, np.frombuffer(reference.compute_logit_bias(), np.uint8) > 0)
    if len(prefix) < len(ids):
        assert allowed[ids[len(prefix)]]
    candidates = np.flatnonzero(allowed)
    for p in probes:
        for token in (p % vocab, int(candidates[p % len(candidates)])):
            if token in engine.tokenizer.stop_token_ids:
                assert allowed[token] == reference.is_accepting()
            elif allowed[token]:
                assert reference.validate_tokens([token]) == 1, token


def test_advance_refuses_a_token_the_mask_forbids(engine, compiler):
    tok = engine.tokenizer
    constraint = compiler.choice(["yes", "no"]).matcher()
    forbidden = tok.encode("maybe")[0]
    bits = np.unpackbits(np.frombuffer(constraint.allowed_mask(), np.uint8), bitorder="little")
    assert not bits[forbidden]
    with pytest.raises(InvalidArgument, match="not allowed"):
        constraint.advance(forbidden)


def test_rollback_returns_to_the_earlier_mask(engine, compiler):
    constraint = compiler.json_schema(ORDER).matcher()
    ids = engine.tokenizer.encode('{"id": 12, "status": "')
    for token in ids[:3]:
        constraint.advance(token)
    before = constraint.allowed_mask()
    for token in ids[3:]:
        constraint.advance(token)
    assert constraint.allowed_mask() != before
    constraint.rollback(len(ids) - 3)
    assert constraint.allowed_mask() == before


def test_finished_output_is_done(engine, compiler):
    constraint = compiler.json_schema(ORDER).matcher()
    doc = {"id": 7, "status": "open", "lines": [{"sku": "ABC-123", "qty": 2}], "express": False}
    for token in engine.tokenizer.encode(json.dumps(doc)):
        assert not constraint.is_done()
        constraint.advance(token)
    assert constraint.is_done()


@pytest.mark.parametrize("schema", [
    {"type": "nonsense"},
    {"$ref": "#/$defs/missing"},
    {"type": "string", "pattern": "(unclosed"},
    {"type": "array", "minItems": 5, "maxItems": 2},
    {"not": {"type": "string"}},
    {"type": "object", "properties": {"a": 1}},
    "not a dict",
])
def test_bad_schemas_are_invalid_arguments(compiler, schema):
    with pytest.raises(InvalidArgument):
        compiler.json_schema(schema)


@pytest.mark.parametrize("make", [
    lambda c: c.regex("(unclosed"),
    lambda c: c.regex(""),
    lambda c: c.lark("start: undefined_rule"),
    lambda c: c.choice([]),
    lambda c: c.choice(["ok", ""]),
])
def test_bad_grammars_are_invalid_arguments(compiler, make):
    with pytest.raises(InvalidArgument):
        make(compiler)


def test_compiled_grammars_are_cached(compiler):
    assert compiler.json_schema(PERSON) is compiler.json_schema(json.loads(json.dumps(PERSON)))
