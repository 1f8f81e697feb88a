"""The resident assistant behind ``llmos chat``: one kernel process that keeps a conversation
and answers each line a shell sends it, streaming, using tools when the line asks for one.

*Resident* means: a top-level process named ``assistant`` (``restart="permanent"``), spawned
by the first ``llmos chat`` and found by name by every later one. It outlives the shells,
serves any number of them, and keeps its conversation in memory and in its home
(``conversation.json``), so a restart, or a kernel restart, resumes it.

A shell talks to it with the typed messages declared here: ``Ask`` (a line), ``Cancel``,
``Hello`` (answered by ``Welcome``) and ``Reset``; it answers an ``Ask`` with ``Chunk``
messages as tokens arrive (coalesced: one send in flight at a time), or with a ``ToolNote``
when the line called a tool, and then one ``Done``. Each ``Ask`` runs in a task of its own while the receive loop keeps
reading, so a ``Cancel`` arrives while a reply streams; cancelling the task leaves
``llm.deltas``, which cancels the engine's request in the kernel before ``Done`` goes out.
The loop receives only these types: a tool's own ``ipc.call`` (the devices) gets its reply.

A 135M model cannot be trusted to choose a tool, so the choice is made by meaning: each
tool has a few example requests, embedded once (the kernel's embedding model); a line goes to
the tool whose examples are nearest, or to a plain answer. The model then only fills that
one tool's arguments, under a grammar whose schema is narrowed to what the line names (the
rooms, actions, numbers, file names and processes it mentions). Every call goes through
``tools.call`` (the kernel), so a dangerous one waits in the kernel's approval queue, where
the shell, ``llmos approvals`` and the console all see it. The tool's result is the reply:
a sentence about it from the model would more often misstate it than help.

Home devices come from a module named by the ``devices`` argument (default
``demos.smart_home``: ``Devices`` and ``device_tools(pid)``); without it the assistant runs
with files and processes only. ``kill_process`` is offered by the shell (it holds the
person's root token) and granted to this process while the shell lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import re

from llmos_kernel.engine.tool_calls import ToolCall
from llmos_kernel.errors import LlmosError, NotFound
from llmos_kernel.messages import message
from llmos_kernel.notices import ProcessDown
from syscalls import fs, ipc, llm, proc, tools
from syscalls.tools import tool

CONVERSATION_FILE = "conversation.json"
HISTORY_MESSAGES = 2  # earlier messages (one turn) shown to the model with a new line
SAVED_MESSAGES = 200
MIN_TOOL_SCORE = 0.3  # below this cosine similarity a line is answered, not acted on
APPROVAL_WAIT_S = 300.0
NOTE_CHARS = 2000  # of a tool's result, shown to the person
FREE_TEXT_CHARS = 80  # a tool's free-text argument (a file's content) is at most this long
ANSWER = "You are a helpful AI assistant. Answer briefly."
SAMPLING = {"temperature": 0, "repetition_penalty": 1.1}  # greedy, kept from looping
FILL = "Call the tool with the arguments the user's request gives."

# Example requests per tool: a line goes to the tool whose examples mean what it means.
EXAMPLES: dict[str, list[str]] = {
    "": ["What is the capital of France?", "Tell me a joke.", "Hi, how are you?",
         "Explain how rainbows form.", "Write a short poem about the sea.",
         "Who wrote Hamlet?", "Count from one to ten."],
    "write_file": ["write hello to notes.txt", "save the text buy milk in todo.txt",
                   "create a file called ideas.md containing plans"],
    "read_file": ["read notes.txt", "what is in todo.txt?", "show me the file notes.txt"],
    "list_files": ["list my files", "what files do I have?", "show my home directory"],
    "delete_file": ["delete notes.txt", "remove the file todo.txt"],
    "list_processes": ["show the processes", "what is running?", "list processes"],
    "kill_process": ["kill process 12", "stop the process named worker", "terminate sleeper"],
    "set_light": ["turn on the kitchen light", "switch off the lights in the bedroom"],
    "dim_light": ["dim the living room light to 30 percent"],
    "set_thermostat": ["set the office to 22 degrees", "make the bedroom warmer, 24 degrees"],
    "set_blinds": ["close the blinds in the bedroom", "open the kitchen blinds"],
}
FILE_TOOLS = ["read_file", "write_file", "list_files", "delete_file"]  # the kernel's own


@message(name="chat.Ask")
class Ask:
    id: str
    text: str
    max_tokens: int = 256


@message(name="chat.Cancel")
class Cancel:
    id: str


@message(name="chat.Hello")
class Hello:
    """A shell arrives: it may read this home while it lives."""


@message(name="chat.Welcome")
class Welcome:
    pid: int
    turns: int  # earlier turns this conversation holds
    tools: list[str]  # the tools a line may call now


@message(name="chat.Reset")
class Reset:
    """Forget the conversation."""


@message(name="chat.Chunk")
class Chunk:
    id: str
    text: str


@message(name="chat.ToolNote")
class ToolNote:
    id: str
    call: str  # e.g. write_file(path="notes.txt", content="hello")
    ok: bool
    result: str  # JSON of the result, or the error


@message(name="chat.Done")
class Done:
    id: str
    reason: str  # stop | length | cancelled | error
    error: str | None = None


@tool
async def list_processes() -> list[dict]:
    """List the running processes: pid, name, status and program."""
    return [{k: p[k] for k in ("pid", "name", "status", "program")} for p in await proc.ps()]


class Assistant:
    """One conversation, the tools it may use, and the replies in progress."""

    def __init__(self, devices: str = "demos.smart_home") -> None:
        self.devices = devices
        self.history: list[dict] = []
        self.replies: dict[str, tuple[int, asyncio.Task]] = {}  # ask id -> (shell, task)
        self.shells: set[int] = set()
        self.turn = asyncio.Lock()  # one turn at a time: the conversation has one order
        self.examples: dict[str, list[list[float]]] = {}  # tool -> its examples' embeddings
        self.routing = True  # False once embeddings proved unavailable
        self.usable = {*FILE_TOOLS, "kill_process"}  # and the tools registered in start()

    async def start(self) -> None:
        with contextlib.suppress(NotFound):
            self.history = json.loads(await fs.read_text(CONVERSATION_FILE))
        for fn in [list_processes, *await self._device_tools()]:
            self.usable.add((await tools.register(fn))["function"]["name"])

    async def _device_tools(self) -> list:
        if not self.devices:
            return []
        try:
            module = importlib.import_module(self.devices)
            pid = await proc.spawn(module.Devices, restart="permanent")
            return list(module.device_tools(pid))
        except (ImportError, AttributeError, LlmosError) as e:
            print(f"[assistant] no home devices ({self.devices}): {type(e).__name__}: {e}")
            return []

    async def serve(self) -> None:
        """Receive shells' messages forever; a reply runs beside the loop, in its own task."""
        while True:
            msg = await ipc.recv(type=(Ask, Cancel, Hello, Reset, ProcessDown))
            try:
                await self._handle(msg)
            except LlmosError as e:
                print(f"[assistant] {msg.type} from {msg.sender} failed: {type(e).__name__}: {e}")

    async def _handle(self, msg: ipc.Message) -> None:
        body = msg.body
        if isinstance(body, Ask):
            task = asyncio.get_running_loop().create_task(self._reply(msg.sender, body))
            self.replies[body.id] = (msg.sender, task)
            task.add_done_callback(lambda _, ask=body.id: self.replies.pop(ask, None))
        elif isinstance(body, Cancel):
            reply = self.replies.get(body.id)
            if reply is not None and reply[0] == msg.sender:
                reply[1].cancel()
        elif isinstance(body, Hello):
            await self._welcome(msg)
        elif isinstance(body, Reset):
            self.history = []
            await fs.write(CONVERSATION_FILE, "[]")
        elif isinstance(body, ProcessDown) and body.pid in self.shells:
            await self._shell_gone(body.pid)

    async def _welcome(self, msg: ipc.Message) -> None:
        if msg.sender not in self.shells:
            if not await fs.exists(CONVERSATION_FILE):
                await fs.write(CONVERSATION_FILE, "[]")
            await fs.grant(".", msg.sender, "r")  # the shell's ls and cat read this home
            await proc.monitor(msg.sender)
            self.shells.add(msg.sender)
        names = sorted(n for t in await tools.list() if (n := t["function"]["name"]) in self.usable)
        await ipc.reply(msg, Welcome(proc.pid(), len(self.history) // 2, names))

    async def _shell_gone(self, shell: int) -> None:
        self.shells.discard(shell)
        for sender, task in list(self.replies.values()):
            if sender == shell:
                task.cancel()
        with contextlib.suppress(LlmosError):
            await fs.revoke(".", shell)

    # -- one turn ---------------------------------------------------------------------------
    async def _reply(self, shell: int, ask: Ask) -> None:
        outlet = Outlet(shell, ask.id)
        try:
            async with self.turn:
                reason = await self._turn(ask, outlet)
            await outlet.close()
            done = Done(ask.id, reason)
        except asyncio.CancelledError:  # leaving llm.deltas cancelled the engine's request
            await outlet.close(drop=True)
            done = Done(ask.id, "cancelled")
        except Exception as e:  # noqa: BLE001 - the shell hears why; the assistant lives on
            await outlet.close(drop=True)
            done = Done(ask.id, "error", f"{type(e).__name__}: {e}")
            print(f"[assistant] {ask.text!r} failed: {done.error}")
        with contextlib.suppress(LlmosError):  # the shell may be gone
            await ipc.send(shell, done)

    async def _turn(self, ask: Ask, outlet: Outlet) -> str:
        """Answer in words, streamed; or make the one tool call the line asks for, whose
        result is the reply (in trials the 135M model's sentence about a result misstated it
        more often than not: "the lights were turned off" after switching them on)."""
        user = {"role": "user", "content": ask.text}
        spec = await self._route(ask.text)
        reason = "stop"
        if spec is not None:
            call, value, ok = await self._call(spec, ask.text)
            shown = render_call(call) if call else spec["function"]["name"]
            await ipc.send(outlet.to, ToolNote(ask.id, shown, ok, value[:NOTE_CHARS]))
            answer = {"role": "assistant", "content": f"{shown} -> {value[:200]}", "tool": True}
        else:
            messages = [{"role": "system", "content": ANSWER}, *self._recent(), user]
            text = []
            async for delta in llm.deltas(messages, max_tokens=ask.max_tokens, **SAMPLING):
                if delta.text:
                    text.append(delta.text)
                    outlet.put(delta.text)
                reason = delta.finish_reason or reason
            answer = {"role": "assistant", "content": "".join(text)}
        self.history = [*self.history, user, answer][-SAVED_MESSAGES:]
        await fs.write(CONVERSATION_FILE, json.dumps(self.history))
        return reason

    def _recent(self) -> list[dict]:
        """The last turn, if it was answered in words: what a follow-up most likely needs.
        A 135M model imitates the answers it is shown, so it is shown few."""
        turn = self.history[-HISTORY_MESSAGES:]
        if any("tool" in m for m in turn):
            return []
        return [{"role": m["role"], "content": m["content"]} for m in turn]

    async def _route(self, text: str) -> dict | None:
        """The tool ``text`` asks for (an OpenAI tool dict), or None to answer in words."""
        if not self.routing:
            return None
        offered = {t["function"]["name"]: t for t in await tools.list()
                   if t["function"]["name"] in self.usable}
        try:
            missing = [n for n in ["", *offered] if n not in self.examples]
            if missing:
                texts = [(n, e) for n in missing for e in EXAMPLES.get(n) or [
                    offered[n]["function"]["description"].split("\n")[0]]]
                vectors = await llm.embed([e for _, e in texts])
                for (name, _), v in zip(texts, vectors):
                    self.examples.setdefault(name, []).append(v)
            [line] = await llm.embed([text])
        except LlmosError as e:
            print(f"[assistant] no embedding model, so no tools: {e}")
            self.routing = False
            return None
        best, score = route(line, {n: self.examples[n] for n in ["", *offered]})
        return offered[best] if best and score >= MIN_TOOL_SCORE else None

    async def _call(self, spec: dict, text: str) -> tuple[ToolCall | None, str, bool]:
        """Let the model fill the tool's arguments from ``text``, then run it (as this
        process, through the kernel); the call, its JSON result or error, and success."""
        name = spec["function"]["name"]
        narrowed = narrow(spec, text, await self._choices(spec))
        result = await llm.chat([{"role": "system", "content": FILL},
                                 {"role": "user", "content": text}],
                                tools=[narrowed], tool_choice=name, max_tokens=96, temperature=0)
        if not result.tool_calls:
            return None, json.dumps({"error": "the model did not complete the call"}), False
        call = ToolCall.from_openai(result.tool_calls[0])
        try:
            value = await tools.call(name, approval_timeout_s=APPROVAL_WAIT_S, **call.arguments)
            return call, json.dumps(value), True
        except LlmosError as e:
            return call, json.dumps({"error": f"{type(e).__name__}: {e}"}), False

    async def _choices(self, spec: dict) -> dict[str, list]:
        """Values a free string parameter may take: files of this home, live processes."""
        params = spec["function"]["parameters"].get("properties", {})
        out: dict[str, list] = {}
        if "path" in params:
            with contextlib.suppress(LlmosError):
                out["path"] = [e["path"] for e in await fs.list(".")]
        if "process" in params:
            live = await proc.ps()
            out["process"] = [*(p["name"] for p in live if p["name"]),
                              *(str(p["pid"]) for p in live)]
        return out


class Outlet:
    """Text pieces for one shell, sent as Chunk messages with one send in flight at a time:
    pieces that arrive meanwhile leave together, so a slow kernel round trip never backs up
    the token stream."""

    def __init__(self, to: int, ask_id: str) -> None:
        self.to, self.ask_id = to, ask_id
        self.pieces: list[str] = []
        self.ready = asyncio.Event()
        self.closing = False
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    def put(self, text: str) -> None:
        self.pieces.append(text)
        self.ready.set()

    async def _pump(self) -> None:
        while not (self.closing and not self.pieces):
            await self.ready.wait()
            self.ready.clear()
            if self.pieces:
                text, self.pieces = "".join(self.pieces), []
                await ipc.send(self.to, Chunk(self.ask_id, text))

    async def close(self, drop: bool = False) -> None:
        """Send what is left (or ``drop`` it) and stop; the Done after it comes last."""
        if drop:
            self.pieces = []
        self.closing = True
        self.ready.set()
        if drop:
            self.pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, LlmosError):
            await self.pump


def route(line: list[float], examples: dict[str, list[list[float]]]) -> tuple[str, float]:
    """The name whose nearest example is nearest ``line`` (unit vectors), and that cosine."""
    best, score = "", -math.inf
    for name, vectors in examples.items():
        top = max(sum(a * b for a, b in zip(line, v)) for v in vectors)
        if top > score:
            best, score = name, top
    return best, score


_FILE_NAME = re.compile(r"[\w][\w./-]*\.[A-Za-z0-9]{1,8}\b")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?![\w.])")
_QUOTED = re.compile(r"\"([^\"]+)\"|'([^']+)'")
_PUNCTUATION = ".,;:!?\"'"
MAX_SPAN_WORDS = 8


