"""The ``llmos`` command line: one click group, one module per command family."""

from __future__ import annotations

import os
import sys

import click

from llmos_kernel.errors import LlmosError


def _ray_token_auth() -> None:
    """Speak Ray's token authentication whenever this machine has the token.

    A ``ray start --head`` cluster asks for a token by default (Ray 2.5x) and ``ray start``
    writes it to ``~/.ray/auth_token``, but a client sends it only with RAY_AUTH_MODE=token
    and otherwise fails with a bare connection error. Sending a token to a cluster that asks
    for none is harmless. Ray's core reads the mode once, when Ray is imported, so this
    runs before any command imports it, and not at all in a process that already has
    (there it would split Ray's Python and C++ halves); RAY_AUTH_MODE set by the user
    wins."""
    if "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


_ray_token_auth()


class _Group(click.Group):
    """Turns LlmosError into one clear line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlmosError as e:
            if os.environ.get("LLMOS_DEBUG"):
                raise
            click.echo(f"llmos: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("llmos: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmos")
def main() -> None:
    """llmos: an actor-based LLM operating system.

    Agent programs are processes; a Transformer core is the processor they run
    on; a kernel actor owns memory and schedules every LLM step. Set
    LLMOS_DEBUG=1 to see tracebacks.
    """


def _register() -> None:
    from llmos_kernel.cli import (
        bench,
        chat,
        demo,
        evaluate,
        generate,
        kernel,
        models,
        proc,
        serve,
        top,
        train,
    )

    main.add_command(bench.bench)
    main.add_command(chat.chat)
    main.add_command(demo.demo)
    main.add_command(evaluate.eval_)
    main.add_command(models.models)
    main.add_command(generate.generate)
    main.add_command(kernel.kernel)
    main.add_command(serve.serve)
    main.add_command(top.top)
    main.add_command(train.train)
    for command in proc.COMMANDS:
        main.add_command(command)


_register()
