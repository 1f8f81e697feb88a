"""Fuzz: random and malformed arguments at every syscall, through the real kernel.

Two doors are fuzzed. The host channel, driven by hand: batches of crafted ops for every
name in ``syscall_table.TABLE`` (plus unknown names and malformed ops) with a valid
capability, including the replies that arrive later and the tool orders a host must answer.
And the syscall functions a program calls. Every answer must be a value or a typed error
(a subclass of LlmosError, never the bare "internal error" kind), and afterwards the kernel
still serves an ordinary call.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawhost import RawHost

from llmos_kernel import wire
from llmos_kernel.errors import LlmosError
from llmos_kernel.syscall_table import TABLE
from syscalls import fs, llm, memory, proc, tools


def _subclasses(cls: type) -> set[str]:
    return {name for sub in cls.__subclasses__() for name in {sub.__name__} | _subclasses(sub)}


TYPED = _subclasses(LlmosError)  # every typed error; the bare base marks an internal failure
LONG_WAITERS = {"proc.wait", "tools.call", "tools.ask"}  # may wait for a process or person
INTERESTING = ["", ".", "..", "../x", "/etc/passwd", "a/b.txt", "x\x00y", "%2e%2e", "~",
               "calculator", "delete_file", "read_file", "kernel", "test-driver", "r", "rw",
               "term", "kill", 0, 1, 2, -1, 2**31, 2**63, 1e308, float("nan"), True, b"\xff"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=24) | st.binary(max_size=24) | st.sampled_from(INTERESTING))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                          ["path", "name", "kind", "role", "content", "type"]), inner,
                          max_size=4), max_leaves=12)
plausible = (st.text("abcxyz019./_-", max_size=12) | st.integers(-2, 20) | st.booleans()
             | st.sampled_from(INTERESTING))
fields = plausible | plausible | values  # mostly the right shape, often the wrong kind

generation_spec = st.fixed_dictionaries({}, optional={
    "prompt": st.text(max_size=30) | values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(
        ["user", "system", "assistant", "tool", "x"]) | values, "content": values}),
        max_size=3) | values,
    "prompt_ids": st.lists(st.integers(-5, 60_000), max_size=6) | values,
    "params": st.fixed_dictionaries({"max_tokens": st.integers(-3, 4) | values}, optional={
        "temperature": values, "top_k": values, "top_p": values, "stop": values,
        "seed": values, "num_beams": st.integers(-1, 3)}) | values,
    "tools": values, "tool_choice": values, "response_format": values,
    "request_id": values, "keep_context": values, "context": values})

# Spawn specs carry no bytes here: test_a_spawn_spec_carrying_bytes_runs covers those.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**62, 2**62) | st.text(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4), max_leaves=12)
program = st.fixed_dictionaries({"kind": st.sampled_from(["module", "source", "pickle", "x"])
                                 | json_values}, optional={
    "ref": st.sampled_from(["syscall_agents:probe", "os:getcwd", "nope:nope"]) | json_values,
    "code": st.text(max_size=30), "attr": json_values})
spawn_spec = st.fixed_dictionaries({"program": program | json_values}, optional={
    key: json_values for key in ("args", "name", "priority", "quotas", "restart", "tools",
                                 "approval", "trap_exits", "host")})

tool_spec = st.fixed_dictionaries({"name": st.text(max_size=12) | values}, optional={
    "description": values, "parameters": st.just({"type": "object"}) | values,
    "dangerous": values, "timeout_s": st.floats(0, 2) | values})

SPECIAL = {("llm.generate", "spec"): generation_spec, ("proc.spawn", "spec"): spawn_spec,
           ("tools.register", "spec"): tool_spec,
           ("tools.call", "approval_timeout_s"): st.floats(-1, 0.5) | values,
           ("tools.ask", "approval_timeout_s"): st.floats(-1, 0.5) | values}


def _args(name: str) -> st.SearchStrategy:
    spec = TABLE[name]
    field = {k: SPECIAL.get((name, k), fields) for k in spec.required + spec.optional}
    known = st.fixed_dictionaries({k: field[k] for k in spec.required},
                                  optional={k: field[k] for k in spec.optional})
    with_extra = st.tuples(known, st.text(min_size=1, max_size=8), values).map(
        lambda t: {**t[0], t[1]: t[2]})
    return st.one_of(known, known, known, with_extra, values)


known_op = st.sampled_from(sorted(TABLE)).flatmap(lambda n: st.tuples(st.just(n), _args(n)))
op_strategy = st.one_of(known_op, known_op, known_op, known_op, known_op,
                        st.tuples(st.text(max_size=12) | values, values),
                        st.tuples(st.just("tools.result"), values))


class Fuzzer:
    """An attached process on a hand-driven host, re-attached if a fuzzed call ends it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.host = RawHost(kernel.handle, f"fuzz-{uuid.uuid4().hex[:8]}",
                            (kernel.state_dir / "root.token").read_text().strip())
        self.attach()
        self.outcomes: Counter[str] = Counter()  # "ok" or the error type, over every answer

    def attach(self) -> None:
        reply = self.kernel.call("attach", self.host.host_id, None)
        self.pid, self.capability = reply["pid"], reply["capability"]

    def run(self, calls: list[tuple[Any, Any]], handling: Any = None) -> list[dict]:
        """Send one batch; every answer (late ones included), each checked to be typed."""
        ops = [self.host.op(self.capability, name, args, handling) for name, args in calls]
        ops += [[self.host.call_id()], [self.host.call_id(), self.capability]]  # malformed
        names = {op[0]: op[2] if len(op) > 2 else None for op in ops}
        answers = self.host.batch(ops)
        assert set(answers) == set(names), answers
        waiting = {k: names[k] for k, v in answers.items() if "pending" in v}
        done = {k: v for k, v in answers.items() if "pending" not in v}
        deadline = time.monotonic() + 20
        while waiting and time.monotonic() < deadline:
            self._serve(self.host.poll(0.2))
            for item in self.host.items:
                if isinstance(item, wire.Reply) and item.call in waiting:
                    done[item.call] = self.host.result(item.result)
                    del waiting[item.call]
            self.host.items.clear()
            if set(waiting.values()) <= LONG_WAITERS and time.monotonic() > deadline - 15:
                break
        assert set(waiting.values()) <= LONG_WAITERS, waiting
        for result in done.values():
            _check_typed(result)
            self.outcomes[result["error"]["type"] if "error" in result else "ok"] += 1
            if "not valid" in result.get("error", {}).get("message", ""):
                self.attach()  # a fuzzed call ended this process: carry on as a new one
        self._cancel([v["ok"] for k, v in done.items()
                      if names[k] == "llm.generate" and isinstance(v.get("ok"), str)])
        return list(done.values())

    def _serve(self, items: list[dict]) -> None:
        """Answer tool orders with junk, deny approvals, and check streamed errors."""
        replies = []
        for item in items:
            if isinstance(item, wire.ToolCall):
                replies.append(self.host.op("", "tools.result", {
                    "call": item.call, "result": {"ok": item.args}}))
            if isinstance(item, wire.TokenDelta) and item.error is not None:
                _check_typed({"error": wire.to_builtins(item.error)})
        if replies:
            for result in self.host.batch(replies).values():
                _check_typed(result)
        for request in self.kernel.call("approvals"):
            if request["pid"] == self.pid:
                try:
                    self.kernel.call("decide", request["id"], False)
                except LlmosError:
                    pass  # it expired meanwhile

    def _cancel(self, request_ids: list[str]) -> None:
        """Stop the generations a fuzzed spec happened to start (they may run 256 tokens)."""
        cancels = [self.host.op(self.capability, "llm.cancel", {"request_id": i})
                   for i in request_ids]
        if cancels:
            for result in self.host.batch(cancels).values():
                _check_typed(result)


