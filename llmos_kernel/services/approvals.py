"""A durable queue of approval requests for dangerous tool calls, answered by a person.

The kernel waits on a request while a person answers it from another process with
``llmos approve ID`` or ``llmos deny ID``. Both sides open the same SQLite file (WAL mode),
so a decision crosses processes and survives restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_kernel.errors import InvalidArgument, NotFound

STATES = ("pending", "approved", "denied", "expired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    tool TEXT NOT NULL,
    args TEXT NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT,
    reason TEXT
)
"""
_COLUMNS = "id, pid, tool, args, created, state, decided_by, reason"


@dataclass
class Approval:
    """One request to run a dangerous tool; ``state`` is one of STATES."""

    id: str
    pid: int
    tool: str
    args: dict[str, Any]
    created: float
    state: str
    decided_by: str | None = None
    reason: str | None = None


class ApprovalQueue:
    """Approval requests in one SQLite file; any number of processes may open it at once."""

    def __init__(self, path: Path, *, poll_interval_s: float = 0.25) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def submit(self, pid: int, tool: str, args: dict[str, Any]) -> Approval:
        """Queue a pending request with a fresh 8-hex-digit id."""
        approval = Approval(
            id="", pid=pid, tool=tool, args=args, created=time.time(), state="pending"
        )
        encoded = json.dumps(args)
        while True:
            approval.id = secrets.token_hex(4)
            try:
                with self._lock:
                    self._db.execute(
                        f"INSERT INTO approvals ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                        (approval.id, pid, tool, encoded, approval.created, "pending"),
                    )
                return approval
            except sqlite3.IntegrityError:
                continue

    def get(self, approval_id: str) -> Approval:
        approval_id = _normalize(approval_id)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM approvals WHERE id = ?", (approval_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no approval request {approval_id!r}; `llmos approvals` lists them")
        return _from_row(row)

    def pending(self) -> list[Approval]:
        """Undecided requests, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM approvals WHERE state = 'pending' ORDER BY created"
            ).fetchall()
        return [_from_row(row) for row in rows]

    def decide(
        self, approval_id: str, approve: bool, by: str = "user", reason: str | None = None
    ) -> Approval:
        """Approve or deny a pending request and wake whoever waits on it in this process."""
        settled = self._settle(approval_id, "approved" if approve else "denied", by, reason)
        approval = self.get(approval_id)
        if not settled:
            raise InvalidArgument(f"approval {approval.id} is already {approval.state}")
        self._wake(approval.id)
        return approval

    async def wait(self, approval_id: str, timeout_s: float) -> Approval:
        """The request once decided, or marked expired after ``timeout_s`` seconds.

        A decision made in this process wakes the waiter at once; one written by another
        process is seen at the next poll of the file. A waiter that is cancelled expires
        the request, so nobody can approve a call that no longer waits.
        """
        approval_id = self.get(approval_id).id
        loop = asyncio.get_running_loop()
        waiter = (loop, asyncio.Event())
        with self._lock:
            self._waiters.setdefault(approval_id, []).append(waiter)
        deadline = loop.time() + timeout_s
        try:
            while (approval := self.get(approval_id)).state == "pending":
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._settle(approval_id, "expired", None, f"no decision within {timeout_s:g}s")
                    return self.get(approval_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter[1].wait(), min(self._poll_interval_s, remaining))
            return approval
        except asyncio.CancelledError:
            self._settle(approval_id, "expired", None, "the caller stopped waiting")
            raise
        finally:
            with self._lock:
                waiters = self._waiters[approval_id]
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[approval_id]

    def _settle(self, approval_id: str, state: str, by: str | None, reason: str | None) -> bool:
        """Move a pending request to ``state``; False if it was not pending (or not there)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE approvals SET state = ?, decided_by = ?, reason = ? "
                "WHERE id = ? AND state = 'pending'",
                (state, by, reason, _normalize(approval_id)),
            )
        return cursor.rowcount == 1

    def _wake(self, approval_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(approval_id, ()))
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that waiter's loop has closed
                loop.call_soon_threadsafe(event.set)


def _normalize(approval_id: str) -> str:
    if not isinstance(approval_id, str):
        raise InvalidArgument(f"an approval id is a string, got {type(approval_id).__name__}")
    return approval_id.strip().lower()


def _from_row(row: tuple) -> Approval:
    approval_id, pid, tool, args, created, state, decided_by, reason = row
    return Approval(approval_id, pid, tool, json.loads(args), created, state, decided_by, reason)
