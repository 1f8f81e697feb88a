"""The demo registry and ``llmos demo``'s arguments, without running a demo: every listed
demo is a module with a docstring that says how to run it and an ``async def main`` whose
arguments all have defaults (``llmos demo`` calls it with none), and every data file a demo
reads ships in ``demos/data``. Read from the source (ast), so no demo is imported here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import demos
from llmos_kernel.cli.demo import _parse_args
from llmos_kernel.errors import InvalidArgument

DEMOS_DIR = Path(demos.__file__).parent


@pytest.mark.parametrize("demo", demos.DEMOS, ids=lambda d: d.name)
def test_each_demo_is_a_runnable_documented_program(demo):
    module, _, function = demo.program.partition(":")
    source = (DEMOS_DIR / f"{module.split('.')[-1]}.py").read_text()
    tree = ast.parse(source)
    doc = ast.get_docstring(tree)
    assert doc and doc.splitlines()[0].strip(), "a demo says what it shows in its first line"
    assert f"llmos run demos/{demo.name}.py" in doc, "and how to run it"
    mains = [n for n in tree.body if isinstance(n, ast.AsyncFunctionDef) and n.name == function]
    assert len(mains) == 1, f"{demo.program}: no async def {function}"
    args = mains[0].args
    assert not args.args[:len(args.args) - len(args.defaults)], "every argument has a default"
    assert all(d is not None for d in args.kw_defaults)
    for name in re.findall(r"data_path\(\s*[\"']([^\"']+)[\"']", source):
        assert demos.data_path(name).is_file(), f"{demo.name} reads demos/data/{name}"


def test_every_demo_module_is_listed():
    listed = {d.program.partition(":")[0].split(".")[-1] for d in demos.DEMOS}
    modules = {p.stem for p in DEMOS_DIR.glob("*.py") if p.stem != "__init__"}
    assert modules == listed


def test_find_takes_dashes_and_names_the_known_ones():
    assert demos.find("smart-home").name == "smart_home"
    with pytest.raises(KeyError, match="known: customer_service"):
        demos.find("chess")


def test_demo_arguments_go_to_the_named_demo():
    got = _parse_args(("team.goal=tea", "classify.limit=20", "team.crash=false"),
                      ["team", "classify"])
    assert got == {"team": {"goal": "tea", "crash": False}, "classify": {"limit": 20}}
    for bad in ("team=1", "goal=tea", "team.=1", "tutor.level=1"):
        with pytest.raises(InvalidArgument):
            _parse_args((bad,), ["team", "classify"])
