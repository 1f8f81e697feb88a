"""The process table: every agent process the kernel knows, persisted in the state dir.

A process record says what program runs, with which arguments, for whom
(parent, tenant), how important it is (priority), how much it may use
(quotas), and what happens when it exits (restart type, and the strategy it
applies as a supervisor of its own children). Capabilities are stored only as
hashes; a capability presented with a syscall is looked up by its hash.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import msgpack

from llmos_kernel.errors import InvalidArgument, NoSuchProcess

KERNEL_PID = 0  # the kernel itself: parent of top-level processes, sender of notices
RESTART_TYPES = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


@dataclass
class RestartSpec:
    """OTP-style: how this process is restarted, and how it supervises its children."""

    restart: str = "temporary"
    strategy: str = "one_for_one"
    intensity: int = 3  # at most this many child restarts...
    period_s: float = 5.0  # ...within this window, else the supervisor gives up (escalates)

    def validate(self) -> RestartSpec:
        if self.restart not in RESTART_TYPES:
            raise InvalidArgument(f"restart must be one of {', '.join(RESTART_TYPES)}, "
                                  f"got {self.restart!r}")
        if self.strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}, "
                                  f"got {self.strategy!r}")
        if not isinstance(self.intensity, int) or self.intensity < 0:
            raise InvalidArgument("intensity must be an int >= 0")
        if not isinstance(self.period_s, int | float) or self.period_s <= 0:
            raise InvalidArgument("period_s must be a positive number")
        return self


@dataclass
class Quotas:
    """Per-process budgets; None means unlimited."""

    tokens: int | None = None  # LLM tokens, prompt + completion, over the process's life
    kv_bytes: int | None = None  # KV bytes one of its requests may hold
    fs_bytes: int = 64 << 20
    mailbox: int = 10_000  # pending messages; senders get QuotaExceeded past this
    memory_items: int = 100_000
    # a sandboxed process's rlimits (actors.sandbox_policy.Limits has the same names)
    memory_bytes: int | None = 2 << 30  # address space
    cpu_s: int | None = None  # CPU seconds over its life
    open_files: int = 256
    file_bytes: int = 64 << 20  # the largest file it may write in its scratch dir

    def validate(self) -> Quotas:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in ("tokens", "kv_bytes", "memory_bytes", "cpu_s"):
                continue
            least = 1 if f.name in LIMITS else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise InvalidArgument(f"quota {f.name} must be an int >= {least}, got {v!r}")
        return self

    def limits(self) -> dict:
        """The rlimits of a sandboxed process, by name."""
        return {name: getattr(self, name) for name in LIMITS}


LIMITS = ("memory_bytes", "cpu_s", "open_files", "file_bytes")


@dataclass
class Process:
    pid: int
    program: dict  # a wire.Program's plain form
    args: dict = field(default_factory=dict)
    name: str | None = None
    parent: int = KERNEL_PID
    tenant: str = ""
    priority: int = 0
    quotas: Quotas = field(default_factory=Quotas)
    restart: RestartSpec = field(default_factory=RestartSpec)
    tools: list[str] | None = None  # allowlist; None = every system tool
    approval: str = "ask"  # for dangerous tools: ask | auto | deny
    trap_exits: bool = False
    isolated: bool = False
    sandbox: bool = False  # runs in a sandboxed child of its host (actors.sandbox)
    scratch: bool = False  # with a private writable dir there
    net: list[str] = field(default_factory=list)  # hosts net.fetch may reach (none: nowhere)
    resources: dict = field(default_factory=dict)
    placement: str | None = None  # the shared host it asked to run on
    node: str | None = None  # the Ray node its own host must run on
    host: str | None = None
    status: str = "starting"
    exit: dict | None = None
    created: float = field(default_factory=time.time)
    restarts: list[float] = field(default_factory=list)  # times this process was restarted
    child_restarts: list[float] = field(default_factory=list)  # its supervisor's clock
    tokens_used: int = 0
    cap_hash: str = ""
    links: list[int] = field(default_factory=list)
    monitors: list[int] = field(default_factory=list)  # pids watching this one
    grants: list[int] = field(default_factory=list)  # pids allowed to signal this one

    @property
    def attached(self) -> bool:
        """A driver script's process: it runs its own code, nobody spawned it."""
        return self.program.get("kind") == "attached"

    @property
    def alive(self) -> bool:
        """Running, or being stopped or restarted (its exit has not been reported yet)."""
        return self.status != "exited"

    def summary(self) -> dict:
        return {"pid": self.pid, "name": self.name, "parent": self.parent, "status": self.status,
                "priority": self.priority, "host": self.host, "restarts": len(self.restarts),
                "tokens_used": self.tokens_used, "program": program_label(self.program),
                "created": self.created, "exit": self.exit, "sandbox": self.sandbox,
                "net": self.net}


