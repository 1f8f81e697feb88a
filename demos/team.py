"""A team over typed messages: planner -> writers -> reviewer; a writer crashes mid-task, the
kernel restarts it, and the document is still finished.

    llmos run demos/team.py
    llmos run demos/team.py --arg goal="a one-page guide to camping" --arg crash=false

``main`` coordinates and supervises: it spawns a planner, three writers (restart="permanent")
and a reviewer, all behaviours that answer ``ipc.call`` with a declared message type. The
planner's outline is grammar-constrained JSON (an array of at most ``max_sections`` short
titles, so it always parses; a title the 135M model repeats is dropped). Each writer drafts
its sections into its own home; the reviewer approves or sends a section back with a reason,
and a section gets at most one revision. The document is assembled and written with fs.

The crash: writer 1 raises in its handler after drafting its first section. The kernel ends
that incarnation ("error"), restarts the permanent writer under the same pid and home, and
makes the message it was handling a dead letter (never delivered again, so one bad message
cannot crash-loop a worker): that ``ipc.call`` fails at once with CallFailed, saying the
handler raised. The coordinator monitors every writer, so the kernel's ProcessDown notice
tells it how the writer went down, and it sends the unfinished task again, to the restarted
writer. (A writer whose host died instead would get the task again from the kernel, and
answer the same call.) A writer crashes
once only: it leaves a marker in its home, which survives the restart. The restart counts
reported come from the kernel's process table (``proc.ps``), not from the coordinator.

What the 135M model is trusted with: the outline (constrained) and the prose. It is not asked
for verdicts: asked "approve or revise?" it gives the same answer for every section. The
reviewer checks what a program can check: finished sentences, length, and whether the text is
about its title by embedding similarity (``llm.embed``). A section still sent back after its
one revision is kept as it is; ``metrics`` counts how many the reviewer approved in the end.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from llmos_kernel.errors import CallFailed
from llmos_kernel.messages import message
from syscalls import fs, ipc, llm, proc

GOAL = "a one-page guide to brewing tea"
CALL_TIMEOUT_S = 600.0
MAX_WORDS = 80  # a section longer than this is sent back
MIN_SIMILARITY = 0.45  # cosine between "goal: title" and the text, below which it is off-topic
CRASH_MARKER = "crashed-once"
SENTENCE_END_ANYWHERE = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
EXAMPLE_GOAL = "a one-page guide to growing tomatoes"  # the planner's one worked example
EXAMPLE_PLAN = ["Choosing a sunny spot", "Planting the seedlings", "Watering and feeding",
                "Picking the fruit"]


@message(name="demo.team.PlanRequest")
class PlanRequest:
    goal: str
    max_sections: int


@message(name="demo.team.Plan")
class Plan:
    sections: list[str]


@message(name="demo.team.WriteSection")
class WriteSection:
    index: int
    title: str
    goal: str
    feedback: str = ""  # the reviewer's reason, when this is a revision


@message(name="demo.team.Section")
class Section:
    index: int
    title: str
    text: str
    writer: int
    tokens: int


@message(name="demo.team.ReviewSection")
class ReviewSection:
    index: int
    title: str
    goal: str
    text: str


@message(name="demo.team.Review")
class Review:
    index: int
    verdict: str  # "approve" or "revise"
    reason: str
    similarity: float


def _whole_sentences(text: str) -> str:
    """The text up to its last finished sentence (a draft cut off by max_tokens ends mid-way)."""
    text = text.strip()
    ends = list(SENTENCE_END_ANYWHERE.finditer(text))
    return text[:ends[-1].end()] if ends else text


class Planner:
    """Answers a PlanRequest with section titles, as JSON the grammar keeps to the schema."""

    async def on_message(self, msg: ipc.Message) -> Plan:
        ask = msg.body
        schema = {"type": "object", "additionalProperties": False, "required": ["sections"],
                  "properties": {"sections": {
                      "type": "array", "minItems": 2, "maxItems": ask.max_sections,
                      "items": {"type": "string", "minLength": 3, "maxLength": 40}}}}
        reply = await llm.chat(
            [{"role": "system", "content": "You plan short documents: give each section a "
                                           "short title."},
             {"role": "user", "content": f"Plan {EXAMPLE_GOAL}."},
             {"role": "assistant", "content": json.dumps({"sections": EXAMPLE_PLAN})},
             {"role": "user", "content": f"Plan {ask.goal}."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "plan", "schema": schema}},
            max_tokens=90, temperature=0, presence_penalty=0.6)
        titles = json.loads(reply.text)["sections"]
        print(f"planned {titles}")
        return Plan(titles)


class Writer:
    """Drafts a section (or revises it after a review) into its home and answers with it.

    ``crash_on_task``: the task number (1 = its first) on which this writer raises after
    drafting, once in its life (a marker in its home remembers it across restarts).
    """

    async def init(self, crash_on_task: int = 0) -> None:
        self.crash_on_task = crash_on_task
        self.tasks = 0

    async def on_message(self, msg: ipc.Message) -> Section:
        task = msg.body
        self.tasks += 1
        ask = f"Section: {task.title}" + (f"\n{task.feedback}" if task.feedback else "")
        reply = await llm.chat(
            [{"role": "system", "content": f"You are writing {task.goal}. Write only the "
                                           "section you are given: two or three short, plain "
                                           "sentences, no title."},
             {"role": "user", "content": ask}],
            max_tokens=80, temperature=0, repetition_penalty=1.1)
        text = _whole_sentences(reply.text)
        await fs.write(f"sections/{task.index:02d}.md", f"## {task.title}\n\n{text}\n")
        if self.tasks == self.crash_on_task and not await fs.exists(CRASH_MARKER):
            await fs.write(CRASH_MARKER, f"crashed while writing section {task.index}\n")
            print(f"crashing on purpose while writing section {task.index} ({task.title!r})")
            raise RuntimeError(f"simulated crash while writing section {task.index}")
        print(f"wrote section {task.index} ({task.title!r}, {len(text.split())} words)")
        return Section(task.index, task.title, text, proc.pid(),
                       reply.usage["completion_tokens"])


class Reviewer:
    """Approves a section that is finished, short enough and about its title; else says why."""

    async def on_message(self, msg: ipc.Message) -> Review:
        s = msg.body
        topic, body = await llm.embed([f"{s.goal}: {s.title}", s.text or "(empty)"])
        similarity = round(sum(a * b for a, b in zip(topic, body, strict=True)), 3)
        problems = []
        if not SENTENCE_END.search(s.text):
            problems.append("End with a full stop.")
        if len(s.text.split()) > MAX_WORDS:
            problems.append(f"Use at most {MAX_WORDS} words.")
        if similarity < MIN_SIMILARITY:
            problems.append(f"Write about {s.title.lower()} and nothing else.")
        verdict = "revise" if problems else "approve"
        reason = " ".join(problems) or "Finished, short and about its title."
        print(f"section {s.index}: {verdict} (similarity {similarity}) {reason}")
        return Review(s.index, verdict, reason, similarity)


class Team:
    """The coordinator's view of its writers: which one is down, and the calls it resends."""

    def __init__(self, writers: dict[int, str]) -> None:
        self.writers = writers  # pid -> name
        self.downs: dict[int, asyncio.Queue] = {pid: asyncio.Queue() for pid in writers}
        self.crashes: list[dict] = []  # what the kernel's ProcessDown notices said

    async def watch(self) -> None:
        """Route the kernel's ProcessDown notices to the writer they are about."""
        while True:
            note = await ipc.recv(type=proc.ProcessDown)
            ipc.done()
            if note.body.pid in self.downs:
                self.downs[note.body.pid].put_nowait(note.body.reason)

    async def call(self, pid: int, task: WriteSection) -> Section:
        """Ask ``pid`` for a section; if its handler crashed on it, ask its next incarnation."""
        while True:
            try:
                return (await ipc.call(pid, task, timeout=CALL_TIMEOUT_S)).body
            except CallFailed:  # the handler raised: this incarnation is down, or going
                reason = await self.downs[pid].get()  # how: the kernel's ProcessDown
            crash = {"pid": pid, "name": self.writers[pid], "reason": reason,
                     "section": task.index, "title": task.title}
            self.crashes.append(crash)
            print(f"{crash['name']} (pid {pid}) went down ({crash['reason']}) while writing "
                  f"section {task.index}; it is permanent, so the kernel restarts it: sending "
                  "the task again")


