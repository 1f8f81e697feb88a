"""A training run as a kernel process: ``llmos train lora ... --kernel``.

The process is a program like any agent's (spawned at low priority, listed by ``llmos ps``,
killed by ``llmos kill``); the training itself runs in a child OS process in the idle scheduling
class (SCHED_IDLE, and nice 19) and on one core fewer than the machine has, so neither the agent host's
event loop nor the kernel's engine loop waits on it and the model shard keeps a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

NICE = 19


def _lowest_priority() -> None:
    """In the trainer, before exec: SCHED_IDLE (it runs only on CPU time nothing else
    wants, which nice 19 alone does not give: CFS still hands a nice-19 task a share), and
    nice 19 where the scheduling class cannot be changed."""
    os.nice(NICE)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


async def main(argv: list[str]) -> dict:
    """Run ``llmos train lora *argv`` niced; its progress lines are this process's output.
    Returns the adapter's folder; raises if training fails."""
    if "--threads" not in argv:
        argv = [*argv, "--threads", str(max(1, len(os.sched_getaffinity(0)) - 1))]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmos_kernel.cli", "train", "lora", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=_lowest_priority)
    tail: list[str] = []

    async def relay() -> None:
        async for line in child.stderr:
            text = line.decode(errors="replace").rstrip()
            tail[:] = (tail + [text])[-5:]
            print(text, flush=True)

    relaying = asyncio.ensure_future(relay())
    try:
        out = await child.stdout.read()
        await child.wait()
    except asyncio.CancelledError:  # killed: take the trainer down too
        child.kill()
        raise
    finally:
        await relaying
    if child.returncode != 0:
        raise RuntimeError(f"llmos train lora failed ({child.returncode}): " + " | ".join(tail))
    return {"adapter": out.decode().strip()}
