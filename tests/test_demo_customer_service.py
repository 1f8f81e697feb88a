"""The customer-service demo on the real model: every shipped question is answered from the
FAQ entry it cites, or handed to the human-queue process with "I don't know".

The outcome is checked against the labels in ``demos/data/support_questions.json``, counted
again here rather than read from the demo's own metrics. The thresholds sit under what the
demo measures (the right entry for 19 of 26 answerable questions; 8 of the 10 unanswerable
ones handed off, and 8 of the 10 handoffs unanswerable) with room for a few questions to
change sides.
"""

from __future__ import annotations

import json

from demos import data_path
from syscalls import proc


def test_answers_cite_their_faq_entry_and_the_rest_reach_the_human_queue(kernel):
    pid = kernel.run(proc.spawn("demos.customer_service:main", {},
                                sandbox=True, scratch=True, name="demo-customer-service"))
    exit_ = kernel.run(proc.wait(pid, timeout=600), timeout=660)
    assert exit_["reason"] == "normal", exit_
    result = exit_["result"]
    print("\ncustomer_service metrics:", json.dumps(result["metrics"]))

    entries = {e["id"]: e for e in json.loads(data_path("faq.json").read_text())["entries"]}
    labels = {q["text"]: q["faq"]
              for q in json.loads(data_path("support_questions.json").read_text())["questions"]}
    answers = result["answers"]
    assert [a["question"] for a in answers] == list(labels)

    for a in answers:
        if a["cited"] is None:
            assert a["answer"].startswith("I don't know"), a
            continue
        # the citation is a real entry, and the answer quotes that entry and names it
        assert a["cited"] in entries, a
        quote, _, cite = a["answer"].rpartition(" ")
        assert cite == f"[{a['cited']}]" and quote and quote in entries[a["cited"]]["answer"], a

    answerable = [a for a in answers if labels[a["question"]] is not None]
    right = sum(a["cited"] == labels[a["question"]] for a in answerable) / len(answerable)
    first_entry = sum(labels[a["question"]] == next(iter(entries)) for a in answerable) \
        / len(answerable)
    assert round(right, 3) == result["metrics"]["right_entry_rate"]
    assert right >= 0.6 and right > first_entry + 0.4, (right, first_entry)

    # the human-queue process's own exit record: it received exactly the handed-off questions
    queue = kernel.run(proc.wait(result["queue_pid"], timeout=60))
    assert queue["reason"] == "normal", queue
    received = queue["result"]["received"]
    handed = [a["question"] for a in answers if a["cited"] is None]
    assert [t["question"] for t in received] == handed
    assert all(t["from"] == pid for t in received) and received == result["handoffs"]
    unanswerable = [q for q, faq in labels.items() if faq is None]
    reached = [q for q in unanswerable if q in handed]
    assert len(reached) >= 6, (reached, unanswerable)
    assert sum(labels[q] is None for q in handed) / len(handed) >= 0.6, handed
