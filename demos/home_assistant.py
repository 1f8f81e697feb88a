"""A home assistant: the model checks the weather and switches a light through two tools.

    llmos run demos/home_assistant.py
    llmos run demos/home_assistant.py --arg task="Is it cold in Oslo? Light the kitchen if so."

The tools are plain Python functions in this file. ``@tool`` derives their JSON
Schemas from the type hints and docstrings; the kernel constrains the model's
calls to those schemas, so every call parses and validates, even from a 135M
model. ``tools.run_loop`` runs the calls here, in this process, feeds the
results back, and ends with the model's answer in text.
"""

from __future__ import annotations

import json

from llmos_kernel.errors import NotFound
from syscalls import tools
from syscalls.tools import tool

TASK = "Check the weather in Paris and turn on the living room light if it is cold."
SYSTEM = ("You are a home assistant. Use the tools to act, then tell the user in one "
          "sentence what you did.")

# A stand-in weather service: city -> (temperature in °C, conditions).
WEATHER = {"paris": (4, "cold and cloudy"), "oslo": (-3, "snowing"), "madrid": (24, "sunny"),
           "london": (9, "rainy"), "tokyo": (17, "clear")}


class Home:
    """The house the assistant looks after; its methods are the model's tools."""

    def __init__(self) -> None:
        self.lights: dict[str, bool] = {}  # room -> on

    @tool
    def get_weather(self, city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: The city name, e.g. "Paris".
        """
        found = WEATHER.get(city.strip().lower())
        if found is None:
            raise NotFound(f"no weather station in {city!r}; known: {', '.join(sorted(WEATHER))}")
        temperature, conditions = found
        return {"city": city, "temperature_c": temperature, "conditions": conditions}

    @tool
    def set_light(self, room: str, on: bool) -> dict:
        """Switch the light in a room on or off.

        Args:
            room: The room, e.g. "kitchen".
            on: true to switch it on, false to switch it off.
        """
        self.lights[room] = on
        return {"room": room, "light": "on" if on else "off"}


async def main(task: str = TASK, max_tokens: int = 64) -> dict:
    """Run the task; print and return the answer, the calls made and the lights' state."""
    home = Home()
    result = await tools.run_loop(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}],
        [home.get_weather, home.set_light], tool_choice="required", each_tool_once=True,
        max_tokens=max_tokens, temperature=0)
    calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
             for m in result.messages for c in m.get("tool_calls") or []]
    for call in calls:
        print(f"called {call['name']}({call['arguments']})")
    print(result.text)
    return {"answer": result.text, "calls": calls, "lights": home.lights}
