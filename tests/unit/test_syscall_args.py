"""The syscall door's argument checks: every malformed call gets a typed error naming the
syscall and what to fix, before any handler runs. tests/test_syscall_fuzz.py fuzzes the
same door through a live kernel."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmos_kernel.errors import InvalidArgument, NotFound
from llmos_kernel.proctable import Process
from llmos_kernel.syscall_table import MAX_TEXT_CHARS, TABLE, check_args  # the one place to repoint


def test_an_unknown_syscall_is_not_found():
    with pytest.raises(NotFound, match="no syscall 'fs.teleport'"):
        check_args("fs.teleport", {})
    with pytest.raises(NotFound, match="no syscall 42"):
        check_args(42, {})


@pytest.mark.parametrize("args", [None, [], "path=a", ("path", "a")])
def test_arguments_must_be_a_dict(args):
    with pytest.raises(InvalidArgument, match="fs.read: arguments must be a dict"):
        check_args("fs.read", args)


def test_unknown_arguments_are_listed_with_what_the_syscall_takes():
    with pytest.raises(InvalidArgument, match=r"ipc\.subscribe: unknown argument\(s\) pattern, "
                                              r"x; it takes topic$"):
        check_args("ipc.subscribe", {"topic": "t", "x": 1, "pattern": "*"})
    with pytest.raises(InvalidArgument, match="unknown argument.* 3; it takes none"):
        check_args("proc.self", {3: "odd key"})


def test_missing_arguments_are_named():
    with pytest.raises(InvalidArgument, match=r"fs.rename: missing argument\(s\) src, dst"):
        check_args("fs.rename", {})
    with pytest.raises(InvalidArgument, match=r"fs.rename: missing argument\(s\) dst$"):
        check_args("fs.rename", {"src": "a"})


def test_well_formed_arguments_pass_through_unchanged():
    args = {"path": "notes.txt", "offset": 0}
    assert check_args("fs.read", args) is args
    assert check_args("proc.ps", {}) == {}


@given(name=st.sampled_from(sorted(TABLE)), data=st.data())
def test_a_call_passes_exactly_when_its_keys_are_accepted_and_complete(name, data):
    spec = TABLE[name]
    keys = data.draw(st.sets(st.sampled_from([*spec.required, *spec.optional, "bogus", "x"])))
    args = dict.fromkeys(keys, 0)
    unknown = keys - set(spec.required) - set(spec.optional)
    missing = set(spec.required) - keys
    if not unknown and not missing:
        assert check_args(name, args) is args
        return
    with pytest.raises(InvalidArgument) as raised:
        check_args(name, args)
    message = str(raised.value)
    assert message.startswith(f"{name}: ")
    assert all(k in message for k in (unknown or missing))


class RefusingLLM:
    """An LLM service that must not be reached: input this large is refused before it."""

    def tokenize(self, text: str) -> list[int]:
        return [len(text)]

    def submit(self, *args, **kwargs) -> str:
        raise AssertionError("an oversize prompt reached the LLM service")


def serve(name: str, args: dict):
    """Run one synchronous handler as a plain caller, with fake kernel services."""
    services = SimpleNamespace(llm=RefusingLLM())
    caller = Process(7, {"kind": "module"}, host="h1")
    return TABLE[name].fn(services, caller, check_args(name, args), None)


def test_input_past_the_size_limit_is_refused_before_any_work():
    assert serve("llm.tokenize", {"text": "x" * MAX_TEXT_CHARS}) == [MAX_TEXT_CHARS]
    with pytest.raises(InvalidArgument, match="over the limit of 1,048,576"):
        serve("llm.tokenize", {"text": "x" * (MAX_TEXT_CHARS + 1)})
    half = {"role": "user", "content": "y" * (MAX_TEXT_CHARS // 2 + 1)}
    with pytest.raises(InvalidArgument, match="no model context holds that much"):
        serve("llm.generate", {"spec": {"messages": [half, half]}})
    with pytest.raises(InvalidArgument, match="llm.generate takes a dict spec"):
        serve("llm.generate", {"spec": "hello"})
