"""The layering ARCHITECTURE.md draws, checked over the real import graph.

import-linter checks the contracts declared in pyproject.toml (layers and forbidden
imports); grimp's graph, which import-linter builds on, finds cycles. Both read the
source, so these run in a second or two without importing llmos.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("llmos_kernel", "actors", "syscalls", "demos")
MAX_LINES = 600


def test_the_import_contracts_hold():
    """Layers: programs -> syscalls -> runtime -> kernel -> services -> engine -> core."""
    lint = str(Path(sys.executable).parent / "lint-imports")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), among ``modules``."""
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_among_kernel_modules():
    """Type-only imports count too: a cycle there is still a circle a reader must follow."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    graph = grimp.build_graph("llmos_kernel", cache_dir=None)
    assert _cycles(graph, set(graph.modules)) == []


def test_no_import_cycle_at_run_time_in_the_runtime_and_syscalls():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    assert _cycles(graph, set(graph.modules)) == []


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_600_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{lines} lines: split it along one idea per module"


WIRE_PATHS = [  # every module that builds or reads what crosses a process boundary
    *(ROOT / "actors").glob("*.py"), *(ROOT / "syscalls").glob("*.py"),
    *(ROOT / "llmos_kernel" / m for m in (
        "kernel.py", "host_channel.py", "syscall_table.py", "ipc.py", "processes.py",
        "llm_service.py", "client.py", "launcher.py", "outbox.py", "wire.py",
        "services/agent_tools.py", "services/registry.py"))]
# Not a message kind: the metadata an archived conversation turn is stored with, which
# programs search by (``where={"kind": "archived_turn"}``).
ALLOWED = {"items = [(_line(m)[:ARCHIVE_CHARS], {\"kind\": kind}) for m in turns]"}


def test_wire_paths_build_no_kind_dicts_and_index_no_ops():
    """Messages across processes are declared structs (llmos_kernel.wire), not dicts with a
    "kind" key or lists read by position."""
    offenders = []
    for path in WIRE_PATHS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() in ALLOWED:
                continue
            if '"kind":' in line or re.search(r"\bop\[\d\]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
