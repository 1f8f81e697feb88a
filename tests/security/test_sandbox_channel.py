"""A sandboxed program still has its whole syscall API: calls and typed errors, streamed
LLM output, messages in and acknowledgements out, tools, output, kill; programs load as
module, source or pickle, exactly as in a host. It holds no capability and no Ray."""

from __future__ import annotations

import asyncio
import os

import pytest

from actors import sandbox_protocol as protocol
from actors.sandbox import Sandbox, launch
from llmos_kernel import wire
from llmos_kernel.messages import Envelope, new_message_id
from security.harness import FakeHost, program, run, until


def test_a_syscall_reaches_the_host_and_its_answer_comes_back():
    host = FakeHost({"llm.tokenize": lambda args: [len(args["text"]), 7]})
    got = run("""
        from syscalls import llm
        async def main(text):
            return await llm.tokenize(text)
    """, {"text": "hello"}, host=host)
    assert got.ok and got.result == [5, 7]
    assert host.calls == [("llm.tokenize", {"text": "hello"}, None)]


def test_a_refused_syscall_raises_the_same_typed_error_in_the_program():
    got = run("""
        from llmos_kernel.errors import NotFound
        from syscalls import proc
        async def main():
            try:
                await proc.self()
            except NotFound as e:
                return f"NotFound: {e}"
    """)
    assert got.result == "NotFound: the fake host has no syscall 'proc.self'"


def test_llm_chat_streams_the_deltas_the_host_pushes():
    async def scenario():
        host = FakeHost()
        box = Sandbox(host, 7, program("""
            from syscalls import llm
            async def main():
                out = await llm.chat([{"role": "user", "content": "hi"}], max_tokens=4)
                return [out.text, out.finish_reason, out.token_ids]
        """))

        def generate(args):
            rid = args["spec"]["request_id"]
            box.push(wire.TokenDelta(7, rid, [1, 2], "Hel"))
            box.push(wire.TokenDelta(7, rid, [3], "lo", finished=True, finish_reason="stop",
                                     usage=wire.Usage(prompt_tokens=3, completion_tokens=3)))

        host.answers["llm.generate"] = generate
        await box.start()
        return await box.wait()

    report = asyncio.run(scenario())
    assert report.reason == "normal" and report.result == ["Hello", "stop", [1, 2, 3]]


def test_a_behaviour_receives_pushed_messages_and_its_replies_are_acknowledged():
    async def scenario():
        host = FakeHost()
        box = Sandbox(host, 7, program("""
            class Agent:
                def init(self):
                    self.seen = []
                def on_message(self, msg):
                    self.seen.append(msg.body["n"])
                    if len(self.seen) == 2:
                        self.stopped, self.result = True, self.seen
                    return {"doubled": msg.body["n"] * 2}
        """))
        await box.start()
        for n in (1, 2):
            env = Envelope.new({"n": n}, sender=3, receiver=7, reply_to="call")
            box.push(wire.Deliver(7, env.to_wire()))
        return await box.wait(), host

    report, host = asyncio.run(scenario())
    assert report.reason == "normal" and report.result == [1, 2]
    replies = [reply for _, reply in host.acks]
    assert [r["to"] for r in replies] == [3, 3] and all(r["payload"] for r in replies)


def test_a_child_given_a_message_is_expected_to_answer_until_it_does():
    """The host holds its next batch briefly for a child it just handed a message (its
    ack, and what its handler sends, come back soon: they should share one Ray call), and
    stops expecting it at the child's next frame."""
    async def scenario():
        expected: list[bool] = []
        host = FakeHost()
        box = Sandbox(host, 7, program("""
            class Agent:
                def on_message(self, msg):
                    self.stopped, self.result = True, msg.body["n"]
        """), expect=expected.append)
        await box.start()
        env = Envelope.new({"n": 5}, sender=3, receiver=7)
        box.push(wire.Deliver(7, env.to_wire()))
        seen_at_push = list(expected)
        return await box.wait(), host, seen_at_push, expected

    report, host, at_push, expected = asyncio.run(scenario())
    assert report.reason == "normal" and report.result == 5
    assert at_push == [True] and host.acks
    assert expected[:2] == [True, False]  # cleared by the ack that came back


def test_a_behaviours_own_call_gets_its_reply_even_when_it_arrives_before_the_send_ok():
    """The reply to a call the behaviour's background task made may reach the child before
    the answer to the send itself (the host pushes chunk items before batch results): the
    behaviour's receive loop must leave it to the call, not hand it to on_message."""
    async def scenario():
        box = None

        def send(args):
            sent_id = f"7:{args.get('id') or new_message_id()}"  # as a host names it
            reply = Envelope.new({"answer": 42}, sender=3, receiver=7, correlation_id=sent_id)
            box.push(wire.Deliver(7, reply.to_wire()))  # down the socket before the answer
            stop = Envelope.new({"stop": True}, sender=3, receiver=7)
            asyncio.get_running_loop().call_later(0.5, box.push, wire.Deliver(7, stop.to_wire()))
            return {"id": sent_id, "to": 3}

        host = FakeHost({"ipc.send": send})
        box = Sandbox(host, 7, program("""
            import asyncio
            from syscalls import ipc

            class Agent:
                def init(self):
                    self.handled, self.reply = [], None
                    asyncio.get_running_loop().create_task(self.ask())
                async def ask(self):
                    self.reply = (await ipc.call(3, {"q": 1}, timeout=5)).body
                def on_message(self, msg):
                    if msg.body == {"stop": True}:
                        self.stopped = True
                        self.result = {"reply": self.reply, "handled": self.handled}
                    else:
                        self.handled.append(msg.body)
        """))
        await box.start()
        try:
            return await asyncio.wait_for(box.wait(), 30)
        finally:
            await box.close()

    report = asyncio.run(scenario())
    assert report.reason == "normal", report
    assert report.result == {"reply": {"answer": 42}, "handled": []}


