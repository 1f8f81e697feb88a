"""A dangerous tool call waits for a person: the agent asks to delete a file, and nothing is
deleted until someone runs ``llmos approve ID`` (or ``llmos deny ID``).

    llmos run demos/approvals.py
    llmos run demos/approvals.py --arg request="Delete my meeting notes."
    # meanwhile, in another shell:
    llmos approvals            # lists the held call: ID  pid N  delete_file({"path": ...})
    llmos approve ID           # or: llmos deny ID

The agent keeps four files in its home. For the request it ranks them by embedding
similarity and lists them best match first; the model makes the call, ``delete_file`` with
its path constrained by the grammar to the files that exist. Retrieval does the choosing: the
135M model alone names almost any file (it favours the first one shown, or the shortest name
that fits), but given the ranked list it names the top match. ``delete_file`` is the kernel's
dangerous system tool, so ``tools.call`` is held by the kernel's approval queue until a
person decides (the console and ``llmos demo`` decide through the same kernel API); the
program never reads stdin. The result says which decision came (approved, denied, or timed
out after ``approval_timeout_s``) and its effect, checked in the home afterwards. Run it
under the default approval policy ("ask"): a process spawned with approval="auto" is not
asked.
"""

from __future__ import annotations

import copy
import json
import time

from llmos_kernel.errors import PermissionDenied, Timeout
from syscalls import fs, llm, tools

REQUEST = "Delete the old draft of the report."
FILES = {  # name -> its first line, which is what retrieval sees of it
    "final-report.md": "Quarterly report, final version sent to the board.",
    "old-draft.md": "Old draft of the quarterly report, replaced by final-report.md.",
    "meeting-notes.md": "Meeting notes from Monday.",
    "budget.csv": "Budget spreadsheet for next year.",
}
TOOL = "delete_file"


async def _ranked(request: str) -> list[tuple[str, float]]:
    """The files, most similar to the request first (name and first line, embedded)."""
    vectors = await llm.embed([request, *(f"{name}: {line}" for name, line in FILES.items())])
    query = vectors[0]
    scores = {name: round(sum(a * b for a, b in zip(query, v, strict=True)), 3)
              for name, v in zip(FILES, vectors[1:], strict=True)}
    return sorted(scores.items(), key=lambda kv: -kv[1])


async def _tool_for(files: list[str]) -> dict:
    """The kernel's delete_file as the model sees it, its path narrowed to ``files``."""
    entry = next(t for t in await tools.list() if t["function"]["name"] == TOOL)
    offered = copy.deepcopy({"type": entry["type"], "function": entry["function"]})
    offered["function"]["parameters"]["properties"]["path"]["enum"] = files
    return offered


async def main(request: str = REQUEST, approval_timeout_s: float = 300.0) -> dict:
    """Set up the files, let the model ask for a deletion, wait for a person, report."""
    for name, line in FILES.items():
        await fs.write(name, line + "\n")
    before = sorted(e["path"] for e in await fs.list())
    ranked = await _ranked(request)
    files = [name for name, _ in ranked]
    print(f"request: {request!r}; files by similarity: {ranked}")
    reply = await llm.chat(
        [{"role": "system", "content": "You tidy the user's files. Their files, most relevant "
                                       "first: " + "; ".join(f"{n} ({FILES[n]})" for n in files)},
         {"role": "user", "content": request}],
        tools=[await _tool_for(files)], tool_choice="required", max_tokens=40, temperature=0)
    path = json.loads(reply.tool_calls[0]["function"]["arguments"])["path"]
    print(f"the model asks for {TOOL}(path={path!r})")

    print(f"{TOOL} is dangerous: the kernel holds the call until a person decides. Waiting for "
          f"a person (at most {approval_timeout_s:g} s): run `llmos approvals`, then "
          "`llmos approve ID` or `llmos deny ID`")
    asked = time.monotonic()
    try:
        outcome = await tools.call(TOOL, path=path, approval_timeout_s=approval_timeout_s)
        decision = "approved"
    except PermissionDenied as e:  # a person said no
        outcome, decision = str(e), "denied"
    except Timeout as e:  # nobody decided in time: the call was not made
        outcome, decision = str(e), "timed out"
    waited = time.monotonic() - asked
    after = sorted(e["path"] for e in await fs.list())
    gone = sorted(set(before) - set(after))
    effect = f"deleted {', '.join(gone)}" if gone else f"{path} is still there"
    print(f"decision: {decision} after {waited:.1f} s ({outcome}); effect: {effect}; "
          f"files now: {after}")
    return {"request": request, "call": {"tool": TOOL, "args": {"path": path}},
            "ranked": ranked, "decision": decision, "kernel_said": outcome, "effect": effect,
            "files_before": before, "files_after": after,
            "metrics": {"decision": decision, "waited_s": round(waited, 1),
                        "files_deleted": len(gone),
                        "picked_rank": files.index(path) + 1,
                        "model_tokens": reply.usage["completion_tokens"]}}
