"""A tutor asks questions, grades each answer against a rubric, and adapts the next question.

    llmos run demos/tutor.py
    llmos run demos/tutor.py --arg questions=4

The question bank (``tutor_questions.json``) has arithmetic, geography and science questions
at three levels, each with a reference answer, a rubric of key points (each a few accepted
wordings) and three shipped student answers labelled correct, partial and wrong. Students are
processes: each answers a ``tutor.Ask`` message with the shipped answer its skill at that
level calls for. The tutor starts every student at medium; a correct answer moves the next
question one level up, any other answer one level down (within easy..hard).

What decides a grade: the rubric, not the model. ``correct`` is true when every key point is
in the answer (word-bounded, case-insensitive), ``score`` is 3 x the share of key points
found, rounded, and the feedback names the missing points. The model grades every answer
too, in structured output (``response_format`` json_schema: correct, score 0-3, feedback),
and the demo measures how often its ``correct`` agrees with the labels, beside the majority
label and the rubric's agreement: a 135M model grades near chance (below the majority), so
its grade is shown, never used. The rubric's agreement is an upper bound, as the rubric and
the answers were written together; it misses what no key-term check can see (an answer
that swaps two key terms' roles).
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from demos import data_path
from llmos_kernel.messages import message
from syscalls import ipc, llm, proc

LEVELS = ("easy", "medium", "hard")
GRADE_SCHEMA = {
    "type": "object",
    "properties": {"correct": {"type": "boolean"},
                   "score": {"type": "integer", "minimum": 0, "maximum": 3},
                   "feedback": {"type": "string", "maxLength": 80}},
    "required": ["correct", "score", "feedback"],
    "additionalProperties": False,
}
GRADER = ("You are a strict teacher. Grade the student's answer against the reference answer: "
          "it is correct only if it agrees with every key point.")
# name -> the label of the shipped answer the student gives at each level
STUDENTS = {
    "ada": {"easy": "correct", "medium": "correct", "hard": "partial"},
    "ben": {"easy": "correct", "medium": "partial", "hard": "wrong"},
    "cleo": {"easy": "correct", "medium": "correct", "hard": "correct"},
}


@message(name="tutor.Ask")
class Ask:
    question_id: str
    question: str


@message(name="tutor.Answer")
class Answer:
    text: str


def load_bank(name: str = "tutor_questions.json") -> list[dict]:
    return json.loads(data_path(name).read_text())


class Student:
    """A scripted student: answers each question with the shipped answer its skill gives."""

    async def init(self, skill: dict[str, str], bank: str = "tutor_questions.json") -> None:
        self.skill = skill
        self.questions = {q["id"]: q for q in load_bank(bank)}

    async def on_message(self, msg: ipc.Message) -> Answer:
        question = self.questions[msg.body.question_id]
        return Answer(question["answers"][self.skill[question["level"]]])


def rubric_grade(question: dict, answer: str) -> dict:
    """The grade the rubric gives: which key points the answer states, and what that earns."""
    text = answer.lower()
    found = [any(re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text) for term in wordings)
             for wordings in question["key_points"]]
    missing = [wordings[0] for wordings, ok in zip(question["key_points"], found) if not ok]
    feedback = f"Missing or wrong: {', '.join(missing)}." if missing else "All key points."
    return {"correct": not missing, "score": round(3 * sum(found) / len(found)),
            "feedback": feedback}


async def model_grade(question: dict, answer: str, max_tokens: int) -> dict | None:
    """The model's own grade in structured output; None if it ran out of tokens."""
    key_points = "; ".join(wordings[0] for wordings in question["key_points"])
    reply = await llm.chat(
        [{"role": "system", "content": GRADER},
         {"role": "user", "content": f"Question: {question['question']}\n"
                                     f"Reference answer: {question['reference']}\n"
                                     f"Key points: {key_points}\nStudent answer: {answer}"}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "grade", "schema": GRADE_SCHEMA}},
        max_tokens=max_tokens, temperature=0)
    return json.loads(reply.text) if reply.finish_reason == "stop" else None