def _check_typed(result: Any) -> None:
    assert isinstance(result, dict) and len(result) == 1, result
    if "error" in result:
        error = result["error"]
        assert error["type"] in TYPED, f"untyped error: {error}"
        assert isinstance(error["message"], str) and error["message"]


@pytest.fixture(scope="module")
def fuzzer(kernel) -> Fuzzer:
    fuzzer = Fuzzer(kernel)
    yield fuzzer
    for child in kernel.call("ps"):
        if child["parent"] == fuzzer.pid and child["status"] != "exited":
            kernel.call("kill", child["pid"], "kill")


@settings(max_examples=400, suppress_health_check=list(HealthCheck))
@given(calls=st.lists(op_strategy, min_size=1, max_size=12),
       handling=st.none() | st.none() | values)
def test_the_host_channel_answers_every_fuzzed_call_with_a_value_or_a_typed_error(
        fuzzer, calls, handling):
    fuzzer.run(calls, handling)


def test_the_host_channel_refuses_malformed_batches_as_a_whole(kernel, fuzzer):
    host = fuzzer.host
    for ops in (None, "ops", 7, {"a": 1}, [None, 1, "x", [], {}], [[1, 2, 3, 4, 5]]):
        reply = host.send(msgspec.msgpack.encode([host.epoch, host.seq, ops, "exits", 5]))
        host.seq += 1
        assert reply.error is None or reply.error.type in TYPED, reply
    for bad_seq in (-1, "x", None, 2.5):
        reply = host.send(msgspec.msgpack.encode([host.epoch, bad_seq, [], [], {}]))
        assert reply.error is None or reply.error.type in TYPED, reply
    for data in (None, "batch", 7, [1, 2], b"\xc1", b"\x93\xa1e\x00\x90extra"):
        reply = host.send(data)
        assert reply.error is not None and reply.error.type == "InvalidArgument", reply
    host.epoch = ""  # renumber from a fresh resync


