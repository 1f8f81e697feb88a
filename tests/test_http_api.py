"""``llmos serve``: the OpenAI-compatible API, driven by the official ``openai`` client.

The server runs in this process on a thread of its own, in front of the session's kernel
(real model); every request is real HTTP on the loopback. Greedy answers through HTTP
are compared with the same request made through the syscall layer.
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from llmos_kernel.http.gateway import Gateway
from llmos_kernel.http.keys import ApiKey, KeyRing
from llmos_kernel.http.run import start_in_thread
from syscalls import llm

HIGH, LOW, TINY = "key-high-0123456789", "key-low-0123456789", "key-tiny-0123456789"
BULK = "key-bulk-0123456789"


@pytest.fixture(scope="module")
def server(kernel):
    from llmos_kernel.client import KernelClient

    token = (kernel.state_dir / "root.token").read_text()
    gateway = Gateway(KernelClient(kernel.handle, token))
    keys = KeyRing({HIGH: ApiKey("high", priority=10), LOW: ApiKey("low"),
                    TINY: ApiKey("tiny", tokens=40, max_streams=1),
                    BULK: ApiKey("bulk", max_streams=64)})
    running = start_in_thread(gateway, keys, max_tokens=256, max_body_bytes=64 << 10)
    yield running
    running.stop()


def client(server, key: str = LOW) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


GREETING = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_the_served_model_the_embedder_and_the_adapters(server):
    from llmos_kernel import adapters

    ids = [m.id for m in client(server).models.list()]
    assert ids == [server.server.model_id, server.server.embedding_model, *adapters.names()]


def test_greedy_chat_through_http_equals_the_syscall(server, kernel):
    answer = client(server).chat.completions.create(
        model=server.server.model_id, messages=GREETING, max_tokens=24, temperature=0)
    direct = kernel.run(llm.chat(GREETING, max_tokens=24, temperature=0))
    assert answer.choices[0].message.content == direct.text
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 24
    assert answer.usage.prompt_tokens == direct.usage["prompt_tokens"]


def test_a_streamed_chat_carries_the_same_text_and_its_usage(server):
    api = client(server)
    whole = api.chat.completions.create(model=server.server.model_id, messages=GREETING,
                                        max_tokens=20, temperature=0)
    pieces, usage, finish = [], None, None
    for chunk in api.chat.completions.create(
            model=server.server.model_id, messages=GREETING, max_tokens=20, temperature=0,
            stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == "length" and usage.completion_tokens == 20


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"]}}}


def test_a_tool_call_validates_against_its_schema(server):
    answer = client(server).chat.completions.create(
        model=server.server.model_id, tools=[WEATHER], tool_choice="required", temperature=0,
        max_tokens=64, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_a_json_schema_answer_validates(server):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    answer = client(server).chat.completions.create(
        model=server.server.model_id, temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                 "schema": schema}},
        messages=[{"role": "user", "content": "Invent a person."}])
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_logprobs_n_and_seed(server):
    api = client(server)
    answer = api.chat.completions.create(
        model=server.server.model_id, messages=GREETING, max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 8
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4  # greedy: the best
    two = api.chat.completions.create(model=server.server.model_id, messages=GREETING,
                                      max_tokens=12, temperature=1.0, seed=7, n=2)
    again = api.chat.completions.create(model=server.server.model_id, messages=GREETING,
                                        max_tokens=12, temperature=1.0, seed=7, n=2)
    assert [c.message.content for c in two.choices] == \
        [c.message.content for c in again.choices]
    assert [c.index for c in two.choices] == [0, 1]


def test_completions_and_stop(server, kernel):
    api = client(server)
    answer = api.completions.create(model=server.server.model_id, prompt="One, two, three,",
                                    max_tokens=12, temperature=0)
    direct = kernel.run(llm.complete("One, two, three,", max_tokens=12, temperature=0))
    assert answer.choices[0].text == direct.text
    stopped = api.completions.create(model=server.server.model_id, prompt="One, two, three,",
                                     max_tokens=12, temperature=0, stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_embeddings_equal_the_syscall(server, kernel):
    got = client(server).embeddings.create(model=server.server.embedding_model,
                                           input=["a cat", "a dog"])
    direct = kernel.run(llm.embed(["a cat", "a dog"]))
    assert [d.index for d in got.data] == [0, 1]
    for mine, theirs in zip(got.data, direct, strict=True):
        assert mine.embedding == pytest.approx(theirs, abs=1e-6)
    assert got.usage.prompt_tokens > 0


def _post(server, path: str, body, key: str | None = LOW, raw: bytes | None = None):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120)


@pytest.mark.parametrize("case,status,code", [
    ("malformed_json", 400, "invalid_json"),
    ("unknown_model", 404, "not_found"),
    ("bad_parameter", 400, "invalid_parameter"),
    ("oversize_body", 413, "body_too_large"),
    ("bad_key", 401, "invalid_api_key"),
    ("missing_key", 401, "invalid_api_key"),
    ("context_overflow", 400, "context_length_exceeded"),
    ("max_tokens_over_limit", 400, None),
])
def test_errors_have_the_openai_status_and_body_and_the_server_keeps_serving(
        server, case, status, code):
    model = server.server.model_id
    ok = {"model": model, "messages": GREETING, "max_tokens": 2}
    reply = {
        "malformed_json": lambda: _post(server, "/v1/chat/completions", None, raw=b'{"model": '),
        "unknown_model": lambda: _post(server, "/v1/chat/completions", {**ok, "model": "gpt-9"}),
        "bad_parameter": lambda: _post(server, "/v1/chat/completions", {**ok,
                                                                         "temperature": 5}),
        "oversize_body": lambda: _post(server, "/v1/chat/completions", {
            **ok, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}),
        "bad_key": lambda: _post(server, "/v1/chat/completions", ok, key="not-a-key-at-all"),
        "missing_key": lambda: _post(server, "/v1/chat/completions", ok, key=None),
        "context_overflow": lambda: _post(server, "/v1/chat/completions", {
            **ok, "messages": [{"role": "user", "content": "word " * 9000}]}),
        "max_tokens_over_limit": lambda: _post(server, "/v1/chat/completions", {
            **ok, "max_tokens": 100_000}),
    }[case]()
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    again = _post(server, "/v1/chat/completions", ok)
    assert again.status_code == 200, again.text


def test_a_key_past_its_quota_gets_429_and_others_are_unaffected(server):
    tiny = client(server, TINY)
    with pytest.raises(openai.RateLimitError):
        for _ in range(5):  # its process has 40 tokens; each request uses more than 10
            tiny.chat.completions.create(model=server.server.model_id, messages=GREETING,
                                         max_tokens=8, temperature=0)
    answer = client(server, LOW).chat.completions.create(
        model=server.server.model_id, messages=GREETING, max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4


def test_the_sdk_raises_its_own_error_types(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong-key-0000000").models.list()
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="nope", messages=GREETING)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=server.server.model_id,
                                               messages=GREETING, top_p=7)


def test_a_client_that_disconnects_mid_stream_is_cancelled_in_the_kernel(server, kernel):
    body = {"model": server.server.model_id, "messages": GREETING, "max_tokens": 256,
            "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {LOW}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                      headers=headers, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith('data: {"id"'):
            pass
        assert kernel.call("status")["queues"]["running"] >= 1
    step = kernel.call("status")["step_p50_s"] or 0.1
    deadline = time.monotonic() + 10
    while kernel.call("status")["queues"]["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    gone_after = 10 - (deadline - time.monotonic())
    assert kernel.call("status")["queues"]["running"] == 0
    assert gone_after < max(1.0, 5 * step), gone_after


def test_a_high_priority_key_runs_in_the_next_steps_while_another_saturates(server, kernel):
    """Both keys are kernel processes: the scheduler's priorities apply to HTTP callers."""
    import concurrent.futures

    high = client(server, HIGH)

    def ttft() -> tuple[float, dict]:
        sent = time.perf_counter()
        answer = high.chat.completions.create(model=server.server.model_id, messages=GREETING,
                                              max_tokens=1, temperature=0)
        return time.perf_counter() - sent, answer.usage.model_extra["llmos"]

    idle_s, idle = ttft()
    bulk = client(server, BULK)

    def flood(i: int) -> int:
        answer = bulk.chat.completions.create(
            model=server.server.model_id, max_tokens=64, temperature=0,
            messages=[{"role": "user", "content": f"Tell story number {i} about a fox."}])
        return answer.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        floods = [pool.submit(flood, i) for i in range(32)]
        deadline = time.monotonic() + 60
        while kernel.call("status")["queues"]["running"] < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kernel.call("status")["queues"]["running"] >= 16, "the flood never saturated"
        busy_s, busy = ttft()
        step = kernel.call("status")["step_p50_s"]
        assert sum(f.result() for f in floods) == 32 * 64
    print(f"high-priority TTFT idle {idle_s:.3f} s, under saturation {busy_s:.3f} s "
          f"(engine step p50 {step:.3f} s; steps waited {busy['steps_waited']})")
    assert busy["steps_waited"] <= 2, busy
    assert idle["steps_waited"] == 0


def test_llmos_serve_runs_as_the_readme_shows(kernel):
    """The README's ``llmos serve`` and ``curl .../v1/models``, against the session kernel
    (named here, as it is not the default one)."""
    import shutil
    import socket
    import subprocess
    import sys

    import ray

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**__import__("os").environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    serve = subprocess.Popen([sys.executable, "-m", "llmos_kernel.cli", "serve", "--port",
                              str(port), "--kernel", kernel.name, "--state-dir",
                              str(kernel.state_dir)], env=env, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert serve.poll() is None, serve.stderr.read()
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "llmos serve never answered"
                time.sleep(0.2)
        curl = shutil.which("curl")
        if curl:
            out = subprocess.run([curl, "-s", f"localhost:{port}/v1/models"],
                                 capture_output=True, text=True, check=True).stdout
        else:  # curl is not on every machine: the same GET
            out = httpx.get(f"http://localhost:{port}/v1/models", timeout=5).text
        assert json.loads(out)["data"][0]["object"] == "model"
    finally:
        serve.terminate()
        serve.wait(30)
