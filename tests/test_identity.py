"""Identity: every syscall is served as the process whose capability came with it.

The test drives a host channel by hand (``rawhost.RawHost``) to present capabilities a
well-behaved host never would: forged ones, stale ones, and live ones of processes on other
hosts. Nothing a caller puts in the arguments can change who it is.
"""

from __future__ import annotations

import inspect
import secrets
import uuid

import pytest
import ray
from rawhost import RawHost

from llmos_kernel import wire
from syscalls import _context, fs, ipc, memory, proc, tools


@pytest.fixture(scope="module")
def token(kernel) -> str:
    return (kernel.state_dir / "root.token").read_text().strip()


@pytest.fixture(scope="module")
def intruder(kernel, token) -> tuple[RawHost, int, str]:
    """A process attached through a host the test steers by hand: (host, pid, capability)."""
    host = RawHost(kernel.handle, f"raw-{uuid.uuid4().hex[:8]}", token)
    attached = kernel.call("attach", host.host_id, f"intruder-{uuid.uuid4().hex[:6]}")
    return host, attached["pid"], attached["capability"]


@pytest.fixture(scope="module")
def others(kernel) -> list[dict]:
    """A live Whoami process on each shared agent host, with its identity."""
    hosts = kernel.call("status")["processes"]["shared_hosts"]

    async def start():
        found = []
        for host in hosts:
            pid = await proc.spawn("syscall_agents:Whoami", host=host)
            found.append((await ipc.call(pid, {"who": "?"}, timeout=60)).body)
        return found

    found = kernel.run(start())
    yield found
    for other in found:
        kernel.run(proc.kill(other["pid"]))


def _outcome(result: dict) -> str:
    return result["error"]["type"] if "error" in result else "ok"


def test_the_holder_of_a_capability_is_who_the_kernel_serves(intruder):
    host, pid, capability = intruder
    op = host.op(capability, "proc.self", {})
    result = host.batch([op])[op[0]]
    assert result["ok"]["pid"] == pid


@pytest.mark.parametrize("forged", [
    "random", "one-char-off", "", None, 12345, {"pid": 1}, ["cap"], "driver-pid-as-text"])
def test_a_forged_capability_is_refused(kernel, intruder, forged):
    host, _, capability = intruder
    made = {"random": secrets.token_urlsafe(24),
            "one-char-off": capability[:-1] + ("A" if capability[-1] != "A" else "B"),
            "driver-pid-as-text": str(kernel.pid)}
    presented = made.get(forged, forged) if isinstance(forged, str) else forged
    ops = [host.op(presented, name, args) for name, args in (
        ("proc.self", {}), ("fs.write", {"path": "forged.txt", "data": "x"}),
        ("memory.count", {}), ("tools.call", {"name": "calculator", "args": {"expression": "1"}}),
        ("llm.tokenize", {"text": "x"}))]
    results = host.batch(ops)
    assert {_outcome(results[op[0]]) for op in ops} == {"PermissionDenied"}


def test_a_host_cannot_use_the_capability_of_an_agent_on_another_host(kernel, intruder, others):
    host, _, _ = intruder
    driver_capability = kernel.run(_capability())
    for capability in [o["capability"] for o in others] + [driver_capability]:
        op = host.op(capability, "fs.list", {})
        result = host.batch([op])[op[0]]
        assert result["error"]["type"] == "PermissionDenied"
        assert "does not run on host" in result["error"]["message"]
    assert len({o["host"] for o in others}) == len(others) >= 2


async def _capability() -> str:
    return _context.runtime().capability


def test_a_host_cannot_pose_as_another_host(kernel, token, others):
    for host_id in {o["host"] for o in others}:
        for secret in (token, secrets.token_hex(16), None):
            reply = RawHost(kernel.handle, host_id, secret).batch([])
            assert reply["error"]["type"] == "PermissionDenied"
            poll = wire.decode_answer(ray.get(kernel.handle.host_poll.remote(host_id, 0.1,
                                                                             secret)))
            assert poll.error.type == "PermissionDenied"


def test_a_stale_capability_stops_working_when_its_process_restarts_or_exits(kernel, intruder):
    host, _, _ = intruder

    async def scenario():
        pid = await proc.spawn("syscall_agents:CrashOnce", {"notify": kernel.pid},
                               restart="transient")
        first = (await ipc.recv(sender=pid, timeout=60)).body
        second = (await ipc.call(pid, {"who": "?"}, timeout=60)).body
        await proc.kill(pid)
        await proc.wait(pid, timeout=60)
        return first, second

    first, second = kernel.run(scenario())
    assert first["pid"] == second["pid"] and first["capability"] != second["capability"]
    for stale in (first["capability"], second["capability"]):
        op = host.op(stale, "proc.self", {})
        result = host.batch([op])[op[0]]
        assert result["error"]["type"] == "PermissionDenied"
        assert "not valid" in result["error"]["message"]


@pytest.mark.parametrize("name,args", [
    ("fs.write", {"path": "x.txt", "data": "x", "pid": 1}),
    ("fs.read", {"path": "x.txt", "caller": 1}),
    ("memory.search", {"query": "x", "pid": 1}),
    ("memory.add", {"text": "x", "owner": 1}),
    ("tools.call", {"name": "calculator", "args": {"expression": "1"}, "as_pid": 1}),
    ("llm.generate", {"spec": {"prompt": "x"}, "priority": 100}),
    ("ipc.send", {"to": 1, "type": "dict", "payload": b"", "sender": 1}),
    ("proc.self", {"pid": 1}),
])
def test_no_argument_lets_a_caller_claim_another_identity(intruder, name, args):
    host, _, capability = intruder
    op = host.op(capability, name, args)
    result = host.batch([op])[op[0]]
    assert result["error"]["type"] == "InvalidArgument"
    assert "unknown argument" in result["error"]["message"]


