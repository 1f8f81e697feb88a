"""Customer service from a shipped FAQ: answers that cite their entry, a human queue for the rest.

    llmos run demos/customer_service.py
    llmos run demos/customer_service.py --arg question="Can I pay with PayPal?"

The agent keeps the FAQ of a fictional coffee machine (``demos/data/faq.json``) in its
``memory`` and answers the customers' questions in ``demos/data/support_questions.json``
(each labelled with the entry that answers it, or none). Retrieval and constrained
decoding do what a 135M model cannot do alone: ``memory.search`` picks the entry, and the
model answers by quoting it, under a grammar that admits only the entry's sentences or the
whole entry, so no answer holds a fact the FAQ does not. (Asked to rephrase the entry
freely, the model invents: "We don't accept PayPal." from an entry that says we do.) The
citation is the id of the entry the model was given, so it cannot be invented either. A
question whose best entry scores under ``threshold`` gets "I don't know" instead, and a
``Handoff`` message to a human-queue process that keeps what it receives.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from demos import data_path
from llmos_kernel.messages import message
from syscalls import fs, ipc, llm, memory, proc

# Cosine similarity of a question to its best entry, below which the agent hands off. On the
# shipped questions the right entries score 0.24-0.70 and the unanswerable questions' best
# entries 0.09-0.37: the ranges overlap, as they will for any embedding threshold. 0.33 sits
# in the widest gap inside the overlap (0.32-0.35). It costs two answerable questions, and
# lets through the two unanswerable ones that talk about coffee as the FAQ does (a café, a
# book); the last four unanswerable questions were written after it was chosen, and all
# four fall under it.
THRESHOLD = 0.33
DONT_KNOW = ("I don't know. I have passed your question to a colleague, who will reply "
             "by email.")
SYSTEM = ("You are the support assistant of Morrow, a coffee machine company. Quote the part "
          "of the help centre entry that answers the customer's question.")


@message(name="demo.customer_service.Handoff")
class Handoff:
    """A question the agent could not answer, for a person to take over."""

    question: str
    nearest: str  # the closest FAQ entry, for the person's context
    score: float


@message(name="demo.customer_service.CloseQueue")
class CloseQueue:
    """No more handoffs: the queue exits and returns what it received."""


class HumanQueue:
    """Stands in for the help desk's people: keeps every handoff, in order, and a copy of
    each in its home (``handoffs.jsonl``); exits with all of them on CloseQueue."""

    async def init(self) -> None:
        self.received: list[dict] = []

    async def on_message(self, msg: ipc.Message) -> None:
        if isinstance(msg.body, Handoff):
            ticket = {"ticket": len(self.received) + 1, "from": msg.sender,
                      "question": msg.body.question, "nearest": msg.body.nearest,
                      "score": msg.body.score}
            self.received.append(ticket)
            await fs.append("handoffs.jsonl", json.dumps(ticket) + "\n")
            print(f"ticket {ticket['ticket']}: {ticket['question']}")
        elif isinstance(msg.body, CloseQueue):
            self.stopped, self.result = True, {"received": self.received}


def _load(name: str) -> dict:
    return json.loads(data_path(name).read_text())


def _quotable(answer: str) -> list[str]:
    """The entry's sentences (a short one, like "Yes.", joined to the next), then the whole."""
    spans, lead = [], ""
    for sentence in re.split(r"(?<=[.!?])\s+", answer.strip()):
        if len(sentence.split()) < 4:
            lead += sentence + " "
        else:
            spans.append(lead + sentence)
            lead = ""
    if lead:
        spans.append(lead.strip())
    return spans + [answer] if len(spans) > 1 else [answer]


async def _answer(question: str, entry: dict) -> str:
    """The part of ``entry`` the model quotes as the answer to ``question``."""
    schema = {"enum": _quotable(entry["answer"])}
    reply = await llm.chat(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": f"Help centre entry: {entry['question']}\n"
                                     f"{entry['answer']}\n\nCustomer: {question}"}],
        response_format={"type": "json_schema", "json_schema": {"name": "quote", "schema": schema}},
        max_tokens=128, temperature=0)
    return json.loads(reply.text)


