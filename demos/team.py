"""A small team of agents: a coordinator hands writing tasks to two writer processes.

Run it under a kernel with ``llmos run demos/team.py --arg topics=tea,rivers`` (or let
``llmos demo`` run it). It shows processes, typed messages with request/reply,
supervision (writers are permanent: if one crashes it is restarted), the model
as a syscall, and files in each agent's jailed home.
"""

from __future__ import annotations

import asyncio

from llmos_kernel.messages import message
from syscalls import fs, ipc, llm, proc


@message(name="demo.WriteTask")
class WriteTask:
    topic: str
    words: int = 40


@message(name="demo.Draft")
class Draft:
    topic: str
    text: str
    tokens: int


class Writer:
    """Answers each WriteTask with a short paragraph, and keeps a copy in its home."""

    async def init(self, style: str = "plain") -> None:
        self.style = style

    async def on_message(self, msg: ipc.Message) -> Draft:
        task = msg.body
        reply = await llm.chat(
            [{"role": "system", "content": f"You write {self.style}, factual prose."},
             {"role": "user", "content": f"Write about {task.words} words about {task.topic}."}],
            max_tokens=task.words * 2, temperature=0, repetition_penalty=1.2)
        await fs.write(f"drafts/{task.topic}.md", reply.text)
        return Draft(task.topic, reply.text, reply.usage["completion_tokens"])


async def main(topics: str = "tea,rivers,lighthouses,volcanoes") -> dict:
    """Spawn two writers, split the topics between them, gather the drafts."""
    writers = [await proc.spawn(Writer, {"style": style}, name=f"writer-{i}",
                                restart="permanent")
               for i, style in enumerate(("plain", "vivid"))]
    wanted = [t.strip() for t in topics.split(",") if t.strip()]
    replies = await asyncio.gather(*(
        ipc.call(writers[i % len(writers)], WriteTask(topic), timeout=600)
        for i, topic in enumerate(wanted)))
    drafts = {r.body.topic: r.body.text for r in replies}
    summary = "\n\n".join(f"## {topic}\n{text}" for topic, text in drafts.items())
    await fs.write("summary.md", summary)
    for pid in writers:
        await proc.kill(pid)
    return {"drafts": drafts, "writers": writers,
            "tokens": sum(r.body.tokens for r in replies)}