def test_a_host_cannot_answer_a_tool_call_it_was_not_given(intruder):
    host, _, _ = intruder
    op = host.op("", "tools.result", {"call": secrets.token_hex(8), "result": {"ok": 1}})
    assert host.batch([op])[op[0]]["error"]["type"] == "NotFound"


@pytest.mark.parametrize("name", ["tools.result", "ipc.adopt"])
def test_a_program_cannot_make_its_hosts_own_calls(intruder, name):
    """Answering tool calls and handing messages over are for hosts: a call that carries a
    program's capability is refused."""
    host, _, capability = intruder
    op = host.op(capability, name, {"call": "x", "result": {"ok": 1}, "envelopes": []})
    result = host.batch([op])[op[0]]
    assert result["error"]["type"] == "PermissionDenied"
    assert "for agent hosts" in result["error"]["message"]


def test_a_host_cannot_hand_over_a_message_as_another_sender(kernel, intruder):
    """A host hands the kernel only messages whose id carries their sender's pid and that
    went to or from a process of its own."""
    host, pid, _ = intruder
    forged = [f"{kernel.pid}:x", kernel.pid, pid, "dict", b"\x80", None, None, None, 1.0, None]
    elsewhere = [f"{kernel.pid}:y", kernel.pid, kernel.pid, "dict", b"\x80", None, None, None,
                 1.0, None]
    for env in ([f"{pid}:z", *forged[1:]], elsewhere):
        op = host.op("", "ipc.adopt", {"envelopes": [env]})
        result = host.batch([op])[op[0]]
        assert result["error"]["type"] == "InvalidArgument", env


def test_an_agent_is_limited_to_its_tools_paths_memory_and_children(kernel):
    name = f"driver-only-{uuid.uuid4().hex[:6]}.txt"

    async def scenario():
        await fs.write(name, "for the driver's eyes")
        item = await memory.add("The driver's private memory.")
        child = await proc.spawn("syscall_agents:probe", {"calls": [
            ["tools.call", {"name": "read_file", "args": {"path": name}}],
            ["fs.read", {"path": name, "owner": kernel.pid}],
            ["memory.get", {"id": item["id"]}],
            ["proc.kill", {"pid": kernel.pid}],
            ["tools.call", {"name": "calculator", "args": {"expression": "2 ** 10"}}],
        ]}, tools=["calculator"])
        results = (await proc.wait(child, timeout=60))["result"]
        await memory.delete(item["id"])
        return results

    tool, path, mem, kill, allowed = kernel.run(scenario())
    assert tool["error"] == path["error"] == kill["error"] == "PermissionDenied"
    assert mem["error"] == "NotFound"
    assert allowed == {"ok": 1024}
    assert kernel.run(tools.call("calculator", expression="1 + 1")) == 2  # the driver is alive


def _remote_methods(cls) -> dict[str, inspect.Signature]:
    """Every method a Ray caller can invoke on an actor of ``cls`` (Ray's own ``__ray_*__``
    aside), with its signature."""
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, callable)
            if not name.startswith("_")}


def _anonymous_args(sig: inspect.Signature, credential: object, host_id: str) -> list:
    """Arguments a caller without a credential would send: a wrong one where the method
    wants a token or secret, a real host id where it wants one, plausible values elsewhere."""
    plausible = {"int": 1, "float": 0.1, "bool": True, "dict": {}, "list": [], "bytes": b""}
    args = []
    for name, param in list(sig.parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.KEYWORD_ONLY):
            continue
        if name in ("token", "secret"):
            args.append(credential)
        elif name == "host_id":
            args.append(host_id)
        elif param.default is not param.empty:
            args.append(param.default)
        else:
            kind = str(param.annotation).split(" |")[0]
            args.append(plausible.get(kind, "x"))
    return args


def _refused(call) -> str:
    """What came back from an anonymous call: the error type, or what it returned instead."""
    try:
        reply = ray.get(call, timeout=60)
    except ray.exceptions.RayTaskError as e:
        return type(e.cause).__name__ if e.cause is not None else repr(e)
    except ray.exceptions.GetTimeoutError:
        return "no answer within 60 s"
    if isinstance(reply, bytes):
        reply = wire.decode_answer(reply)
    error = getattr(reply, "error", None)
    return error.type if error is not None else f"answered: {reply!r}"[:200]


def test_no_actor_method_answers_an_anonymous_caller(kernel):
    """Every public method of the kernel, its model shard and its agent hosts, called by
    someone on the cluster who holds no credential (a wrong one, an empty one, none), is
    refused with PermissionDenied. The methods are enumerated, so a method added without a
    check fails here."""
    from actors.agent_host import _HostActor
    from actors.model_shard import ModelShard
    from llmos_kernel.kernel import Kernel

    host_id = kernel.call("status")["processes"]["shared_hosts"][0]
    actors = {"kernel": (kernel.handle, Kernel),
              "shard": (ray.get_actor(f"{kernel.name}-shard-0", namespace="llmos"), ModelShard),
              "host": (ray.get_actor(host_id, namespace="llmos"), _HostActor)}
    answered = {}
    for label, (handle, cls) in actors.items():
        methods = _remote_methods(cls)
        assert methods, f"no public methods found on {cls.__name__}"
        for name, sig in methods.items():
            for credential in ("not-the-token", "", None):
                got = _refused(getattr(handle, name).remote(
                    *_anonymous_args(sig, credential, host_id)))
                if got != "PermissionDenied":
                    answered[f"{label}.{name}({credential!r})"] = got
    assert not answered, f"methods that did not refuse an anonymous caller: {answered}"
    assert kernel.call("status")["name"] == kernel.name  # and the kernel serves its owner