def test_tools_run_in_the_child_and_one_it_never_answered_fails_when_it_exits():
    async def scenario():
        host = FakeHost({"tools.register": lambda args: None})
        box = Sandbox(host, 7, program('''
            import asyncio
            from syscalls import tools
            @tools.tool
            def shout(text: str) -> str:
                """Shout it."""
                return text.upper()
            @tools.tool
            async def ponder(topic: str) -> str:
                """Think forever."""
                await asyncio.sleep(3600)
            async def main():
                await tools.register(shout)
                await tools.register(ponder)
                await asyncio.sleep(3600)
        '''))
        await box.start()
        await until(lambda: len(host.calls) == 2 or not box.alive, "tools.register")
        box.push(wire.ToolCall("t1", 7, "shout", {"text": "hi"}))
        box.push(wire.ToolCall("t2", 7, "ponder", {"topic": "life"}))
        await until(lambda: "t1" in host.tool_results, "the tool's result")
        await box.kill(grace_s=0.5)
        return host.tool_results

    results = asyncio.run(scenario())
    assert results["t1"] == wire.ok("HI")
    assert results["t2"].error.type == "Unavailable"
    assert "exited before it answered" in results["t2"].error.message


def test_a_result_that_cannot_be_encoded_still_ends_in_an_exit_report():
    got = run(r'''
        def main():
            return "half a surrogate: \ud800"
    ''')
    assert got.ok and got.result == "half a surrogate: ?"


def test_output_goes_to_the_host_and_kill_runs_the_terminate_hook():
    async def scenario():
        host = FakeHost()
        box = Sandbox(host, 7, program("""
            class Agent:
                def init(self):
                    print("started")
                def on_message(self, msg):
                    pass
                def terminate(self, reason):
                    print("terminating:", reason)
        """))
        await box.start()
        await until(lambda: "started" in host.text, "the program's output")
        return await box.kill(grace_s=2.0), host.text

    report, text = asyncio.run(scenario())
    assert report.reason == "killed"
    assert text == "started\nterminating: killed\n"


def test_a_module_program_loads_from_where_the_host_found_it():
    # tests/agents is on the test process's sys.path, not on the child's: the child is told
    # where this one module lives, and reads nothing else of that directory
    host = FakeHost()
    box = Sandbox(host, 7, wire.Program("module", ref="syscall_agents:identity"))

    async def scenario():
        await box.start()
        return await box.wait()

    report = asyncio.run(scenario())
    assert report.reason == "normal", report.error
    assert report.result["pid"] == 7 and report.result["host"] == "sandbox"
    assert report.result["capability"] == ""  # the host holds it; the child never sees it
    assert "capability" not in protocol.Start.__struct_fields__


def test_a_pickled_function_runs_without_ray():
    cloudpickle = pytest.importorskip("cloudpickle")  # what ray.cloudpickle vendors

    def double(x):
        import sys
        return [x * 2, "ray._raylet" in sys.modules]

    async def scenario():
        box = Sandbox(FakeHost(), 7, wire.Program("pickle", data=cloudpickle.dumps(double)),
                      {"x": 21})
        await box.start()
        return await box.wait()

    report = asyncio.run(scenario())
    assert report.reason == "normal" and report.result == [42, False]


def test_ray_is_absent_and_says_why():
    got = run("""
        import ray
        def main():
            ray.init()
    """)
    assert got.error == "AttributeError" and "not available in a sandboxed process" in got.message


def test_threads_work_in_the_sandbox():
    got = run("""
        import asyncio, threading
        from concurrent.futures import ThreadPoolExecutor
        async def main():
            seen = []
            t = threading.Thread(target=lambda: seen.append("thread"))
            t.start(); t.join()
            seen.append(await asyncio.to_thread(lambda: "to_thread"))
            with ThreadPoolExecutor(4) as pool:
                seen += list(pool.map(str, range(4)))
            return seen
    """)
    assert got.result == ["thread", "to_thread", "0", "1", "2", "3"]


def test_a_spare_launched_ahead_starts_confined_and_an_unused_one_is_discarded():
    async def scenario():
        spare = launch()
        box = Sandbox(FakeHost(), 7, program("""
            def main():
                try:
                    open("/etc/passwd").read()
                except PermissionError:
                    return "confined"
        """))
        await box.start(spare)
        return await box.wait()

    assert asyncio.run(scenario()).result == "confined"
    unused = launch()
    unused.close()
    assert unused.process.returncode is not None and not os.path.exists(unused.dir)
