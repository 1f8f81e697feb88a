"""``llmos chat`` without a model: which lines are shell commands, how a line picks a tool
(nearest examples), and how a tool's arguments are narrowed to what the line names."""

from __future__ import annotations

import pytest

from llmos_kernel.cli.assistant import mentioned, narrow, route, spans
from llmos_kernel.cli.chat import parse_line


@pytest.mark.parametrize("text, command, words", [
    ("ps", "ps", []),
    ("ps --all", "ps", ["--all"]),
    ("kill 12", "kill", ["12"]),
    ("kill sleeper-1 --force", "kill", ["sleeper-1", "--force"]),
    ("ls", "ls", []),
    ("ls notes", "ls", ["notes"]),
    ("cat 'my notes.txt'", "cat", ["my notes.txt"]),
    ("run demos/team.py", "run", ["demos/team.py"]),
    ("run demos/team.py n=3 who=Ada --name team", "run",
     ["demos/team.py", "n=3", "who=Ada", "--name", "team"]),
    ("top --sort t", "top", ["--sort", "t"]),
    ("  help  ", "help", []),
    ("exit", "exit", []),
])
def test_commands_with_their_syntax_run_directly(text, command, words):
    line = parse_line(text)
    assert (line.command, line.words) == (command, words)


@pytest.mark.parametrize("text", [
    "kill the process named sleeper",  # more words than kill takes: a request
    "cat",  # cat needs a path
    "ls a b",
    "ps aux",
    "run a marathon with me",  # words after the program that are not key=value
    "run",
    "top --frobnicate",  # a flag top does not take
    "run x.py --name",  # a flag without its value
    "What is the capital of France?",
    "write hello to notes.txt",
    "don't stop",  # unbalanced quote
    "? ps",  # a leading ? makes any line a question
])
def test_other_lines_are_questions(text):
    line = parse_line(text)
    assert line.command is None
    assert line.text == (text[1:].strip() if text.startswith("?") else text)


def test_a_line_goes_to_the_nearest_examples_tool():
    examples = {"": [[1.0, 0.0, 0.0]], "write_file": [[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]],
                "set_light": [[0.0, 0.0, 1.0]]}
    assert route([0.1, 0.7, 0.7], examples) == ("write_file", pytest.approx(0.98))
    assert route([0.9, 0.1, 0.0], examples)[0] == ""


def _tool(name: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "description": "",
            "parameters": {"type": "object", "properties": properties,
                           "required": list(properties)}}}


def _narrowed(spec: dict, text: str, **choices) -> dict:
    return narrow(spec, text, choices)["function"]["parameters"]["properties"]


def test_enums_and_numbers_shrink_to_what_the_line_names():
    rooms = ["living room", "kitchen", "bedroom"]
    light = _tool("set_light", room={"type": "string", "enum": rooms},
                  action={"type": "string", "enum": ["on", "off"]})
    got = _narrowed(light, "Turn on the light in the living room")
    assert got["room"]["enum"] == ["living room"] and got["action"]["enum"] == ["on"]
    assert _narrowed(light, "make it bright")["room"]["enum"] == rooms  # names none: all
    thermostat = _tool("set_thermostat", temperature={"type": "integer", "minimum": 10,
                                                      "maximum": 30})
    assert _narrowed(thermostat, "set it to 22 degrees, not 99")["temperature"]["enum"] == [22]
    assert "enum" not in _narrowed(thermostat, "warmer please")["temperature"]


def test_a_file_and_its_content_come_from_the_line():
    write = _tool("write_file", path={"type": "string"}, content={"type": "string"})
    got = _narrowed(write, "write hello to notes.txt")
    assert (got["path"]["enum"], got["content"]["enum"]) == (["notes.txt"], ["hello"])
    got = _narrowed(write, "create notes.txt containing call mom")
    assert got["content"]["enum"] == ["call", "call mom", "mom"]
    assert _narrowed(write, "write 'hi, you' to a.txt")["content"]["enum"] == ["hi, you"]
    read = _tool("read_file", path={"type": "string"})
    assert _narrowed(read, "show my notes", path=["notes.txt", "b.md"])["path"]["enum"] == [
        "notes.txt", "b.md"]
    assert _narrowed(read, "show b.md please", path=["notes.txt", "b.md"])["path"]["enum"] == [
        "b.md"]
    listing = _tool("list_files", path={"type": "string", "default": "."})
    assert _narrowed(listing, "list my files", path=["notes.txt"])["path"]["enum"] == ["."]


def test_a_process_is_named_by_pid_or_name():
    kill = _tool("kill_process", process={"type": "string"})
    live = ["assistant", "sleeper-1a", "7", "12"]
    assert _narrowed(kill, "kill the process named sleeper-1a", process=live)[
        "process"]["enum"] == ["sleeper-1a"]
    assert _narrowed(kill, "kill process 12", process=live)["process"]["enum"] == ["12"]
    assert mentioned(["on", "sleeper"], "sleepers gone") == []  # whole words only


def test_spans_leave_out_the_verb_and_what_other_arguments_took():
    assert spans("save buy milk in todo.txt", ["todo.txt"]) == ["buy", "buy milk", "milk"]
    assert spans("write", []) == []
