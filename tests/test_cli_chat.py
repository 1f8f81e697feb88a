"""``llmos chat`` on the session's kernel, driven in a real pseudo-terminal with pexpect.

Shell commands run directly; a question streams an answer from the resident assistant;
requests that need a tool write a file the shell then reads and switch on a light of the
demo house; a dangerous call (killing a process) waits in the kernel's approval queue and
the shell asks inline, and the answer decides whether the process dies; Ctrl-C stops a reply in the kernel, not the shell;
``--once`` runs one line for scripts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pexpect
import pytest
import ray

from demos.smart_home import GetState
from syscalls import ipc, proc

INPUT_DONE = "\x1b[?2004l"  # prompt_toolkit leaves bracketed paste: the line was accepted
PROMPT_READY = "\x1b[?2004h"  # and enters it again for the next prompt


def _command(kernel, *args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1",
           "LLMOS_HOME": str(kernel.state_dir / "chat-home")}
    return [sys.executable, "-m", "llmos_kernel.cli", "chat", "--kernel", kernel.name,
            "--state-dir", str(kernel.state_dir), *args], env


class Chat:
    """One ``llmos chat`` in a pseudo-terminal: send a line, get what it printed."""

    def __init__(self, kernel, *args: str):
        command, env = _command(kernel, *args)
        self.child = pexpect.spawn(command[0], command[1:], env=env, encoding="utf-8",
                                   timeout=240, dimensions=(50, 200))
        # what the terminal showed, for a failing test: kernel-state*/chat-transcript.txt
        self.child.logfile_read = open(kernel.state_dir / "chat-transcript.txt", "a")  # noqa: SIM115
        self.child.expect("llmos chat: assistant")
        self.child.expect_exact(PROMPT_READY)

    def line(self, text: str, timeout: float = 240) -> str:
        """Send a line; its output once the next prompt is up."""
        self.child.sendline(text)
        self.child.expect_exact(INPUT_DONE, timeout=30)
        self.child.expect_exact(PROMPT_READY, timeout=timeout)
        return self.child.before

    def close(self) -> int:
        self.child.sendeof()
        self.child.expect(pexpect.EOF, timeout=60)
        self.child.close()
        return self.child.exitstatus

    def end(self) -> None:
        """Hang up if still running (the shell leaves as a process on SIGHUP)."""
        if self.child.isalive():
            self.child.kill(signal.SIGHUP)
            self.child.expect(pexpect.EOF, timeout=60)
        self.child.logfile_read.close()


@pytest.fixture
def chat(kernel):
    session = Chat(kernel)
    yield session
    session.end()


def _status(kernel, name: str) -> str:
    return {p["name"]: p for p in kernel.call("ps", True)}[name]["status"]


def _tokens_used(kernel, name: str) -> int:
    return {p["name"]: p for p in kernel.call("ps", False)}[name]["tokens_used"]


def _sleeper(kernel) -> tuple[int, str]:
    name = f"sleeper-{uuid.uuid4().hex[:6]}"
    return kernel.run(proc.spawn("workers:idle", name=name)), name


def test_shell_commands_run_directly_and_history_is_kept(kernel, chat):
    pid, name = _sleeper(kernel)
    listing = chat.line("ps")
    assert name in listing and "assistant" in listing and "chat-" in listing
    assert "kill PID|NAME" in chat.line("help")
    assert "conversation.json" in chat.line("ls")  # the assistant's home
    chat.line(f"kill {name}")
    assert kernel.call("wait", pid, 30)["reason"] == "killed"
    assert "NotFound" in chat.line("cat no-such-file.txt")  # a typed error; the shell goes on
    assert "llmos top" in chat.line("top")
    shell = next(p for p in kernel.call("ps", False) if (p["name"] or "").startswith("chat-"))
    assert chat.close() == 0
    assert kernel.call("wait", shell["pid"], 10)["reason"] == "killed"  # it left at once
    history = (kernel.state_dir / "chat-home" / "chat_history").read_text()
    assert f"+kill {name}" in history and "+ps" in history


def test_a_question_streams_an_answer(chat):
    chat.line("reset")
    answer = chat.line("What is the capital of France?")
    assert "Paris" in answer
    assert "[" not in answer  # answered in words: no tool was called


def test_requests_for_tools_write_a_file_and_switch_a_light(kernel, chat):
    out = chat.line("write hello to notes.txt")
    assert '[write_file(path="notes.txt", content="hello")] ->' in out
    assert chat.line("cat notes.txt").strip() == "hello"

    out = chat.line("turn on the kitchen light")
    assert 'room="kitchen"' in out and "] ->" in out  # a tool of demos.smart_home
    procs = kernel.call("ps", False)
    assistant = next(p["pid"] for p in procs if p["name"] == "assistant")
    devices = next(p["pid"] for p in procs
                   if p["parent"] == assistant and p["program"] == "Devices")
    state = kernel.run(ipc.call(devices, GetState("kitchen"), timeout=30)).body
    assert state.rooms["kitchen"]["light"]["on"] is True


def test_a_dangerous_call_asks_inline_and_the_answer_decides(kernel, chat):
    pid, name = _sleeper(kernel)
    chat.child.sendline(f"kill the process named {name}")
    chat.child.expect(rf"kill process {name}\? \[y/N\]")
    pending = kernel.call("approvals")  # the kernel's queue: llmos approvals sees it too
    assert {"tool": "kill_process", "args": {"process": name}} in [
        {"tool": a["tool"], "args": a["args"]} for a in pending]
    chat.child.sendline("n")
    chat.child.expect("denied")
    chat.child.expect_exact(PROMPT_READY)
    time.sleep(1)
    assert _status(kernel, name) == "running"

    chat.child.sendline(f"kill the process named {name}")
    chat.child.expect(rf"kill process {name}\? \[y/N\]")
    chat.child.sendline("y")
    chat.child.expect(rf'\[kill_process\(process="{name}"\)\] ->')
    chat.child.expect_exact(PROMPT_READY)
    assert kernel.call("wait", pid, 30)["reason"] == "killed"
    assert not [a for a in kernel.call("approvals") if a["args"] == {"process": name}]


def test_ctrl_c_cancels_the_generation_in_the_kernel_not_the_shell(kernel):
    chat = Chat(kernel, "--max-tokens", "1000")
    try:
        chat.line("reset")
        chat.child.sendline("Write a very long story about a dragon who learns to fly.")
        chat.child.expect_exact(INPUT_DONE, timeout=30)
        chat.child.expect(r"\w+ \w+ \w+", timeout=240)  # words are streaming in
        assert kernel.call("status")["queues"]["running"] >= 1
        chat.child.sendintr()
        chat.child.expect(r"\(cancelled\)", timeout=120)
        chat.child.expect_exact(PROMPT_READY, timeout=30)
        queues = kernel.call("status")["queues"]
        assert queues["running"] == queues["waiting"] == 0  # the request left the engine
        used = _tokens_used(kernel, "assistant")
        time.sleep(2)
        assert _tokens_used(kernel, "assistant") == used  # and generates no more
        assert "assistant" in chat.line("ps")  # the shell lives on
        assert chat.close() == 0
    finally:
        chat.end()


def test_once_runs_one_line_and_denies_dangerous_calls_without_yes(kernel):
    pid, name = _sleeper(kernel)
    command, env = _command(kernel)

    def once(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True,
                              check=False, timeout=300, stdin=subprocess.DEVNULL)

    listed = once("--once", "ps")
    assert listed.returncode == 0 and name in listed.stdout
    refused = once("--once", f"kill the process named {name}")
    assert f"kill process {name}? [y/N] n" in refused.stdout, refused.stdout + refused.stderr
    assert refused.returncode == 1  # the call failed: a script can tell
    assert _status(kernel, name) == "running"
    allowed = once("--yes", "--once", f"kill the process named {name}")
    assert "y (--yes)" in allowed.stdout and allowed.returncode == 0, allowed.stdout
    assert f'[kill_process(process="{name}")] ->' in allowed.stdout, allowed.stdout
    assert kernel.call("wait", pid, 30)["reason"] == "killed"
    missing = once("--once", "cat no-such-file.txt")
    assert missing.returncode == 1 and "NotFound" in missing.stdout