async def grade(question: dict, answer: str, max_tokens: int) -> dict:
    """The rubric's grade (it decides), with the model's grade beside it."""
    return {**rubric_grade(question, answer),
            "model": await model_grade(question, answer, max_tokens)}


def next_level(level: str, correct: bool) -> str:
    """One level up after a correct answer, one down otherwise, within easy..hard."""
    i = LEVELS.index(level) + (1 if correct else -1)
    return LEVELS[min(max(i, 0), len(LEVELS) - 1)]


def pick(bank: list[dict], level: str, asked: list[str]) -> dict:
    """The next question at ``level``: one not asked yet, taking the topics in turn."""
    at_level = [q for q in bank if q["level"] == level]
    fresh = [q for q in at_level if q["id"] not in asked] or at_level
    return fresh[len(asked) % len(fresh)]


async def session(name: str, skill: dict, bank: list[dict], questions: int,
                  max_tokens: int) -> dict:
    """One student's lesson: ask, grade, adapt, ``questions`` times."""
    student = await proc.spawn(Student, {"skill": skill})
    level, steps = "medium", []
    try:
        for _ in range(questions):
            question = pick(bank, level, [s["id"] for s in steps])
            reply = await ipc.call(student, Ask(question["id"], question["question"]),
                                   timeout=60)
            graded = await grade(question, reply.body.text, max_tokens)
            steps.append({"id": question["id"], "level": level, "answer": reply.body.text,
                          "grade": graded})
            said = graded["model"] or {}
            print(f"[{name}] {level:6} {question['question']}\n"
                  f"         answer: {reply.body.text}\n"
                  f"         grade: correct={graded['correct']} score={graded['score']} "
                  f"({graded['feedback']}); the model said: correct={said.get('correct')} "
                  f"score={said.get('score')}")
            level = next_level(level, graded["correct"])
    finally:
        await proc.kill(student)
    print(f"[{name}] path: {' -> '.join(s['level'] for s in steps)}")
    return {"student": name, "skill": skill, "steps": steps}


async def main(questions: int = 6, max_tokens: int = 96) -> dict:
    """Lessons for the scripted students, and every shipped answer graded against its label."""
    bank = load_bank()
    items = [(q, label, text) for q in bank for label, text in q["answers"].items()]
    print(f"{len(bank)} questions, {len(items)} labelled answers; "
          f"{len(STUDENTS)} students, {questions} questions each")
    started = time.monotonic()
    lessons, graded = await asyncio.gather(
        asyncio.gather(*(session(name, skill, bank, questions, max_tokens)
                         for name, skill in STUDENTS.items())),
        asyncio.gather(*(grade(q, text, max_tokens) for q, _, text in items)))
    elapsed = time.monotonic() - started
    truth = [label == "correct" for _, label, _ in items]
    n = len(items)
    majority = max(sum(truth), n - sum(truth)) / n
    rubric = sum(g["correct"] == t for g, t in zip(graded, truth)) / n
    model = sum(g["model"] is not None and g["model"]["correct"] == t
                for g, t in zip(graded, truth)) / n
    for (q, label, text), g in zip(items, graded):
        if g["correct"] != (label == "correct"):
            print(f"rubric disagrees with the label {label!r}: {q['question']} -> {text!r}")
    metrics = {"answers": n, "grading_agreement": round(rubric, 3),
               "model_grading_agreement": round(model, 3),
               "majority_baseline": round(majority, 3),
               "model_said_correct": sum(bool(g["model"] and g["model"]["correct"])
                                         for g in graded),
               "model_out_of_tokens": sum(g["model"] is None for g in graded),
               "seconds": round(elapsed, 1)}
    for lesson in lessons:
        metrics[f"final_level_{lesson['student']}"] = next_level(
            lesson["steps"][-1]["level"], lesson["steps"][-1]["grade"]["correct"])
    print(f"grading agreement with the labels over {n} answers: rubric {rubric:.0%}, the "
          f"model alone {model:.0%}, majority label {majority:.0%}; {elapsed:.1f}s")
    return {"metrics": metrics, "lessons": lessons,
            "grades": [{"id": q["id"], "label": label, "answer": text, **g}
                       for (q, label, text), g in zip(items, graded)]}
