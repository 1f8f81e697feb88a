"""fs: the calling process's files. Its home is a jail; other homes need a grant.

Paths are relative to the home. ``owner`` (a pid or a name) selects another
process's home, which works only where that process granted access.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from syscalls import _context


async def read(path: str, *, owner: int | str | None = None, offset: int = 0,
               length: int | None = None) -> bytes:
    args: dict[str, Any] = {"path": path, "offset": offset}
    if length is not None:
        args["length"] = length
    return await _context.call("fs.read", owner=owner, **args)


async def read_text(path: str, *, owner: int | str | None = None) -> str:
    return (await read(path, owner=owner)).decode("utf-8")


async def write(path: str, data: bytes | str, *, owner: int | str | None = None) -> dict:
    """Replace a file atomically; the old content becomes a version."""
    return await _context.call("fs.write", path=path, data=data, owner=owner)


async def append(path: str, data: bytes | str, *, owner: int | str | None = None) -> dict:
    return await _context.call("fs.append", path=path, data=data, owner=owner)


async def list(path: str = ".", *, owner: int | str | None = None) -> list[dict]:
    return await _context.call("fs.list", path=path, owner=owner)


async def stat(path: str, *, owner: int | str | None = None) -> dict:
    return await _context.call("fs.stat", path=path, owner=owner)


async def exists(path: str, *, owner: int | str | None = None) -> bool:
    return await _context.call("fs.exists", path=path, owner=owner)


async def mkdir(path: str, *, owner: int | str | None = None, parents: bool = True) -> dict:
    return await _context.call("fs.mkdir", path=path, owner=owner, parents=parents)


async def rename(src: str, dst: str, *, owner: int | str | None = None) -> dict:
    return await _context.call("fs.rename", src=src, dst=dst, owner=owner)


async def delete(path: str, *, owner: int | str | None = None, recursive: bool = False) -> None:
    await _context.call("fs.delete", path=path, owner=owner, recursive=recursive)


async def versions(path: str, *, owner: int | str | None = None) -> list[dict]:
    return await _context.call("fs.versions", path=path, owner=owner)


async def rollback(path: str, version: int, *, owner: int | str | None = None) -> dict:
    return await _context.call("fs.rollback", path=path, version=version, owner=owner)


async def grant(path: str, to: int | str, mode: str = "r") -> dict:
    """Let another process read ("r") or read and write ("rw") ``path`` (a subtree if a dir)."""
    return await _context.call("fs.grant", path=path, to=to, mode=mode)


async def revoke(path: str, to: int | str) -> None:
    await _context.call("fs.revoke", path=path, to=to)


async def grants() -> list[dict]:
    """The grants you gave and the ones given to you (owner, path, grantee, mode)."""
    return await _context.call("fs.grants")


async def usage() -> dict:
    return await _context.call("fs.usage")


@contextlib.asynccontextmanager
async def open(path: str, mode: str = "r", *, owner: int | str | None = None
               ) -> AsyncIterator[_File]:
    """``async with fs.open("notes.txt", "a") as f: f.write("...")`` — written atomically on exit."""
    if mode not in ("r", "w", "a", "rb", "wb", "ab"):
        from llmos_kernel.errors import InvalidArgument

        raise InvalidArgument("mode must be r, w or a (optionally with b)")
    binary = mode.endswith("b")
    content = b""
    if mode[0] == "r" or (mode[0] == "a" and await exists(path, owner=owner)):
        content = await read(path, owner=owner)
    f = _File(content, binary)
    yield f
    if mode[0] in "wa":
        await write(path, f.data(), owner=owner)


class _File:
    def __init__(self, content: bytes, binary: bool):
        self._buf = bytearray(content)
        self._binary = binary

    def read(self) -> bytes | str:
        return bytes(self._buf) if self._binary else self._buf.decode("utf-8")

    def write(self, data: bytes | str) -> int:
        raw = data if isinstance(data, bytes) else data.encode("utf-8")
        self._buf += raw
        return len(raw)

    def data(self) -> bytes:
        return bytes(self._buf)
