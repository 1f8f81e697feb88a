"""The host<->kernel wire: declared structs, one codec, typed refusals, per-call isolation."""

from __future__ import annotations

import msgspec
import pytest

from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument, NotFound, QuotaExceeded


def test_a_batch_round_trips_with_its_calls_decoded_one_by_one():
    ops = [wire.Syscall("h:1", "cap", "ipc.send", wire.encode_args({"to": 2, "payload": b"\x90"}),
                        "msg-7"),
           wire.Syscall("", "cap", "ipc.ack", wire.encode_args({"id": "x"}))]
    exits = [wire.ExitReport(4, "error", error={"type": "ValueError", "message": "boom"})]
    data = wire.encode(wire.HostBatch("epoch", 3, ops, exits, {4: "out\n"}))
    batch = wire.decode_batch(data)
    assert (batch.epoch, batch.seq, batch.exits, batch.logs) == ("epoch", 3, exits, {4: "out\n"})
    first, second = (wire.decode_syscall(raw) for raw in batch.ops)
    assert (first.call, first.name, first.handling) == ("h:1", "ipc.send", "msg-7")
    assert wire.decode_args(first.args) == {"to": 2, "payload": b"\x90"}
    assert second.call == "" and wire.decode_args(second.args) == {"id": "x"}


@pytest.mark.parametrize("data", [None, "text", 7, b"", b"\xc1", msgspec.msgpack.encode([1, 2])])
def test_a_malformed_batch_is_refused_as_data(data):
    with pytest.raises(InvalidArgument, match="host batch"):
        wire.decode_batch(data)


def test_one_malformed_call_is_refused_alone_and_keeps_its_call_id():
    good = msgspec.msgpack.encode(["h:1", "cap", "proc.self", {}, None])
    bad = msgspec.msgpack.encode(["h:2", "cap", 42, {}, None])  # a name that is no string
    batch = wire.decode_batch(msgspec.msgpack.encode(
        ["e", 0, [msgspec.Raw(good), msgspec.Raw(bad)], [], {}]))
    assert wire.decode_syscall(batch.ops[0]).name == "proc.self"
    with pytest.raises(InvalidArgument):
        wire.decode_syscall(batch.ops[1])
    assert wire.call_id_of(batch.ops[1]) == "h:2"
    assert wire.call_id_of(msgspec.Raw(msgspec.msgpack.encode({"no": "list"}))) is None


def test_arguments_that_cannot_cross_fail_at_the_caller():
    with pytest.raises(InvalidArgument, match="cannot send these arguments"):
        wire.encode_args({"n": 1 << 70})
    with pytest.raises(InvalidArgument):
        wire.encode_args({"obj": object()})


def test_a_result_that_cannot_be_encoded_spoils_only_itself():
    raw = wire.encode_result(wire.ok(object()))
    result = wire.decode_result(raw)
    assert result.error is not None and "internal error" in result.error.message
    assert wire.decode_result(wire.encode_result(wire.ok([1, "two"]))).ok == [1, "two"]


def test_unwrap_raises_the_same_typed_error_on_the_other_side():
    for error in (NotFound("no such file"), QuotaExceeded("over")):
        result = wire.decode_result(wire.encode_result(wire.failure(error)))
        with pytest.raises(type(error), match=str(error)):
            wire.unwrap(result)
    assert wire.unwrap(wire.decode_result(wire.encode_result(wire.ok(None)))) is None
    assert wire.decode_result(wire.encode_result(wire.PENDING)).pending


def test_items_decode_to_their_declared_kinds_in_order():
    items = [wire.Kill(3), wire.Deliver(4, ["4:x", 1, 4, "dict", b"\x80", None, None, None,
                                            1.0, None]),
             wire.TokenDelta(5, "r1", [1, 2], "hi", finished=True, usage=wire.Usage(3, 0, 2)),
             wire.Spawn(6, "cap", None, wire.Program("module", ref="m:f"), {}, 10, {1: "1:a"}),
             wire.ToolCall("c", 7, "t", {"a": 1}),
             wire.Reply("h:9", wire.encode_result(wire.ok(9)))]
    answer = wire.decode_answer(wire.encode(wire.Answer(out=wire.Chunk("e", 12, items))))
    got = answer.out.items
    assert [type(i) for i in got] == [type(i) for i in items]
    assert got[:5] == items[:5]
    assert wire.unwrap(wire.decode_result(got[5].result)) == 9


def test_a_program_spec_is_checked_when_converted():
    assert wire.convert({"kind": "source", "code": "x = 1"}, wire.Program).code == "x = 1"
    with pytest.raises(InvalidArgument):
        wire.convert({"kind": "binary"}, wire.Program)
    plain = wire.to_builtins(wire.Program("pickle", data=b"\x80\x04"))
    assert plain == {"kind": "pickle", "data": b"\x80\x04"}
