"""Spoken home commands become validated tool calls on a device process that owns the house.

    llmos run demos/smart_home.py
    llmos run demos/smart_home.py --arg limit=8

``Devices`` is a process holding the house (a light per room, thermostats, blinds); its state
changes only when a typed ``home.Command`` message asks, and an unknown room, device, action
or value gets a ``home.Refused`` reply listing the valid choices. ``device_tools(pid)`` gives
the model four tools (set_light, dim_light, set_thermostat, set_blinds) whose room and action
arguments are enums, so the kernel's grammar makes a misspelt room or a malformed call
impossible; each tool is an ``ipc.call`` to the Devices process.

What a 135M model does well here, and what it does not: told which tool and action, it
fills in the room and the number reliably; choosing them itself, it mostly takes the first
plausible one ("switch off" becomes set_light on). So the intent is chosen by retrieval: the
command is embedded and matched to the nearest shipped phrasing of each intent
(``home_intents.json``: light on, light off, dim, thermostat, blinds open, blinds close); the
model then makes that intent's call, with ``tool_choice`` naming the tool, the action enum
narrowed to the intent's action, and two worked examples shown. ``main`` runs the shipped
labelled commands concurrently, each on a fresh house of its own, checks the change each
made to the house against its label, and prints beside it the baseline: the model choosing
tool and action itself.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from demos import data_path
from llmos_kernel.errors import InvalidArgument
from llmos_kernel.messages import message
from llmos_kernel.tool_schema import Range
from llmos_kernel.tool_specs import ToolSpec, spec_of, validate_args
from syscalls import ipc, llm, proc
from syscalls.tools import tool

Room = Literal["living room", "kitchen", "bedroom", "bathroom", "office", "garage"]
ROOMS: tuple[str, ...] = Room.__args__
# device -> action -> the range of its value (None: the action takes no value)
ACTIONS: dict[str, dict[str, tuple[int, int] | None]] = {
    "light": {"on": None, "off": None, "dim": (1, 100)},
    "thermostat": {"set": (10, 30)},
    "blinds": {"open": None, "close": None},
}
NO_DEVICE = {("garage", "thermostat"), ("garage", "blinds")}  # a garage has just a light
# intent -> the tool it calls and the arguments it pins (home_intents.json has its phrasings)
INTENTS: dict[str, tuple[str, dict[str, str]]] = {
    "light_on": ("set_light", {"action": "on"}), "light_off": ("set_light", {"action": "off"}),
    "dim": ("dim_light", {}), "thermostat": ("set_thermostat", {}),
    "blinds_open": ("set_blinds", {"action": "open"}),
    "blinds_close": ("set_blinds", {"action": "close"}),
}
SYSTEM = (f"Rooms: {', '.join(ROOMS)}. Read which room the user names and call the tool with "
          "exactly that room.")


@message(name="home.Command")
class Command:
    room: str
    device: str
    action: str
    value: int | None = None


@message(name="home.GetState")
class GetState:
    room: str | None = None  # None: the whole house


@message(name="home.State")
class State:
    rooms: dict[str, dict[str, Any]]


@message(name="home.Refused")
class Refused:
    error: str


def initial_house() -> dict[str, dict[str, Any]]:
    """Lights off at full brightness, thermostats at 20 °C, blinds open."""
    house: dict[str, dict[str, Any]] = {}
    for room in ROOMS:
        house[room] = {"light": {"on": False, "brightness": 100}}
        if (room, "thermostat") not in NO_DEVICE:
            house[room]["thermostat"] = {"target_c": 20}
        if (room, "blinds") not in NO_DEVICE:
            house[room]["blinds"] = {"open": True}
    return house


def apply(house: dict, c: Command) -> None:
    """Carry out ``c`` on ``house``; InvalidArgument, naming the valid choices, if it can't."""
    if c.room not in house:
        raise InvalidArgument(f"no room {c.room!r}; rooms: {', '.join(house)}")
    devices = house[c.room]
    if c.device not in devices:
        raise InvalidArgument(f"the {c.room} has no {c.device!r}; it has: {', '.join(devices)}")
    actions = ACTIONS[c.device]
    if c.action not in actions:
        raise InvalidArgument(f"a {c.device} cannot {c.action!r}; it can: {', '.join(actions)}")
    bounds = actions[c.action]
    if bounds is not None and (c.value is None or not bounds[0] <= c.value <= bounds[1]):
        raise InvalidArgument(f"{c.action} {c.device} needs a value from {bounds[0]} to "
                              f"{bounds[1]}, got {c.value!r}")
    state = devices[c.device]
    if c.device == "light":
        state["on"] = c.action != "off"
        if c.action == "dim":
            state["brightness"] = c.value
    elif c.device == "thermostat":
        state["target_c"] = c.value
    else:
        state["open"] = c.action == "open"


