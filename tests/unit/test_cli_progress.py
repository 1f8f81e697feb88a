"""``llmos kernel start``'s progress lines where stderr is not a terminal (logs, CI)."""

from __future__ import annotations

import click
from click.testing import CliRunner

from llmos_kernel.cli.progress import Phases


def test_each_phase_is_one_line_with_its_start_time():
    @click.command()
    def cmd() -> None:
        with Phases() as phases:
            phases.phase("starting Ray")
            phases.phase("loading weights")
            assert phases.elapsed() >= 0

    result = CliRunner().invoke(cmd)
    lines = result.stderr.splitlines()
    assert result.exit_code == 0, result.output
    assert [line.split("] ", 1)[1] for line in lines] == ["starting Ray", "loading weights"]
    assert all(line.startswith("[") and line.split("]")[0].strip("[ s").replace(".", "")
               .isdigit() for line in lines)
