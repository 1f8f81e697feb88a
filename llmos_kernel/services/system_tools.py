"""System tools that act as the calling process: its files and its key-value memory.

They run in the kernel's event loop (async), where the syscall layer has set
the caller, so they reach only what that process may reach through the same
jailed file service its ``fs`` syscalls use. File contents move on a worker
thread; the key-value file is read and rewritten without yielding, so two
``remember`` calls of one process cannot lose each other's keys.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from llmos_kernel.errors import NotFound, PermissionDenied
from llmos_kernel.services.fs import FileSystem
from llmos_kernel.services.tools import tool

KV_FILE = ".kv.json"


def file_and_kv_tools(fs: FileSystem, caller: Callable[[], Any]) -> list[Callable]:
    """The tools, bound to a file service and a way to learn the calling process."""

    def pid() -> int:
        proc = caller()
        if proc is None:
            raise PermissionDenied("system tools run only on behalf of a process")
        return proc.pid

    def load_kv(p: int) -> dict:
        try:
            return json.loads(fs.read(p, KV_FILE))
        except NotFound:
            return {}

    @tool
    async def read_file(path: str) -> str:
        """Read a text file from your home directory.

        Args:
            path: Path relative to your home directory.
        """
        data = await asyncio.to_thread(fs.read, pid(), path)
        return data.decode("utf-8", errors="replace")

    @tool
    async def write_file(path: str, content: str) -> dict:
        """Write (replace) a text file in your home directory.

        Args:
            path: Path relative to your home directory.
            content: The whole new content.
        """
        stat = await asyncio.to_thread(fs.write, pid(), path, content)
        return {"path": stat.path, "size": stat.size, "version": stat.version}

    @tool
    async def list_files(path: str = ".") -> list[str]:
        """List a directory of your home (directories end with '/').

        Args:
            path: Directory relative to your home.
        """
        entries = await asyncio.to_thread(fs.list, pid(), path)
        return [s.path + ("/" if s.is_dir else "") for s in entries]

    @tool(dangerous=True)
    async def delete_file(path: str) -> str:
        """Delete a file or an empty directory of your home (waits for a person's approval).

        Args:
            path: Path relative to your home directory.
        """
        await asyncio.to_thread(fs.delete, pid(), path)
        return f"deleted {path}"

    @tool
    async def remember(key: str, value: str) -> str:
        """Store a value under a key in your key-value memory.

        Args:
            key: The key.
            value: The value to store.
        """
        p = pid()
        kv = load_kv(p)
        kv[key] = value
        fs.write(p, KV_FILE, json.dumps(kv))
        return "ok"

    @tool
    async def recall(key: str) -> str:
        """Read the value stored under a key in your key-value memory ('' if none).

        Args:
            key: The key.
        """
        return load_kv(pid()).get(key, "")

    return [read_file, write_file, list_files, delete_file, remember, recall]