class Devices:
    """The house: owns every device's state and changes it only on a valid Command."""

    async def init(self, house: dict | None = None) -> None:
        self.house = copy.deepcopy(house) if house is not None else initial_house()

    async def on_message(self, msg: ipc.Message) -> State | Refused:
        body = msg.body
        if isinstance(body, Command):
            try:
                apply(self.house, body)
            except InvalidArgument as e:
                return Refused(str(e))
            return State({body.room: copy.deepcopy(self.house[body.room])})
        if isinstance(body, GetState):
            if body.room is None:
                return State(copy.deepcopy(self.house))
            if body.room not in self.house:
                return Refused(f"no room {body.room!r}; rooms: {', '.join(self.house)}")
            return State({body.room: copy.deepcopy(self.house[body.room])})
        return Refused(f"Devices answers home.Command and home.GetState, not {msg.type}")


def device_tools(devices_pid: int) -> list[Callable]:
    """The model's tools for the house the Devices process ``devices_pid`` owns; each returns
    the room's new state or raises InvalidArgument with the house's reason."""

    async def send(command: Command) -> dict:
        reply = await ipc.call(devices_pid, command, timeout=30)
        if isinstance(reply.body, Refused):
            raise InvalidArgument(reply.body.error)
        return reply.body.rooms[command.room]

    @tool
    async def set_light(room: Room, action: Literal["on", "off"]) -> dict:
        """Switch the light in a room on or off.

        Args:
            room: The room the user names.
            action: "on" or "off".
        """
        return await send(Command(room, "light", action))

    @tool
    async def dim_light(room: Room,
                        brightness: Annotated[int, "Brightness in percent", Range(1, 100)]
                        ) -> dict:
        """Set the brightness of the light in a room (this also switches it on).

        Args:
            room: The room the user names.
        """
        return await send(Command(room, "light", "dim", brightness))

    @tool
    async def set_thermostat(room: Room,
                             temperature: Annotated[int, "Target in degrees Celsius",
                                                    Range(10, 30)]) -> dict:
        """Set the heating's target temperature in a room.

        Args:
            room: The room the user names.
        """
        return await send(Command(room, "thermostat", "set", temperature))

    @tool
    async def set_blinds(room: Room, action: Literal["open", "close"]) -> dict:
        """Open or close the blinds in a room.

        Args:
            room: The room the user names.
            action: "open" or "close".
        """
        return await send(Command(room, "blinds", action))

    return [set_light, dim_light, set_thermostat, set_blinds]


def pinned(spec: ToolSpec, fixed: dict[str, str]) -> ToolSpec:
    """``spec`` with each argument in ``fixed`` narrowed to that one value (for the grammar)."""
    parameters = copy.deepcopy(spec.parameters)
    for name, value in fixed.items():
        parameters["properties"][name]["enum"] = [value]
    return dataclasses.replace(spec, parameters=parameters)