def program_label(program: dict) -> str:
    return str(program.get("label") or program.get("kind"))


@functools.lru_cache(maxsize=1 << 16)
def cap_hash(capability: str) -> str:
    return hashlib.sha256(capability.encode()).hexdigest()


def new_capability() -> str:
    return secrets.token_urlsafe(24)


class ProcessTable:
    """Records in memory, written through to SQLite so a restarted kernel finds them."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS processes (pid INTEGER PRIMARY KEY, "
                        "record BLOB NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.lock = threading.Lock()
        self.procs: dict[int, Process] = {}
        self.by_cap: dict[str, int] = {}
        for (record,) in self.db.execute("SELECT record FROM processes"):
            proc = _from_record(record)
            self.procs[proc.pid] = proc
            if proc.cap_hash:
                self.by_cap[proc.cap_hash] = proc.pid
        row = self.db.execute("SELECT value FROM meta WHERE key='next_pid'").fetchone()
        self.next_pid = max([int(row[0]) if row else 1, *[p + 1 for p in self.procs]])

    def create(self, proc_fields: dict) -> tuple[Process, str]:
        """Allocate a pid and a capability; the capability is returned once, stored hashed."""
        with self.lock:
            pid = self.next_pid
            self.next_pid += 1
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('next_pid', ?)",
                            (str(self.next_pid),))
        cap = new_capability()
        proc = Process(pid=pid, cap_hash=cap_hash(cap), **proc_fields)
        self.procs[pid] = proc
        self.by_cap[proc.cap_hash] = pid
        self.save(proc)
        return proc, cap

    def reissue(self, proc: Process) -> str:
        """A new capability for a restarted process (the old one stops working)."""
        self.by_cap.pop(proc.cap_hash, None)
        cap = new_capability()
        proc.cap_hash = cap_hash(cap)
        self.by_cap[proc.cap_hash] = proc.pid
        self.save(proc)
        return cap

    def save(self, proc: Process) -> None:
        self.db.execute("INSERT OR REPLACE INTO processes VALUES (?, ?)",
                        (proc.pid, _to_record(proc)))

    def save_many(self, procs: list[Process]) -> None:
        self.db.execute("BEGIN")
        try:
            for proc in procs:
                self.save(proc)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def get(self, pid: Any) -> Process:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise InvalidArgument(f"a pid is an int, got {pid!r}")
        proc = self.procs.get(pid)
        if proc is None:
            raise NoSuchProcess(f"no process with pid {pid}")
        return proc

    def by_capability(self, capability: Any) -> Process | None:
        if not isinstance(capability, str):
            return None
        pid = self.by_cap.get(cap_hash(capability))
        return self.procs.get(pid) if pid is not None else None

    def find(self, name_or_pid: Any) -> Process:
        """A live process by pid or by name."""
        if isinstance(name_or_pid, str):
            for proc in self.procs.values():
                if proc.name == name_or_pid and proc.alive:
                    return proc
            raise NoSuchProcess(f"no live process named {name_or_pid!r}")
        return self.get(name_or_pid)

    def children(self, pid: int) -> list[Process]:
        return sorted((p for p in self.procs.values() if p.parent == pid), key=lambda p: p.pid)

    def live(self) -> list[Process]:
        return [p for p in self.procs.values() if p.alive]

    def forget(self, pid: int) -> None:
        proc = self.procs.pop(pid, None)
        if proc is not None:
            self.by_cap.pop(proc.cap_hash, None)
            self.db.execute("DELETE FROM processes WHERE pid=?", (pid,))

    def close(self) -> None:
        self.db.close()


def _to_record(proc: Process) -> bytes:
    """msgpack, since arguments and pickled programs may hold bytes."""
    record = {f.name: getattr(proc, f.name) for f in fields(proc)}
    record["quotas"], record["restart"] = asdict(proc.quotas), asdict(proc.restart)
    return msgpack.packb(record, use_bin_type=True)


def _from_record(stored: bytes) -> Process:
    record = msgpack.unpackb(stored, raw=False, strict_map_key=False)
    record["quotas"] = Quotas(**record["quotas"])
    record["restart"] = RestartSpec(**record["restart"])
    return Process(**record)