FUNCTIONS = {
    "fs.read": lambda a: fs.read(a[0], owner=a[1], offset=a[2] if isinstance(a[2], int) else 0),
    "fs.write": lambda a: fs.write(a[0], a[1]),
    "fs.append": lambda a: fs.append(a[0], a[1]),
    "fs.list": lambda a: fs.list(a[0], owner=a[1]),
    "fs.stat": lambda a: fs.stat(a[0]),
    "fs.mkdir": lambda a: fs.mkdir(a[0], parents=a[1]),
    "fs.rename": lambda a: fs.rename(a[0], a[1]),
    "fs.delete": lambda a: fs.delete(a[0], recursive=a[1]),
    "fs.versions": lambda a: fs.versions(a[0]),
    "fs.rollback": lambda a: fs.rollback(a[0], a[1]),
    "fs.grant": lambda a: fs.grant(a[0], a[1], a[2]),
    "fs.revoke": lambda a: fs.revoke(a[0], a[1]),
    "memory.add": lambda a: memory.add(a[0], a[1]),
    "memory.search": lambda a: memory.search(a[0], a[1], where=a[2]),
    "memory.get": lambda a: memory.get(a[0]),
    "memory.delete": lambda a: memory.delete(a[0]),
    "llm.tokenize": lambda a: llm.tokenize(a[0]),
    "llm.count": lambda a: llm.count(a[0], messages=a[1]),
    "llm.embed": lambda a: llm.embed(a[0]),
    "llm.chat": lambda a: llm.chat(a[0], tools=a[1], tool_choice=a[2], max_tokens=2),
    "llm.complete": lambda a: llm.complete(a[0], response_format=a[1], max_tokens=2),
    "tools.call": lambda a: tools.call(a[0], **(a[1] if isinstance(a[1], dict) else {})),
    "proc.kill": lambda a: proc.kill(a[0], a[1]),
    "proc.wait": lambda a: proc.wait(a[0], timeout=0.01),
    "llm.stream": lambda a: _drain(llm.stream(a[0], prompt=a[1], max_tokens=2)),
    "llm.release": lambda a: llm.release(a[0]),
    "memory.fit": lambda a: memory.fit(a[0], reserve=a[1], limit=a[2]),
    "tools.grant": lambda a: tools.grant(a[0], a[1]),
    "tools.revoke": lambda a: tools.revoke(a[0], a[1]),
}


async def _drain(stream) -> None:
    async for _ in stream:
        pass


@settings(max_examples=400, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(FUNCTIONS)),
       args=st.lists(values, min_size=3, max_size=3))
def test_the_syscall_functions_raise_only_typed_errors(kernel, name, args):
    async def attempt():
        try:
            await FUNCTIONS[name](args)
        except LlmosError as e:  # the bare base is what a kernel bug comes back as
            assert type(e).__name__ in TYPED, f"{name}: untyped error: {e}"
            assert str(e), f"{name}: a typed error without a message"

    kernel.run(attempt(), timeout=120)


def test_a_spawn_spec_carrying_bytes_runs(kernel):
    """Bytes are plain data on the wire (a pickled program is bytes): a spawn spec holding
    some must start its process, not fail inside the kernel."""
    async def scenario():
        pid = await proc.spawn("syscall_agents:probe", {"calls": [
            ["fs.write", {"path": "from-args.bin", "data": b"\x00\xff"}]]})
        return await proc.wait(pid, timeout=60)

    exit_ = kernel.run(scenario())
    assert exit_["reason"] == "normal" and "ok" in exit_["result"][0], exit_


def test_the_kernel_still_serves_after_the_fuzzing(kernel, fuzzer):
    print(f"\nhost channel fuzz: {sum(fuzzer.outcomes.values())} answers: "
          + ", ".join(f"{k} {v}" for k, v in fuzzer.outcomes.most_common()))

    async def normal():
        await fs.write("after-fuzz.txt", "still here")
        return (await fs.read_text("after-fuzz.txt"), await tools.call("calculator",
                                                                        expression="6 * 7"),
                await llm.count("still serving"),
                (await llm.chat([{"role": "user", "content": "Hi"}], max_tokens=2)).usage)

    text, answer, count, usage = kernel.run(normal())
    assert (text, answer) == ("still here", 42)
    assert count > 0 and usage["completion_tokens"] >= 1
    assert kernel.call("status")["processes"]["live"] >= 1
