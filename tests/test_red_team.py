"""The red-team suite on a real kernel: hostile programs run as sandboxed agent processes
(``proc.spawn(..., sandbox=True)``) on a shared agent host, beside an ordinary agent.

Every attack must be refused by the OS with an error the program sees, or end the
attacker's process, and after each one the bystander on the same host still answers
and the kernel still serves. The harmless attacks (reads, signal 0, a connect) also run
unsandboxed, asserting they *work* there: the README's list of what ``sandbox=False``
does not protect is what this test shows. The same escapes are tried model-free, child by
child, in tests/security; the programs are tests/agents/attacks.py.
"""

from __future__ import annotations

import socket
import threading

import attacks
import pytest
from workers import Cmd

from syscalls import ipc, proc

pytestmark = pytest.mark.usefixtures("sandbox_available")


@pytest.fixture(scope="module")
def listener():
    """A TCP port on loopback that accepts connections (and so proves one was made)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.fixture(scope="module")
def arena(kernel, listener):
    """The shared host the attackers run on, a bystander there, and what attacks need."""
    status = kernel.call("status")
    host = status["processes"]["shared_hosts"][0]
    bystander = kernel.run(proc.spawn("workers:Commanded", host=host))
    return {"host": host, "bystander": bystander, "kernel_pid": status["pid"],
            "state_dir": str(kernel.state_dir), "kernel_name": kernel.name,
            "port": listener[0]}


# name -> (arguments from the arena, what the sandbox must do: "refused" or "killed")
ATTACKS = {
    "read_root_token": (("state_dir",), "refused"),
    "read_kernel_environ": (("kernel_pid",), "refused"),
    "list_command_lines": ((), "refused"),
    "write_state_dir": (("state_dir",), "refused"),
    "reach_ray": (("kernel_name",), "refused"),
    "open_socket": (("port",), "refused"),
    "run_subprocess": ((), "refused"),
    "signal_kernel": (("kernel_pid",), "refused"),
    "stop_host": ((), "refused"),
    "ptrace_kernel": (("kernel_pid",), "refused"),
    "fork_bomb": ((), "refused"),
    "symlink_out_of_scratch": (("state_dir",), "refused"),
    "memory_bomb": ((), "killed"),
    "forge_frames": ((), "killed"),
}
HARMLESS = ["read_root_token", "read_kernel_environ", "list_command_lines", "reach_ray",
            "open_socket", "run_subprocess", "signal_kernel"]


def _attack(kernel, arena, name: str, sandbox: bool) -> dict:
    needs, _ = ATTACKS[name]
    args = {k: arena[k] for k in needs}

    async def go():
        pid = await proc.spawn(f"attacks:{name}", args, sandbox=sandbox, scratch=sandbox,
                               host=arena["host"],
                               quotas={"memory_bytes": 512 << 20} if sandbox else None)
        exit_ = await proc.wait(pid, timeout=120)
        ping = await ipc.call(arena["bystander"], Cmd("ping"), timeout=60)
        return exit_, ping.body.text
    return kernel.run(go())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_attack_fails_sandboxed_and_everyone_else_keeps_serving(kernel, arena, name):
    exit_, ping = _attack(kernel, arena, name, sandbox=True)
    expected = ATTACKS[name][1]
    if expected == "refused":
        assert exit_["reason"] == "normal", exit_
        assert exit_["result"]["escaped"] is False, exit_["result"]
        assert exit_["result"].get("error"), exit_["result"]
    else:
        assert exit_["reason"] != "normal", exit_
    assert ping.startswith("ping from")  # the agent beside it, on the same host, answers
    assert kernel.call("status")["name"] == kernel.name


@pytest.mark.parametrize("name", HARMLESS)
def test_without_the_sandbox_the_harmless_attacks_work(kernel, arena, listener, name):
    """What sandbox=False does not protect (the README says so): each of these reads,
    probes or connects successfully from an ordinary agent process."""
    connected = len(listener[1])
    exit_, _ = _attack(kernel, arena, name, sandbox=False)
    assert exit_["reason"] == "normal", exit_
    assert exit_["result"]["escaped"] is True, exit_["result"]
    if name == "open_socket":
        assert len(listener[1]) > connected


def test_attack_programs_are_the_ones_listed():
    """A new attack in tests/agents/attacks.py must be listed here (and so run)."""
    defined = {n for n, f in vars(attacks).items()
               if callable(f) and not n.startswith("_") and f.__module__ == attacks.__name__}
    assert defined == set(ATTACKS)