async def _write_and_review(team: Team, pid: int, reviewer: int, goal: str,
                            tasks: list[tuple[int, str]]) -> list[dict]:
    """One writer's share: each section drafted, reviewed, revised at most once."""
    async def draft(index: int, title: str, feedback: str = "") -> tuple[Section, Review]:
        section = await team.call(pid, WriteSection(index, title, goal, feedback))
        review = await ipc.call(reviewer, ReviewSection(index, title, goal, section.text),
                                timeout=CALL_TIMEOUT_S)
        return section, review.body

    done = []
    for index, title in tasks:
        section, first = await draft(index, title)
        review = first
        if first.verdict == "revise":
            section, review = await draft(index, title, first.reason)
        outcome = first.verdict if first is review else (
            f"revise ({first.reason}); after one revision: {review.verdict}"
            + (" (kept as it is: one revision at most)" if review.verdict == "revise" else ""))
        print(f"section {index} ({title!r}) by {team.writers[pid]}: {outcome}")
        done.append({"index": index, "title": title, "text": section.text,
                     "writer": team.writers[pid], "tokens": section.tokens,
                     "first_verdict": first.verdict, "first_reason": first.reason,
                     "final_verdict": review.verdict, "final_reason": review.reason,
                     "similarity": review.similarity, "revised": first.verdict == "revise"})
    return done


