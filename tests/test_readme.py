"""The README's commands, run as written, in the order it shows them.

Every line of every ``bash`` block after the first (the two set-up commands: CI runs the
second through ``.ci/run``, and the first ends in ``llmos demo``, whose demos each have a
test of their own) is run here against a kernel the README's own ``llmos kernel start``
starts in this session's Ray cluster, with its state in a temporary directory
(``LLMOS_STATE_DIR``). ``llmos`` commands go through the same click entry point as the
executable; the interactive ones (``llmos top``, ``llmos chat`` without ``--once``) run in a
real pseudo-terminal; ``llmos serve`` runs as its own process for the ``curl`` after it.
The one placeholder, ``ID`` (an approval id), is taken from the output of the
``llmos approvals`` before it. The ``python`` blocks compile, and the greeter and the files
and memory ones run as programs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import ray
from click.testing import CliRunner

from llmos_kernel.cli import main

README = Path(__file__).parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README.read_text(),
                      flags=re.DOTALL | re.MULTILINE)


def commands() -> list[list[str]]:
    """Each command of the bash blocks after the set-up one, as argv."""
    out = []
    for block in blocks("bash")[1:]:
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                out.append(argv)
    return out


def test_the_readme_opens_with_the_two_setup_commands():
    setup = blocks("bash")[0].strip().splitlines()
    assert len(setup) == 2 and setup[0].endswith("llmos demo") and setup[1].endswith("pytest -q")


def test_python_blocks_compile():
    for code in blocks("python"):
        compile(code, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


class Shell:
    """Runs README commands against the kernel the README starts."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env
        self.last_out = ""
        self.background: list[subprocess.Popen] = []

    def run(self, argv: list[str]) -> str:
        if argv[0] == "llmos" and argv[1:2] == ["top"] or argv[:2] == ["llmos", "chat"] and \
                "--once" not in argv:
            return self.in_terminal(argv, keys=b"q" if argv[1] == "top" else b"exit\r")
        if argv[:2] == ["llmos", "chat"]:  # attaches as a process: its own, as a user's shell
            return subprocess.run([sys.executable, "-m", "llmos_kernel.cli", *argv[1:]],
                                  env=self.env, cwd=self.cwd, capture_output=True, text=True,
                                  check=True, timeout=300).stdout
        if argv[:2] == ["llmos", "serve"]:
            return self.serve(argv)
        if argv[0] == "curl":
            return self.curl(argv)
        assert argv[0] == "llmos", f"the README shows a command this test cannot run: {argv}"
        if "ID" in argv:
            approval_id = self.last_out.split()[0]
            argv = [approval_id if a == "ID" else a for a in argv]
        deadline = time.monotonic() + 300
        while True:
            out = self.invoke(argv[1:])
            if argv[1:] != ["approvals"] or out.strip() or time.monotonic() > deadline:
                break
            time.sleep(1)  # the model has not asked yet
        self.last_out = out
        return out

    def invoke(self, args: list[str]) -> str:
        runner = CliRunner()
        old = os.getcwd()
        os.chdir(self.cwd)
        try:
            result = runner.invoke(main, args, env=self.env, catch_exceptions=False)
        finally:
            os.chdir(old)
        assert result.exit_code == 0, f"llmos {shlex.join(args)} failed:\n{result.output}"
        return result.stdout

    def in_terminal(self, argv: list[str], keys: bytes) -> str:
        import pexpect

        child = pexpect.spawn(sys.executable, ["-m", "llmos_kernel.cli", *argv[1:]],
                              env={**self.env, "COLUMNS": "160", "LINES": "40"},
                              cwd=str(self.cwd), timeout=120)
        child.expect("PID|pid|llmos>")  # the live view, or the shell's prompt
        child.send(keys)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        return child.before.decode(errors="replace")

    def serve(self, argv: list[str]) -> str:
        port = int(argv[argv.index("--port") + 1])
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port}, which the README's llmos serve uses, is taken")
        server = subprocess.Popen([sys.executable, "-m", "llmos_kernel.cli", *argv[1:]],
                                  env=self.env, cwd=self.cwd, stderr=subprocess.PIPE, text=True)
        self.background.append(server)
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                return ""
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "llmos serve never answered"
                time.sleep(0.3)

    def curl(self, argv: list[str]) -> str:
        if shutil.which("curl"):
            return subprocess.run(argv, capture_output=True, text=True, check=True,
                                  cwd=self.cwd).stdout
        url = argv[-1] if argv[-1].startswith("http") else f"http://{argv[-1]}"
        return httpx.get(url, timeout=10).text  # the same GET where curl is not installed

    def close(self) -> None:
        for server in self.background:
            server.terminate()
            server.wait(30)


def test_every_command_runs_as_written(kernel, tmp_path):
    """The tour from ``llmos kernel start`` to ``llmos kernel stop``, checking what each
    command says it does."""
    (tmp_path / "greeter.py").write_text(blocks("python")[0])
    (tmp_path / "demos").symlink_to(README.parent / "demos")  # as in the repository's root
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "LLMOS_STATE_DIR": str(tmp_path / "state"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    shell = Shell(tmp_path, env)
    said: dict[str, str] = {}
    try:
        for argv in commands():
            started = time.monotonic()
            said[shlex.join(argv)] = shell.run(argv)
            print(f"{time.monotonic() - started:6.1f}s  {shlex.join(argv)}")
    finally:
        shell.close()
        from llmos_kernel.launcher import stop_kernel

        stop_kernel("kernel")  # where a command failed before the README's own stop
    assert "is running" in said["llmos kernel start"]
    run = next(v for k, v in said.items() if k.startswith("llmos run greeter.py --arg"))
    assert '"reason": "normal"' in run
    assert "greeter" in said["llmos ps"]
    assert "kv pool" in said["llmos kernel status"]
    assert "approved" in next(v for k, v in said.items() if k.startswith("llmos approve "))
    models = said["curl -s localhost:8000/v1/models"]
    assert json.loads(models)["data"][0]["object"] == "model"
    assert "stopped" in said["llmos kernel stop"]


def test_files_and_memory_snippet_runs_as_a_program(kernel, tmp_path):
    from syscalls import proc

    code = next(b for b in blocks("python") if "memory.search" in b)
    program = tmp_path / "snippet.py"
    program.write_text("async def main():\n" + textwrap.indent(code, "    ") +
                       "\n    return {'hits': hits, 'text': await fs.read_text('notes/today.md')}\n")
    pid = kernel.run(proc.spawn(str(program)))
    exit_ = kernel.run(proc.wait(pid, timeout=120), timeout=180)
    assert exit_["reason"] == "normal", exit_
    assert "green tea" in exit_["result"]["hits"][0]["text"]
    assert exit_["result"]["text"] == "tea at four"  # rolled back