class Router:
    """Picks a command's intent by retrieval: the intent of the nearest shipped phrasing."""

    def __init__(self, intents: dict, vectors: list[list[float]]) -> None:
        self.intents = intents
        self.owners = [name for name, intent in intents.items() for _ in intent["phrases"]]
        self.vectors = vectors

    @classmethod
    async def load(cls, intents: str = "home_intents.json") -> Router:
        shipped = json.loads(data_path(intents).read_text())
        phrases = [p for intent in shipped.values() for p in intent["phrases"]]
        return cls(shipped, await llm.embed(phrases))

    async def route(self, texts: list[str]) -> list[str]:
        """The intent of each text (embeddings are unit length: dot = cosine)."""
        routed = []
        for query in await llm.embed(texts):
            sims = [sum(q * v for q, v in zip(query, vector)) for vector in self.vectors]
            routed.append(self.owners[max(range(len(sims)), key=sims.__getitem__)])
        return routed

    def messages(self, intent: str, text: str) -> list[dict]:
        """The conversation asking for ``text``: the system line, then the intent's shipped
        worked examples as earlier turns."""
        history = [{"role": "system", "content": SYSTEM}]
        name = INTENTS[intent][0]
        for i, (example, arguments) in enumerate(self.intents[intent]["examples"]):
            history += [{"role": "user", "content": example},
                        {"role": "assistant", "content": "", "tool_calls": [
                            {"id": f"example{i}", "type": "function",
                             "function": {"name": name, "arguments": json.dumps(arguments)}}]}]
        return history + [{"role": "user", "content": text}]


async def command(text: str, devices_pid: int, router: Router, *, intent: str | None = None,
                  max_tokens: int = 48) -> dict:
    """One spoken command carried out on the house ``devices_pid``: the call the routed intent
    asks for (``intent`` skips the routing), checked against the tool's schema, then run.

    Returns the intent, the call and what the house answered (its new state, or ``error``)."""
    tools = {spec_of(t).name: t for t in device_tools(devices_pid)}
    intent = intent or (await router.route([text]))[0]
    name, fixed = INTENTS[intent]
    reply = await llm.chat(router.messages(intent, text),
                           tools=[pinned(spec_of(tools[name]), fixed)], tool_choice=name,
                           max_tokens=max_tokens, temperature=0)
    call = reply.tool_calls[0]["function"]
    arguments = json.loads(call["arguments"])
    outcome = {"intent": intent, "tool": call["name"], "arguments": arguments}
    try:
        checked = validate_args(spec_of(tools[call["name"]]), arguments)
        outcome["result"] = await tools[call["name"]](**checked)
    except InvalidArgument as e:
        outcome["error"] = str(e)
    return outcome


def start_house(label: dict) -> dict:
    """The house a labelled command starts from: the usual one with the device it names in the
    opposite state (a light to switch off is on), so only the right call changes that device."""
    house = initial_house()
    device = house[label["room"]][label["device"]]
    if label["action"] == "off":
        device["on"] = True
    elif label["action"] == "open":
        device["open"] = False
    return house


def changes(before: dict, after: dict) -> list[dict]:
    """The devices whose state differs between two house states."""
    return [{"room": room, "device": device, "state": state}
            for room, devices in after.items() for device, state in devices.items()
            if state != before[room][device]]


def expected_changes(label: dict) -> list[dict]:
    """The one change a labelled command asks for, as ``changes`` reports it."""
    before = start_house(label)
    after = copy.deepcopy(before)
    apply(after, Command(label["room"], label["device"], label["action"], label["value"]))
    return changes(before, after)


def as_label(tool_name: str, arguments: dict) -> dict:
    """A call in the shape of a command's label: room, device, action, value."""
    device, action = {"set_light": ("light", arguments.get("action")),
                      "dim_light": ("light", "dim"), "set_thermostat": ("thermostat", "set"),
                      "set_blinds": ("blinds", arguments.get("action"))}[tool_name]
    value = arguments.get("brightness", arguments.get("temperature"))
    return {"room": arguments.get("room"), "device": device, "action": action, "value": value}


def intent_of(label: dict) -> str:
    """The intent a command's label names."""
    return {("light", "on"): "light_on", ("light", "off"): "light_off", ("light", "dim"): "dim",
            ("thermostat", "set"): "thermostat", ("blinds", "open"): "blinds_open",
            ("blinds", "close"): "blinds_close"}[label["device"], label["action"]]