def mentioned(values: list, text: str) -> list:
    """The values that ``text`` names as whole words (case-insensitive), in their order."""
    lower = text.lower()
    return [v for v in values
            if re.search(rf"(?<![\w-]){re.escape(str(v).lower())}(?![\w-])", lower)]


def narrow(spec: dict, text: str, choices: dict[str, list] | None = None) -> dict:
    """``spec`` (an OpenAI tool dict) with each parameter narrowed to what ``text`` names.

    An enum shrinks to the values the text mentions; an integer with bounds to the numbers
    in the text within them; a ``path`` to the file names in the text, and a parameter with
    ``choices`` to those the text mentions (if it names none: its default, else all). A free string
    (a file's content) becomes one of the text's quoted strings or else one of its spans of
    words, leaving out the leading verb and the words around what the other arguments took
    ("write hello to notes.txt": "hello"). Where nothing fits, a parameter stays as it was.
    """
    choices = choices or {}
    function = spec["function"]
    params = function["parameters"]
    properties: dict[str, dict] = {}
    taken: list[str] = []  # values the text names that other arguments took
    for key, schema in params.get("properties", {}).items():
        schema = properties[key] = dict(schema)
        values = _named(key, schema, text, choices.get(key) or [])
        if values:
            schema["enum"] = values
            taken += [str(v) for v in mentioned(values, text)]
    for key, schema in properties.items():
        if schema.get("type") == "string" and "enum" not in schema:
            options = [a or b for a, b in _QUOTED.findall(text) if (a or b) not in taken] \
                or spans(text, taken)
            if options:
                schema["enum"] = options
            else:
                schema.setdefault("maxLength", FREE_TEXT_CHARS)
    return {"type": "function",
            "function": {**function, "parameters": {**params, "properties": properties}}}