async def main(goal: str = GOAL, writers: int = 3, max_sections: int = 4,
               crash: bool = True) -> dict:
    """Plan, write, review and assemble ``goal``; writer 1 crashes once when ``crash``."""
    started = time.monotonic()
    me = proc.pid()
    planner = await proc.spawn(Planner, name=f"team{me}-planner")
    reviewer = await proc.spawn(Reviewer, name=f"team{me}-reviewer")
    names = {}
    for n in range(writers):
        pid = await proc.spawn(Writer, {"crash_on_task": int(crash and n == 1)},
                               name=f"team{me}-writer-{n}", restart="permanent")
        await proc.monitor(pid)
        names[pid] = f"writer-{n}"
    team = Team(names)
    watcher = asyncio.ensure_future(team.watch())
    print(f"team: planner {planner}, reviewer {reviewer}, writers "
          f"{', '.join(f'{n} (pid {p})' for p, n in names.items())}")

    titles = (await ipc.call(planner, PlanRequest(goal, max_sections),
                             timeout=CALL_TIMEOUT_S)).body.sections
    outline = list(dict.fromkeys(t.strip() for t in titles if t.strip()))  # drop repeats
    print(f"outline of {goal!r}: {outline}")
    pids = list(names)
    shares = {pid: [(i, t) for i, t in enumerate(outline) if i % len(pids) == k]
              for k, pid in enumerate(pids)}
    results = await asyncio.gather(*(_write_and_review(team, pid, reviewer, goal, share)
                                     for pid, share in shares.items() if share))
    sections = sorted((s for share in results for s in share), key=lambda s: s["index"])

    document = f"# {goal[0].upper()}{goal[1:]}\n\n" + "\n\n".join(
        f"## {s['title']}\n\n{s['text']}" for s in sections) + "\n"
    await fs.write("document.md", document)
    watcher.cancel()
    rows = {p["pid"]: p for p in await proc.ps()}
    restarts = {names[pid]: rows[pid]["restarts"] for pid in pids}
    tokens = sum(rows[pid]["tokens_used"] for pid in [planner, reviewer, *pids])
    for pid in [planner, reviewer, *pids]:
        await proc.kill(pid)
    for c in team.crashes:
        print(f"{c['name']} crashed while writing section {c['section']} and was restarted "
              f"by the kernel ({restarts[c['name']]} restart(s) in its process record)")
    print(f"wrote document.md: {len(sections)} sections, "
          f"{sum(s['revised'] for s in sections)} revised after review")
    print(document)
    return {"goal": goal, "outline": outline, "document": document, "sections": sections,
            "writers": {name: pid for pid, name in names.items()},
            "crashed": team.crashes, "restarts": restarts,
            "metrics": {"sections": len(sections),
                        "approved_first_time": sum(not s["revised"] for s in sections),
                        "revised": sum(s["revised"] for s in sections),
                        "approved_in_the_end": sum(s["final_verdict"] == "approve"
                                                   for s in sections),
                        "crashes_seen": len(team.crashes),
                        "restarts": sum(restarts.values()),
                        "team_tokens": tokens,
                        "wall_s": round(time.monotonic() - started, 1)}}
