"""The tutor demo on the real model: rubric grades in the grade schema, and a path that follows
the difficulty rule.

The expected paths are worked out here from the shipped labels (a correct answer moves one
level up, any other one down), not from the demo's grader; the agreement threshold is what
the rubric reaches on the shipped answers with margin (measured 98%, majority label 67%).
"""

from __future__ import annotations

import jsonschema

from demos.tutor import GRADE_SCHEMA, STUDENTS, load_bank, rubric_grade
from syscalls import proc


def test_the_rubric_counts_key_points_by_whole_words():
    paris = next(q for q in load_bank() if q["reference"].startswith("Paris"))
    assert rubric_grade(paris, "It's Paris, on the Seine.") == {
        "correct": True, "score": 3, "feedback": "All key points."}
    half = rubric_grade(paris, "Paris, on the Thames.")
    assert (half["correct"], half["score"]) == (False, 2) and "seine" in half["feedback"]
    assert rubric_grade(paris, "Parisian suburbs on the Seineside")["score"] == 0


def test_lessons_follow_the_difficulty_rule_and_grades_agree_with_the_labels(kernel):
    pid = kernel.run(proc.spawn("demos.tutor:main", {},
                                sandbox=True, scratch=True, name="test-tutor"))
    exit_ = kernel.run(proc.wait(pid, timeout=600), timeout=660)
    assert exit_["reason"] == "normal", exit_
    report = exit_["result"]
    metrics = report["metrics"]
    print(f"\ntutor metrics: {metrics}")

    grade_fields = ("correct", "score", "feedback")
    for g in report["grades"]:
        jsonschema.validate({k: g[k] for k in grade_fields}, GRADE_SCHEMA)
        jsonschema.validate(g["model"], GRADE_SCHEMA)  # the model's own, grammar-constrained
    assert metrics["answers"] == len(report["grades"]) == 3 * len(load_bank())
    assert metrics["grading_agreement"] >= 0.9
    assert metrics["grading_agreement"] > metrics["majority_baseline"] + 0.2
    assert 0 <= metrics["model_grading_agreement"] <= 1

    bank = {q["id"]: q for q in load_bank()}
    levels = ["easy", "medium", "hard"]
    assert {lesson["student"] for lesson in report["lessons"]} == set(STUDENTS)
    for lesson in report["lessons"]:
        skill, steps = lesson["skill"], lesson["steps"]
        level, path = "medium", []
        for step in steps:
            question = bank[step["id"]]
            assert question["level"] == step["level"] == level
            assert step["answer"] == question["answers"][skill[level]]  # the student's own
            jsonschema.validate({k: step["grade"][k] for k in grade_fields}, GRADE_SCHEMA)
            assert step["grade"]["correct"] == (skill[level] == "correct")
            path.append(level)
            step_up = 1 if skill[level] == "correct" else -1
            level = levels[min(max(levels.index(level) + step_up, 0), 2)]
        assert len({s["id"] for s in steps}) == len(steps)  # no question asked twice
        print(f"{lesson['student']}: {' -> '.join(path)}")
    paths = {lesson["student"]: [s["level"] for s in lesson["steps"]]
             for lesson in report["lessons"]}
    assert "hard" not in paths["ben"][1:] and paths["cleo"][1:] == ["hard"] * 5