def _named(key: str, schema: dict, text: str, known: list) -> list | None:
    """The values of one parameter that ``text`` allows, or None to leave it be."""
    if "enum" in schema:
        return mentioned(schema["enum"], text) or schema["enum"]
    if schema.get("type") == "integer":
        low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
        numbers = [int(n) for n in _NUMBER.findall(text) if low <= int(n) <= high]
        return list(dict.fromkeys(numbers)) or None
    if schema.get("type") == "string" and (key == "path" or known):
        named = list(dict.fromkeys(_FILE_NAME.findall(text))) if key == "path" else []
        named += [c for c in mentioned(known, text) if c not in named]
        if not named and "default" in schema:  # "list my files": the default directory
            return [schema["default"]]
        return named or known or None
    return None


def spans(text: str, taken: list[str]) -> list[str]:
    """Runs of up to MAX_SPAN_WORDS words of ``text``, without its first word (the verb) and
    without the ``taken`` words and their neighbours ("to" in "to notes.txt")."""
    words = text.split()
    taken_words = {w.lower() for t in taken for w in t.split()}
    dropped = {0}
    for i, word in enumerate(words):
        if word.strip(_PUNCTUATION).lower() in taken_words:
            dropped |= {i - 1, i, i + 1}
    runs, run = [], []
    for i, word in enumerate(words + [""]):
        if i in dropped or i == len(words):
            if run:
                runs.append(run)
            run = []
        else:
            run.append(word)
    out: list[str] = []
    for run in runs:
        for i in range(len(run)):
            for j in range(i + 1, min(len(run), i + MAX_SPAN_WORDS) + 1):
                span = " ".join(run[i:j]).strip(_PUNCTUATION)
                if span and span not in out:
                    out.append(span)
    return out


def render_call(call: ToolCall) -> str:
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in call.arguments.items())
    return f"{call.name}({args})"


async def main(devices: str = "demos.smart_home") -> None:
    """The assistant's program: ``proc.spawn("llmos_kernel.cli.assistant:main", ...)``."""
    assistant = Assistant(devices)
    await assistant.start()
    await assistant.serve()
