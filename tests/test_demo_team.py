"""demos/team.py on the real model: a writer crashes mid-task, the kernel restarts it, and the
document still has every planned section. The crash and the restart are checked in the
kernel's own records (process table, dead letters, logs), not only in what the demo says."""

from __future__ import annotations

from syscalls import proc


def test_team_finishes_the_document_although_a_writer_crashed(kernel):
    pid = kernel.run(proc.spawn("demos.team:main", {},
                                sandbox=True, scratch=True, name="demo-team"))
    exit_ = kernel.run(proc.wait(pid, timeout=600), timeout=660)
    assert exit_["reason"] == "normal", exit_
    result = exit_["result"]
    print("team metrics:", result["metrics"])

    writers = result["writers"]
    rows = {p["pid"]: p for p in kernel.call("ps")}
    assert {name: rows[p]["restarts"] for name, p in writers.items()} == {
        "writer-0": 0, "writer-1": 1, "writer-2": 0}, "the kernel restarted writer-1 once"
    lost = kernel.call("dead_letters", writers["writer-1"])
    assert [d["type"] for d in lost] == ["demo.team.WriteSection"]
    assert "RuntimeError" in lost[0]["reason"], lost
    assert [(c["name"], c["reason"]) for c in result["crashed"]] == [("writer-1", "error")]

    outline, document = result["outline"], result["document"]
    assert len(outline) >= 3 and len(set(outline)) == len(outline)
    assert [s["title"] for s in result["sections"]] == outline
    for section in result["sections"]:
        assert section["text"] and f"## {section['title']}\n\n{section['text']}" in document
    crashed = result["crashed"][0]["section"]
    assert result["sections"][crashed]["writer"] == "writer-1", "the restarted writer wrote it"
    approved = result["metrics"]["approved_in_the_end"]
    assert approved >= len(outline) // 2, f"the reviewer approved only {approved} sections"

    log = kernel.call("logs", pid)["text"]
    assert "writer-1 crashed while writing section" in log and "was restarted" in log, log