async def run_labelled(entry: dict, router: Router, intent: str, max_tokens: int) -> dict:
    """A labelled command on a fresh Devices process of its own; the house's change, read back
    by message, beside the label's."""
    label = {k: entry[k] for k in ("room", "device", "action", "value")}
    pid = await proc.spawn(Devices, {"house": start_house(label)})
    try:
        before = (await ipc.call(pid, GetState(), timeout=30)).body.rooms
        outcome = await command(entry["text"], pid, router, intent=intent,
                                max_tokens=max_tokens)
        after = (await ipc.call(pid, GetState(), timeout=30)).body.rooms
    finally:
        await proc.kill(pid)
    got = as_label(outcome["tool"], outcome["arguments"])
    changed = changes(before, after)
    return {"text": entry["text"], "label": label, **outcome, "changes": changed,
            "ok": changed == expected_changes(label),
            "fields": {k: got[k] == label[k] for k in label}}


async def model_choice(entries: list[dict], max_tokens: int) -> list[dict]:
    """The baseline: the model choosing tool and action itself (scored by its call)."""
    offered = device_tools(0)  # only their schemas are used: nothing is run
    replies = await asyncio.gather(*(
        llm.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": e["text"]}],
                 tools=offered, tool_choice="required", max_tokens=max_tokens, temperature=0)
        for e in entries))
    calls = [r.tool_calls[0]["function"] for r in replies]
    return [as_label(c["name"], json.loads(c["arguments"])) for c in calls]


async def main(commands: str = "home_commands.json", limit: int = 0,
               max_tokens: int = 48) -> dict:
    """Run the shipped commands (the first ``limit``; 0: all), score each against its label,
    and the model's own choice of tool beside it."""
    entries = json.loads(data_path(commands).read_text())
    entries = entries[:limit] if limit else entries
    print(f"{len(entries)} labelled commands, each on a fresh Devices process")
    started = time.monotonic()
    router = await Router.load()
    routed = await router.route([e["text"] for e in entries])
    outcomes, chosen = await asyncio.gather(
        asyncio.gather(*(run_labelled(e, router, intent, max_tokens)
                         for e, intent in zip(entries, routed))),
        model_choice(entries, max_tokens))
    elapsed = time.monotonic() - started
    for o in outcomes:
        print(f"{'ok  ' if o['ok'] else 'MISS'} {o['text']!r} -> [{o['intent']}] {o['tool']}"
              f"({json.dumps(o['arguments'])}){'  ' + o['error'] if 'error' in o else ''}")
        if not o["ok"]:
            want = " ".join(str(v) for v in o["label"].values() if v is not None)
            print(f"     wanted: {want}; the house changed: {o['changes'] or 'nothing'}")
    n = len(outcomes)
    labels = [o["label"] for o in outcomes]
    metrics = {
        "commands": n,
        "accuracy": round(sum(o["ok"] for o in outcomes) / n, 3),
        **{f"{k}_accuracy": round(sum(o["fields"][k] for o in outcomes) / n, 3)
           for k in ("room", "device", "action", "value")},
        "routing_accuracy": round(sum(
            o["intent"] == intent_of(o["label"]) for o in outcomes) / n, 3),
        "model_choice_accuracy": round(sum(c == lb for c, lb in zip(chosen, labels)) / n, 3),
        "model_choice_action_accuracy": round(sum(
            (c["device"], c["action"]) == (lb["device"], lb["action"])
            for c, lb in zip(chosen, labels)) / n, 3),
        "refused": sum("error" in o for o in outcomes),
        "seconds": round(elapsed, 1),
    }
    print(f"accuracy (the house changed exactly as labelled): {metrics['accuracy']:.0%} "
          f"(room {metrics['room_accuracy']:.0%}, action {metrics['action_accuracy']:.0%}, "
          f"value {metrics['value_accuracy']:.0%}; intent routed by retrieval "
          f"{metrics['routing_accuracy']:.0%}); baseline, the model choosing the call itself: "
          f"{metrics['model_choice_accuracy']:.0%}; {elapsed:.1f}s")
    return {"metrics": metrics, "results": outcomes}
