"""``llmos chat``: an interactive natural-language shell on a running kernel.

A line that reads as a shell command runs at once, with no model: ``ps``, ``kill`` and
``top`` are ``llmos ps``, ``llmos kill`` and ``llmos top --once`` themselves (same click
commands, same options); ``run PROGRAM key=value ...`` takes ``llmos run``'s options, spawns
the same way and waits for the exit (Ctrl-C stops the waiting); ``ls`` and ``cat`` read the
assistant's home, where its file tools write (it grants the shell read access while the
shell lives); ``reset``, ``help``, ``exit``. Anything else, a command with words it does not
take (``kill the sleeper``), or a line that starts with ``?`` goes to the resident assistant
(``llmos_kernel.cli.assistant``): its answer streams back token by token, or the tool call it
made is shown with its result.

The shell is a process of its own (``syscalls.attach``); it finds the assistant by name or
spawns it as a top-level permanent process through the driver API, as ``llmos run`` does,
so it outlives the shell and keeps its conversation for the next one.

The shell offers the assistant a dangerous ``kill_process`` tool: it runs here, with the
person's root token, and only once the person approves. Every dangerous call waits in the
kernel's approval queue (so ``llmos approvals`` and the console see it too); while a reply is
in progress the shell watches that queue for the assistant's requests and asks inline ("kill
process 12? [y/N]"), deciding through the ``decide`` call ``llmos approve`` uses. With
``--once`` a dangerous call is denied unless ``--yes``, and the exit status is 1 if the line
failed (an error, or a tool call that failed or was denied).

Ctrl-C during a reply sends ``Cancel``; the assistant leaves its streaming loop, which
cancels the engine's request, and confirms with ``Done``; the shell prints "^C (cancelled)"
and prompts again. Line editing and history (``$LLMOS_HOME/chat_history``) come from
prompt_toolkit when stdin is a terminal; otherwise lines are read plainly, one per line
(a dangerous call's question then reads the next line).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import termios
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from llmos_kernel.cli.kernel import state_dir_option
from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    LlmosError,
    NoSuchProcess,
    Timeout,
)

ASSISTANT_PROGRAM = "llmos_kernel.cli.assistant:main"
PROMPT = "llmos> "
APPROVAL_POLL_S = 0.3
CANCEL_WAIT_S = 60.0
HELLO_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Syntax:
    """How a shell command reads: its positional words and which flags it takes."""

    min_words: int
    max_words: int | None
    flags: frozenset[str] = frozenset()
    valued: frozenset[str] = frozenset()  # flags that take the next word as their value
    pairs: bool = False  # positional words after the first must be key=value
    help: str = ""


def _syntax(lo: int, hi: int | None, help_: str, flags: str = "", valued: str = "",
            pairs: bool = False) -> Syntax:
    return Syntax(lo, hi, frozenset(flags.split()), frozenset(valued.split()), pairs, help_)


COMMANDS: dict[str, Syntax] = {
    "ps": _syntax(0, 0, "ps [--all]: the processes", "--all --json"),
    "kill": _syntax(1, 1, "kill PID|NAME [--force]: stop a process", "--force"),
    "ls": _syntax(0, 1, "ls [PATH]: the assistant's files"),
    "cat": _syntax(1, 1, "cat PATH: print one of the assistant's files"),
    "run": _syntax(1, None, "run PROGRAM [key=value ...] [--name N] [--detach]: start a "
                   "program and wait for its exit (Ctrl-C stops waiting)", "--detach",
                   "--name --priority --restart --arg", pairs=True),
    "top": _syntax(0, 0, "top: one snapshot of the kernel (llmos top --once)", "--json",
                   "--sort"),
    "reset": _syntax(0, 0, "reset: the assistant forgets the conversation"),
    "help": _syntax(0, 0, "help: this list"),
    "exit": _syntax(0, 0, "exit (or quit, Ctrl-D): leave the shell"),
    "quit": _syntax(0, 0, ""),
}


@dataclass
class Line:
    """A parsed input line: a shell command and its words, or a question (command None)."""

    text: str
    command: str | None = None
    words: list[str] = field(default_factory=list)


def parse_line(text: str) -> Line:
    """A command if the line reads as one of COMMANDS with its syntax, else a question."""
    text = text.strip()
    if text.startswith("?"):
        return Line(text[1:].strip())
    try:
        words = shlex.split(text)
    except ValueError:
        return Line(text)
    if not words or words[0] not in COMMANDS:
        return Line(text)
    syntax, positional, rest = COMMANDS[words[0]], [], words[1:]
    while rest:
        word = rest.pop(0)
        flag = word.split("=", 1)[0]
        if flag in syntax.valued and "=" not in word:
            if not rest:
                return Line(text)
            rest.pop(0)
        elif word.startswith("-") and flag not in syntax.flags | syntax.valued:
            return Line(text)
        elif not word.startswith("-"):
            if syntax.pairs and positional and "=" not in word:
                return Line(text)
            positional.append(word)
    if len(positional) < syntax.min_words or (
            syntax.max_words is not None and len(positional) > syntax.max_words):
        return Line(text)
    return Line(text, words[0], words[1:])


def _invoke(command: click.Command, args: list[str]) -> Any:
    """Run one of the llmos click commands as the shell's own command (in a worker thread:
    they run their own event loop). Usage errors become InvalidArgument."""
    try:
        return command.main(args=args, prog_name=command.name, standalone_mode=False)
    except click.ClickException as e:
        raise InvalidArgument(e.format_message()) from None


def _question(tool: str, args: dict) -> str:
    if tool == "kill_process":
        return f"kill process {args.get('process')}?"
    if tool == "delete_file":
        return f"delete {args.get('path')}?"
    return f"allow {tool}({json.dumps(args)})?"


class Shell:
    def __init__(self, kernel: str, state_dir: Path | None, assistant: str, devices: str,
                 max_tokens: int, once: bool, yes: bool) -> None:
        from llmos_kernel.client import KernelClient

        self.kernel, self.state_dir = kernel, state_dir
        self.client = KernelClient.connect(kernel, state_dir=state_dir)
        self.name, self.devices, self.max_tokens = assistant, devices, max_tokens
        self.once, self.yes = once, yes
        self.tty = sys.stdin.isatty() and not once
        self.pid = 0
        self.assistant: int | None = None
        self.granted: int | None = None  # the assistant that may call our kill_process
        self.work: asyncio.Task | None = None
        self.interrupted = False

    # -- output -------------------------------------------------------------------------------
    @staticmethod
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def error(self, e: BaseException) -> None:
        self.write(f"error: {type(e).__name__}: {e}\n")

    # -- start and stop -----------------------------------------------------------------------
    async def start(self) -> None:
        import syscalls
        from syscalls import tools

        self.pid = await syscalls.attach(f"chat-{os.getpid()}", kernel=self.kernel,
                                         state_dir=str(self.state_dir) if self.state_dir
                                         else None)
        client = self.client

        @tools.tool(dangerous=True)
        async def kill_process(process: str) -> str:
            """Stop a running process (a person approves it first).

            Args:
                process: The pid or the name of the process.
            """
            await client.call("kill", int(process) if process.isdigit() else process, "term")
            return f"process {process} is stopping"

        await tools.register(kill_process)

    async def connect(self) -> None:
        """Find the assistant (or start it) and say hello; prints who answers."""
        from llmos_kernel.cli.assistant import Hello
        from syscalls import ipc, proc
        from syscalls.proc import program_spec

        found = next((p for p in await self.client.call("ps", False)
                      if p["name"] == self.name), None)
        if found is not None and found["program"] != ASSISTANT_PROGRAM:
            raise InvalidArgument(f"process {self.name!r} (pid {found['pid']}) runs "
                                  f"{found['program']}, not the assistant; pick another "
                                  "--assistant name")
        pid = found["pid"] if found else None
        if pid is None:
            spec = {"program": program_spec(ASSISTANT_PROGRAM), "name": self.name,
                    "args": {"devices": self.devices}, "restart": {"restart": "permanent"}}
            try:
                pid = await self.client.call("spawn", spec)
            except AlreadyExists:  # another shell started it meanwhile
                pid = next(p["pid"] for p in await self.client.call("ps", False)
                           if p["name"] == self.name)
        self.assistant = pid
        await self._grant()
        await proc.monitor(pid)
        welcome = (await ipc.call(pid, Hello(), timeout=HELLO_TIMEOUT_S)).body
        if not self.once:
            earlier = f", {welcome.turns} earlier turns" if welcome.turns else ""
            self.write(f"llmos chat: assistant {self.name!r} (pid {pid}{earlier}), tools: "
                       f"{', '.join(welcome.tools) or 'none'}.\nType a question or a command "
                       "(help). Ctrl-C stops a reply, Ctrl-D quits.\n")

    async def _grant(self) -> None:
        """Let the assistant call our kill_process. While another shell's is granted (one
        that died without a word holds it until the kernel reaps it), try again next time."""
        from syscalls import tools

        if self.assistant is not None and self.granted != self.assistant:
            try:
                await tools.grant("kill_process", self.assistant)
                self.granted = self.assistant
            except LlmosError:
                pass

    async def close(self) -> None:
        """Leave as a process at once, rather than when the kernel notices our silence: the
        assistant stops sharing its home and calling our tool. (An attached process has no
        other way out than a kill; its exit reads "killed".)"""
        if self.pid:
            try:
                await self.client.call("kill", self.pid, "kill")
            except LlmosError:
                pass

    # -- the loop -----------------------------------------------------------------------------
    async def repl(self) -> None:
        async for text in self._lines():
            line = parse_line(text)
            if line.command in ("exit", "quit"):
                return
            if line.text or line.command:
                await self.run(line)

    async def _lines(self):
        if self.tty:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory

            from llmos_kernel.paths import llmos_home

            path = llmos_home() / "chat_history"
            path.parent.mkdir(parents=True, exist_ok=True)
            session = PromptSession(history=FileHistory(str(path)))
            while True:
                try:
                    yield await session.prompt_async(PROMPT)
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    return
        else:
            loop = asyncio.get_running_loop()
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                yield line.rstrip("\n")

    async def run(self, line: Line) -> bool:
        """Run one line to its end; False if it failed. Ctrl-C stops it, not the shell."""
        self.interrupted = False
        self.work = asyncio.ensure_future(self._command(line) if line.command
                                          else self._ask(line.text))
        self._catch_ctrl_c()
        try:
            return await self.work
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            self.write(f"{self._ctrl_c()} (interrupted)\n")
            return False
        except LlmosError as e:
            self.error(e)
            return False
        finally:
            self.work = None
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)

    def _catch_ctrl_c(self) -> None:
        """Route SIGINT to ``interrupt`` (again after each prompt: prompt_toolkit takes
        SIGINT for itself while it reads a line and restores Python's default after)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.interrupt)

    def interrupt(self) -> None:
        """SIGINT during a line's work: stop that work (not the shell)."""
        if self.work is not None and not self.work.done():
            self.interrupted = True
            self.work.cancel()

    @staticmethod
    def _ctrl_c() -> str:
        """"^C", unless the terminal echoed it already."""
        echoed = sys.stdin.isatty() and termios.tcgetattr(sys.stdin)[3] & termios.ECHOCTL
        return "" if echoed else "^C"

    # -- shell commands -------------------------------------------------------------------------
    async def _command(self, line: Line) -> bool:
        from llmos_kernel.cli import proc as proc_cli
        from llmos_kernel.cli import top as top_cli
        from syscalls import fs, ipc

        where = ["--kernel", self.kernel] + (
            ["--state-dir", str(self.state_dir)] if self.state_dir else [])
        name, words = line.command, line.words
        if name == "help":
            self.write("".join(f"  {s.help}\n" for s in COMMANDS.values() if s.help)
                       + "  anything else (or ?LINE): ask the assistant\n")
        elif name == "ps":
            await asyncio.to_thread(_invoke, proc_cli.ps, [*words, *where])
        elif name == "top":
            await asyncio.to_thread(_invoke, top_cli.top, ["--once", *words, *where])
        elif name == "kill":
            await asyncio.to_thread(_invoke, proc_cli.kill, [*words, *where])
            self.write(f"{words[0]}: stopping\n")
        elif name == "run":
            return await self._run_program(words, where)
        elif name in ("ls", "cat"):
            owner = await self._assistant()
            if name == "cat":
                data = await fs.read(words[0], owner=owner)
                text = data.decode("utf-8", errors="replace")
                self.write(text if text.endswith("\n") or not text else text + "\n")
            else:
                for e in await fs.list(words[0] if words else ".", owner=owner):
                    self.write(f"{e['size']:>8}  {e['path']}{'/' if e['is_dir'] else ''}\n")
        elif name == "reset":
            from llmos_kernel.cli.assistant import Reset

            await ipc.send(await self._assistant(), Reset())
            self.write("the assistant forgot the conversation\n")
        return True

    async def _run_program(self, words: list[str], where: list[str]) -> bool:
        """``run``: ``llmos run``'s own option parsing and spawn; then wait, interruptibly."""
        from llmos_kernel.cli import proc as proc_cli
        from syscalls.proc import program_spec

        args = [words[0]]
        for word in words[1:]:  # key=value words are --arg pairs
            args += ["--arg", word] if "=" in word and not word.startswith("-") else [word]
        with proc_cli.run.make_context("run", [*args, *where]) as ctx:
            params = ctx.params
        spec: dict[str, Any] = {"program": program_spec(params["program"]),
                                "args": dict(proc_cli.parse_arg(a) for a in params["args"])}
        for key, value in (("name", params["process_name"]), ("priority", params["priority"]),
                           ("restart", {"restart": params["restart"]} if params["restart"]
                            else None)):
            if value is not None:
                spec[key] = value
        pid = await self.client.call("spawn", spec)
        self.write(f"{pid}\n")
        if params["detach"]:
            return True
        try:
            exit_ = await self.client.call("wait", pid, None)
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            self.write(f"{self._ctrl_c()} (stopped waiting; pid {pid} runs on: "
                       f"llmos logs {pid})\n")
            return True
        self.write(json.dumps(exit_, indent=2, default=str) + "\n")
        return exit_.get("reason") == "normal"

    async def _assistant(self) -> int:
        if self.assistant is None:
            await self.connect()
        return self.assistant

    # -- questions ------------------------------------------------------------------------------
    async def _ask(self, text: str) -> bool:
        from llmos_kernel.cli.assistant import Ask, Cancel
        from syscalls import ipc

        ask = Ask(uuid.uuid4().hex[:12], text, self.max_tokens)
        started = time.time()
        try:
            await self._grant()
            await ipc.send(await self._assistant(), ask)
        except NoSuchProcess:  # it exited for good: start it again
            self.assistant = None
            await ipc.send(await self._assistant(), ask)
        try:
            return await self._converse(ask.id)
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            await ipc.send(self.assistant, Cancel(ask.id))
            await self._deny_pending(started)
            confirmed = await self._drain(ask.id)
            self.write(f"{self._ctrl_c()} (cancelled)\n" if confirmed else
                       f"{self._ctrl_c()} (cancel sent; the assistant has not confirmed it)\n")
            return True

    async def _converse(self, ask_id: str) -> bool:
        """Print the reply to ``ask_id`` as it streams, answering approvals on the way."""
        from llmos_kernel.cli.assistant import Chunk, Done, ToolNote
        from llmos_kernel.notices import ProcessDown
        from syscalls import ipc

        asked: set[str] = set()
        wrote, ok = False, True
        while True:
            try:
                msg = await ipc.recv(type=(Chunk, ToolNote, Done, ProcessDown),
                                     timeout=APPROVAL_POLL_S)
            except Timeout:
                await self._approvals(asked)
                continue
            body = msg.body
            if isinstance(body, ProcessDown):
                if body.pid != self.assistant:
                    continue
                self.assistant = None
                raise NoSuchProcess(f"the assistant exited ({body.reason}) before it "
                                    "answered; ask again")
            if body.id != ask_id:
                continue  # what a cancelled reply sent before it stopped
            if isinstance(body, Chunk):
                self.write(body.text)
                wrote = True
            elif isinstance(body, ToolNote):
                ok = body.ok
                self.write(f"[{body.call}] {'->' if ok else 'failed:'} {body.result}\n")
            else:
                self.write("\n" if wrote else "")
                if body.reason == "error":
                    self.write(f"error: {body.error}\n")
                return ok and body.reason != "error"

    async def _approvals(self, asked: set[str]) -> None:
        """Ask the person about each dangerous call the assistant waits on, once."""
        for row in await self.client.call("approvals"):
            if row["pid"] != self.assistant or row["id"] in asked:
                continue
            asked.add(row["id"])
            approve = await self._confirm(_question(row["tool"], row["args"]))
            try:
                decided = await self.client.call("decide", row["id"], approve)
                self.write(f"({decided['state']})\n" if not approve else "")
            except LlmosError as e:  # decided elsewhere (llmos approve, the console) or expired
                self.error(e)

    async def _confirm(self, question: str) -> bool:
        if self.once:
            self.write(f"{question} [y/N] " + ("y (--yes)\n" if self.yes else
                                               "n (--once: pass --yes to allow)\n"))
            return self.yes
        if self.tty:
            from prompt_toolkit import PromptSession

            try:
                answer = await PromptSession().prompt_async(f"{question} [y/N] ")
            except (KeyboardInterrupt, EOFError):
                answer = "n"
            self._catch_ctrl_c()
        else:
            self.write(f"{question} [y/N] ")
            answer = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return answer.strip().lower() in ("y", "yes")

    async def _deny_pending(self, since: float) -> None:
        """A cancelled reply leaves no approval behind for someone to grant by mistake."""
        for row in await self.client.call("approvals"):
            if row["pid"] == self.assistant and row["created"] >= since - 1:
                try:
                    await self.client.call("decide", row["id"], False)
                except LlmosError:
                    pass

    async def _drain(self, ask_id: str) -> bool:
        """Wait for the assistant's Done for a cancelled ask; True once it came."""
        from llmos_kernel.cli.assistant import Chunk, Done, ToolNote
        from syscalls import ipc

        deadline = time.monotonic() + CANCEL_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await ipc.recv(type=(Chunk, ToolNote, Done), timeout=left)
            except Timeout:
                return False
            if isinstance(msg.body, Done) and msg.body.id == ask_id:
                return True
        return False


async def _main(shell: Shell, once: str | None) -> bool:
    loop = asyncio.get_running_loop()
    for hangup in (signal.SIGHUP, signal.SIGTERM):  # leave as a process on the way out
        loop.add_signal_handler(hangup, asyncio.current_task().cancel)
    try:
        await shell.start()
        if once is not None:
            return await shell.run(parse_line(once))
        await shell.connect()
        await shell.repl()
        return True
    finally:
        for hangup in (signal.SIGHUP, signal.SIGTERM):
            loop.remove_signal_handler(hangup)
        await shell.close()


@click.command()
@click.option("--once", "once", default=None, metavar="TEXT",
              help="Run one line (a command or a question), print the answer and exit "
                   "(status 1 if it failed).")
@click.option("--yes", is_flag=True, help="With --once: approve dangerous tool calls "
              "(default: deny them).")
@click.option("--assistant", default="assistant", show_default=True,
              help="Name of the resident assistant process (started if not running).")
@click.option("--devices", default="demos.smart_home", show_default=True,
              help="Module with the home devices (Devices, device_tools) for an assistant "
                   "this shell starts; '' for none.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=256, show_default=True,
              help="Longest reply, in tokens.")
@click.option("--kernel", "--name", "kernel", default="kernel", show_default=True,
              help="Kernel actor name (as given to llmos kernel start --name).")
@state_dir_option
def chat(once: str | None, yes: bool, assistant: str, devices: str, max_tokens: int,
         kernel: str, state_dir: Path | None) -> None:
    """A natural-language shell: commands run directly, anything else goes to the assistant."""
    shell = Shell(kernel, state_dir, assistant, devices, max_tokens, once is not None, yes)
    try:
        ok = asyncio.run(_main(shell, once))
    except asyncio.CancelledError:  # hung up or terminated
        ok = False
    if not ok:
        raise SystemExit(1)