def _rate(hits: int, n: int) -> float | None:
    return round(hits / n, 3) if n else None


def _metrics(faq: list[dict], records: list[dict], threshold: float) -> dict:
    answerable = [r for r in records if r["expected"] is not None]
    unanswerable = [r for r in records if r["expected"] is None]
    handed = [r for r in records if r["handed_off"]]
    return {
        "n": len(records), "n_answerable": len(answerable),
        "n_unanswerable": len(unanswerable), "threshold": threshold,
        "right_entry_rate": _rate(sum(r["cited"] == r["expected"] for r in answerable),
                                  len(answerable)),
        # the same questions if the agent cited the first FAQ entry every time
        "first_entry_baseline": _rate(sum(r["expected"] == faq[0]["id"] for r in answerable),
                                      len(answerable)),
        # the top hit is the right entry, whatever its score (what the threshold costs)
        "retrieval_recall_at_1": _rate(sum(r["nearest"] == r["expected"] for r in answerable),
                                       len(answerable)),
        "handoff_precision": _rate(sum(r["expected"] is None for r in handed), len(handed)),
        "handoff_recall": _rate(sum(r["handed_off"] for r in unanswerable), len(unanswerable)),
    }


async def main(question: str = "", threshold: float = THRESHOLD) -> dict:
    """Answer ``question``, or (by default) every shipped question, and measure the answers."""
    started = time.monotonic()
    faq = _load("faq.json")["entries"]
    entries = {e["id"]: e for e in faq}
    labelled = not question
    questions = (_load("support_questions.json")["questions"] if labelled
                 else [{"text": question, "faq": None}])
    # Memory is per process and outlives it; a run tag keeps a restarted run to its own items.
    run = uuid.uuid4().hex
    stored = await memory.add_many(
        [(f"{e['question']}\n{e['answer']}", {"faq": e["id"], "run": run}) for e in faq])
    print(f"indexed {len(stored)} FAQ entries; answering {len(questions)} question(s), "
          f"handing off below a retrieval score of {threshold}")
    queue = await proc.spawn(HumanQueue, name="human-queue")
    try:
        hits = await asyncio.gather(*(memory.search(q["text"], k=1, where={"run": run})
                                      for q in questions))
        records = [{"question": q["text"], "expected": q["faq"], "nearest": h["metadata"]["faq"],
                    "score": round(h["score"], 3), "handed_off": h["score"] < threshold}
                   for q, (h,) in zip(questions, hits)]
        for r in records:
            if r["handed_off"]:
                await ipc.send(queue, Handoff(r["question"], r["nearest"], r["score"]))
        answers = await asyncio.gather(*(_answer(r["question"], entries[r["nearest"]])
                                         for r in records if not r["handed_off"]))
        found = iter(answers)
        for r in records:
            r["cited"] = None if r["handed_off"] else r["nearest"]
            r["answer"] = DONT_KNOW if r["handed_off"] else f"{next(found)} [{r['cited']}]"
            print(f"Q: {r['question']}\n   (best entry {r['nearest']}, score {r['score']})\n"
                  f"A: {r['answer']}")
        await ipc.send(queue, CloseQueue())
        received = (await proc.wait(queue, timeout=60))["result"]["received"]
    finally:
        await asyncio.gather(*(memory.delete(item["id"]) for item in stored))
    print(f"the human queue received {len(received)} handoff(s)")
    metrics = {"seconds": round(time.monotonic() - started, 1)}
    if labelled:
        metrics |= _metrics(faq, records, threshold)
        right = [r["score"] for r in records if r["expected"] and r["nearest"] == r["expected"]]
        none = [r["score"] for r in records if r["expected"] is None]
        metrics |= {"right_entry_scores": f"{min(right)}-{max(right)}",
                    "unanswerable_scores": f"{min(none)}-{max(none)}"}
        print(f"best-entry scores: right entries {metrics['right_entry_scores']}, unanswerable "
              f"questions {metrics['unanswerable_scores']}; threshold {threshold}")
    print("metrics:", json.dumps(metrics))
    return {"answers": records, "handoffs": received, "queue_pid": queue, "metrics": metrics}
