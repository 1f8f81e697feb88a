"""The kernel's services, handed explicitly to whoever serves syscalls.

The host channel and the syscall handlers get this one object instead of the kernel
actor: what a handler may touch is exactly what is listed here, and a unit test can
build one from fakes. The kernel actor (``llmos_kernel.kernel``) owns and starts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: this module must not pull the services' imports in
    from llmos_kernel.ipc import IPCService
    from llmos_kernel.llm_service import LLMService
    from llmos_kernel.outbox import Outboxes
    from llmos_kernel.processes import ProcessManager
    from llmos_kernel.proctable import Process, ProcessTable
    from llmos_kernel.services.agent_tools import AgentTools
    from llmos_kernel.services.approvals import ApprovalQueue
    from llmos_kernel.services.fs import FileSystem
    from llmos_kernel.services.memory import MemoryService
    from llmos_kernel.services.net import NetService
    from llmos_kernel.services.tools import ToolRegistry
    from llmos_kernel.wire import Usage


@dataclass
class Services:
    table: ProcessTable  # every process, live or exited
    outboxes: Outboxes  # what waits for each host and client
    procs: ProcessManager  # spawn, kill, wait, supervision, hosts
    ipc: IPCService  # messages
    fs: FileSystem  # per-process homes
    tools: ToolRegistry  # built-in and agent tools, grants, approvals
    agent_tools: AgentTools  # tools that run in their owner's host
    llm: LLMService  # the engine
    memory: MemoryService  # long-term memories, embeddings
    approvals: ApprovalQueue  # dangerous tool calls waiting for a person
    log_dir: Path  # one file of output per process
    net: NetService | None = None  # net.fetch for processes allowed some hosts

    def spawned(self, proc: Process) -> None:
        """A process was created: give it its file quota."""
        self.fs.set_quota(proc.pid, proc.quotas.fs_bytes)

    def charge_tokens(self, pid: int, usage: Usage) -> None:
        """Count a finished request's tokens against its process."""
        proc = self.table.procs.get(pid)
        if proc is not None:
            proc.tokens_used += usage.prompt_tokens + usage.completion_tokens
            self.table.save(proc)
