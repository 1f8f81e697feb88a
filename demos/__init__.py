"""Demo agent programs: one capability each, on the real default model.

Every demo is a module ``demos/NAME.py`` with ``async def main(...) -> dict``: it prints
what it does as it goes (the process's log) and returns a JSON-able result whose
``metrics`` entry holds what it measured. Run one with ``llmos run demos/NAME.py`` on a
running kernel, or let ``llmos demo [NAME ...]`` start a kernel and run them
(``llmos demo --list``). Data the demos use ships in ``demos/data/`` (package data, so
agent hosts on any node read the same files).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Demo:
    name: str
    program: str  # module:function, as proc.spawn takes it
    shows: str  # one line: the capability it demonstrates


DEMOS: tuple[Demo, ...] = (
    Demo("customer_service", "demos.customer_service:main",
         "answers from a shipped FAQ with memory retrieval, cites the entry, hands off "
         "what it cannot answer to a human-queue agent"),
    Demo("classify", "demos.classify:main",
         "sentiment and topic labels with grammar-constrained outputs, accuracy vs the "
         "majority class"),
    Demo("translate", "demos.translate:main",
         "en<->zh translation of short sentences, chrF against shipped references"),
    Demo("summarize", "demos.summarize:main",
         "summary of a shipped article, ROUGE-L against a shipped reference"),
    Demo("recommend", "demos.recommend:main",
         "picks catalogue items from a user's history with embeddings, explains each pick"),
    Demo("smart_home", "demos.smart_home:main",
         "spoken commands become validated tool calls on a device process that owns the "
         "house's state"),
    Demo("tutor", "demos.tutor:main",
         "asks, grades the answer with a rubric in structured output, adapts the next "
         "question"),
    Demo("team", "demos.team:main",
         "planner -> workers -> reviewer over typed messages; a worker crashes and its "
         "supervisor restarts it"),
    Demo("approvals", "demos.approvals:main",
         "a dangerous tool call waits for a person's llmos approve / llmos deny"),
)


def find(name: str) -> Demo:
    """The demo called ``name`` (``-`` and ``_`` alike)."""
    wanted = name.strip().replace("-", "_")
    for demo in DEMOS:
        if demo.name == wanted:
            return demo
    known = ", ".join(d.name for d in DEMOS)
    raise KeyError(f"no demo named {name!r}; known: {known}")


def data_path(name: str):
    """A file shipped in ``demos/data`` (a Traversable: ``.read_text()``, ``.open()``)."""
    return resources.files(__name__) / "data" / name
