"""The file service: each agent's home is a jail, writes are atomic, sharing is by grant.

A path is never checked and then used. The MCP filesystem server resolves a path
(realpath), checks the result and then opens it by name, so a symlink swapped in between
the two wins. Here every operation walks the path one component at a time from a
descriptor of the home with ``openat(O_NOFOLLOW | O_DIRECTORY)`` and opens the last
component with ``O_NOFOLLOW``: a symbolic link is never followed, whenever it appears.
Only regular files with a single link are read or replaced, so planted FIFOs, devices and
hard links to outside files stay inert. A link count checked on a descriptor is not
enough on its own: while a rename or unlink removes the home's name of a file hard-linked
from outside, the kernel drops the count before the name goes, so a read racing it sees one
link on the outside file. So the service remembers the inode of every file it writes, and
reads (or keeps as a version) only the inode it wrote; when it opens it adopts what is on
disk, so a crash, an upgrade or a copied state directory loses nothing. Version blobs,
staged writes and ``fs.sqlite`` (versions, grants, quotas) live beside the homes, never
inside one.

The service is split by idea: ``fs_paths`` turns a path string into components or refuses
it, ``fs_jail`` holds the descriptor primitives that never follow a link, ``fs_store`` the
SQLite record, ``fs_homes`` the on-disk homes (atomic replaces, versions, quotas, crash
recovery), and this module the calls a process makes and who may make them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from llmos_kernel.services.fs_homes import Homes
from llmos_kernel.services.fs_jail import (
    DIR_FLAGS,
    ENTRY_BYTES,
    Tally,
    closing,
    entry_kind,
    open_dir,
    open_regular,
    open_written,
    pread_all,
    remove_tree,
    subtree,
)
from llmos_kernel.services.fs_paths import MAX_DEPTH, MAX_NAME_BYTES, MAX_PATH_BYTES, split_path

__all__ = [
    "ENTRY_BYTES",
    "MAX_DEPTH",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "FileStat",
    "FileSystem",
    "Grant",
    "Usage",
    "VersionInfo",
    "split_path",
]


@dataclass(frozen=True)
class FileStat:
    """One entry of a home. ``path`` is relative to the home ("." is the home itself);
    ``kind`` is "file", "dir", "link" or "other"; ``version`` numbers a file's current
    content (kept earlier contents have smaller numbers) and is 0 for anything else."""

    path: str
    kind: str
    is_dir: bool
    size: int
    mtime: float
    version: int


@dataclass(frozen=True)
class VersionInfo:
    """An earlier content of a file, kept so ``rollback`` can restore it."""

    path: str
    version: int
    size: int
    saved_at: float


@dataclass(frozen=True)
class Grant:
    """``owner`` lets ``grantee`` read ("r") or also change ("rw") ``path`` and everything under it."""

    owner: int
    path: str
    grantee: int
    mode: str


@dataclass(frozen=True)
class Usage:
    """Bytes a home holds against its quota: file contents plus ENTRY_BYTES per entry, plus
    kept versions (which are dropped, oldest first, whenever files need the room)."""

    pid: int
    bytes_used: int
    quota_bytes: int
    files: int
    dirs: int
    versions: int
    version_bytes: int


def _check_pid(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise InvalidArgument(f"{what} must be a non-negative int, not {value!r}")
    return value


def _as_bytes(data: object) -> bytes:
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("data is not valid Unicode (it has a lone surrogate)") from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise InvalidArgument(f"data must be bytes or str, not {type(data).__name__}")


class FileSystem:
    """Homes under ``root/homes/<pid>``; version blobs, staged writes and ``fs.sqlite`` beside them.

    Every call takes the caller's pid (authenticated by the kernel) first; ``owner`` picks
    another process's home, which needs a grant. Changes to one home are serialised by a
    lock per home; reads take no lock and always see a whole file, old or new. One
    FileSystem owns a root at a time (opening it clears what a crash left half-done).
    """

    def __init__(
        self,
        root: Path,
        default_quota_bytes: int = 64 * 2**20,
        max_versions: int = 20,
        max_file_bytes: int = 16 * 2**20,
    ) -> None:
        self.root = Path(root)
        self._homes = Homes(
            self.root,
            default_quota_bytes=default_quota_bytes,
            max_versions=max_versions,
            max_file_bytes=max_file_bytes,
        )
        self._store = self._homes.store

    @property
    def default_quota_bytes(self) -> int:
        return self._homes.default_quota_bytes

    @property
    def max_versions(self) -> int:
        return self._homes.max_versions

    @property
    def max_file_bytes(self) -> int:
        return self._homes.max_file_bytes

    def close(self) -> None:
        self._homes.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ---------------------------------------------------------------------------------

    def write(
        self, pid: int, path: str, data: bytes | str, *, owner: int | None = None
    ) -> FileStat:
        """Replace a file's content atomically (parents are created); the old content is kept
        as a version."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        content = _as_bytes(data)
        with self._homes.home(owner).lock:
            return self._replaced(owner, parts, lambda old: content, keep_old=True)

    def append(
        self, pid: int, path: str, data: bytes | str, *, owner: int | None = None
    ) -> FileStat:
        """Add to the end of a file (created if missing), atomically; no version is kept."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        content = _as_bytes(data)
        with self._homes.home(owner).lock:
            return self._replaced(owner, parts, lambda old: (old or b"") + content, keep_old=False)

    def read(
        self,
        pid: int,
        path: str,
        *,
        owner: int | None = None,
        offset: int = 0,
        length: int | None = None,
    ) -> bytes:
        """A file's bytes from ``offset``, ``length`` of them (default: to the end)."""
        owner, parts = self._resolve(pid, path, owner, write=False)
        if type(offset) is not int or offset < 0:
            raise InvalidArgument(f"offset must be an int >= 0, not {offset!r}")
        if length is not None and (type(length) is not int or length < 0):
            raise InvalidArgument(f"length must be None or an int >= 0, not {length!r}")
        with self._homes.at(owner, parts) as (dir_fd, name, rel):
            with self._homes.home(owner).lock:  # a write renames and records under it
                fd, st = open_written(dir_fd, name, rel, self._store.head(owner, rel)[1])
            with closing(fd):
                if length is None:
                    length = max(0, st.st_size - offset)
                if length > self.max_file_bytes:
                    raise InvalidArgument(
                        f"{rel!r}: reading {length} bytes at once is over the limit of"
                        f" {self.max_file_bytes}; read it in pieces with offset and length"
                    )
                return pread_all(fd, offset, length)

    def list(self, pid: int, path: str = ".", *, owner: int | None = None) -> list[FileStat]:
        """The entries of a directory, sorted by name; links and special files are listed
        (kind "link" / "other") but never followed."""
        owner, parts = self._resolve(pid, path, owner, write=False)
        with self._homes.at(owner, parts) as (dir_fd, name, rel):
            fd = open_dir(dir_fd, name, rel)
            with closing(fd):
                return [
                    self._stat_of(
                        owner,
                        f"{rel}/{child}" if rel else child,
                        os.stat(child, dir_fd=fd, follow_symlinks=False),
                    )
                    for child in sorted(os.listdir(fd))
                ]

    def stat(self, pid: int, path: str, *, owner: int | None = None) -> FileStat:
        owner, parts = self._resolve(pid, path, owner, write=False)
        with self._homes.at(owner, parts) as (dir_fd, name, rel):
            return self._stat_of(owner, rel, os.stat(name, dir_fd=dir_fd, follow_symlinks=False))

    def exists(self, pid: int, path: str, *, owner: int | None = None) -> bool:
        try:
            self.stat(pid, path, owner=owner)
        except NotFound:
            return False
        return True

    def mkdir(
        self, pid: int, path: str, *, owner: int | None = None, parents: bool = True
    ) -> FileStat:
        """Create a directory; with ``parents`` (the default) missing parents too, and an
        existing directory is fine."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        home = self._homes.home(owner)
        with home.lock, self._homes.at(owner, parts, create=parents) as (fd, name, rel):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                self._homes.make_dir(owner, fd, name)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            else:
                if not (parents and stat.S_ISDIR(st.st_mode)):
                    kind = entry_kind(st.st_mode)
                    raise AlreadyExists(f"{rel or '.'!r} already exists as a {kind}")
            return self._stat_of(owner, rel, st)

    def rename(self, pid: int, src: str, dst: str, *, owner: int | None = None) -> FileStat:
        """Move a file or directory (with its versions and grants) to a path that is free."""
        owner, src_parts = self._resolve(pid, src, owner, write=True)
        owner, dst_parts = self._resolve(pid, dst, owner, write=True)
        if not src_parts or not dst_parts:
            raise InvalidArgument("the home itself cannot be renamed")
        if dst_parts[: len(src_parts)] == src_parts:
            raise InvalidArgument(f"cannot move {src!r} to itself or into itself ({dst!r})")
        home = self._homes.home(owner)
        with home.lock, self._homes.at(owner, src_parts) as (src_fd, src_name, src_rel):
            st = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                with closing(os.open(src_name, DIR_FLAGS, dir_fd=src_fd)) as fd:
                    height = max((depth for *_, depth in subtree(fd)), default=0)
                if len(dst_parts) + height > MAX_DEPTH:
                    raise InvalidArgument(f"moving {src!r} there would nest over {MAX_DEPTH} deep")
            elif not stat.S_ISREG(st.st_mode):
                raise PermissionDenied(
                    f"{src_rel!r} is not a regular file or directory; only those can be moved"
                )
            with self._homes.at(owner, dst_parts, create=True) as (dst_fd, dst_name, dst_rel):
                try:
                    found = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    kind = entry_kind(found.st_mode)
                    raise AlreadyExists(f"{dst_rel!r} already exists as a {kind}; delete it first")
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                os.fsync(dst_fd)
                os.fsync(src_fd)
                self._store.move_subtree(owner, src_rel, dst_rel)
                return self._stat_of(
                    owner, dst_rel, os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                )

    def delete(
        self, pid: int, path: str, *, owner: int | None = None, recursive: bool = False
    ) -> None:
        """Remove a file, link or empty directory (a whole tree with ``recursive``), with its
        versions and the grants on it. Links are removed, never followed."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        if not parts:
            raise InvalidArgument("the home itself cannot be deleted; delete its entries")
        home = self._homes.home(owner)
        with home.lock, self._homes.at(owner, parts) as (dir_fd, name, rel):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and not recursive:
                os.rmdir(name, dir_fd=dir_fd)
                removed = Tally()
                removed.count(st)
            else:
                removed = remove_tree(dir_fd, name)
            os.fsync(dir_fd)
            if home.tally is not None:
                home.tally.remove(removed)
            self._homes.drop_blobs(owner, self._store.drop_subtree(owner, rel))

    # -- versions ------------------------------------------------------------------------------

    def versions(self, pid: int, path: str, *, owner: int | None = None) -> list[VersionInfo]:
        """The kept earlier contents of a file, oldest first."""
        owner, parts = self._resolve(pid, path, owner, write=False)
        rel = "/".join(parts)
        return [
            VersionInfo(rel, version, size, saved_at)
            for version, size, _, saved_at in self._homes.kept_versions(owner, parts)
        ]

    def rollback(self, pid: int, path: str, version: int, *, owner: int | None = None) -> FileStat:
        """Restore a kept version; the current content is kept as a new version, so a
        rollback can itself be rolled back."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        if type(version) is not int:
            raise InvalidArgument(f"version must be an int, not {version!r}")
        rel = "/".join(parts)
        with self._homes.home(owner).lock:
            blob = {v: b for v, _, b, _ in self._homes.kept_versions(owner, parts)}.get(version)
            if blob is None:
                raise NotFound(f"version {version} of {rel or '.'!r} is not kept; see versions()")
            with self._homes.blob_dir(owner) as blobs_fd:
                fd, st = open_regular(blobs_fd, blob, rel)
                with closing(fd):
                    content = pread_all(fd, 0, st.st_size)
            return self._replaced(owner, parts, lambda old: content, keep_old=True)

    # -- sharing -------------------------------------------------------------------------------

    def grant(self, pid: int, path: str, grantee: int, mode: str) -> Grant:
        """Let ``grantee`` read ("r") or read and change ("rw") a file or directory tree of
        the caller's home."""
        pid = _check_pid(pid, "pid")
        grantee = _check_pid(grantee, "grantee")
        if grantee == pid:
            raise InvalidArgument("a process always has full access to its own home")
        if mode not in ("r", "rw"):
            raise InvalidArgument(f"mode must be 'r' or 'rw', not {mode!r}")
        parts = split_path(path)
        with self._homes.home(pid).lock, self._homes.at(pid, parts) as (dir_fd, name, rel):
            mode_bits = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if not (stat.S_ISREG(mode_bits) or stat.S_ISDIR(mode_bits)):
                raise PermissionDenied(
                    f"{rel!r} is not a regular file or directory; only those can be shared"
                )
            self._store.put_grant(pid, rel, grantee, mode)
            return Grant(pid, rel or ".", grantee, mode)

    def revoke(self, pid: int, path: str, grantee: int) -> None:
        pid = _check_pid(pid, "pid")
        grantee = _check_pid(grantee, "grantee")
        rel = "/".join(split_path(path))
        if not self._store.delete_grant(pid, rel, grantee):
            raise NotFound(f"pid {pid} has given pid {grantee} no grant on {rel or '.'!r}")

    def grants(self, pid: int) -> list[Grant]:
        """Grants given by ``pid`` and given to it."""
        pid = _check_pid(pid, "pid")
        return [Grant(o, p or ".", g, m) for o, p, g, m in self._store.grants_of(pid)]

    # -- quotas and lifecycle ------------------------------------------------------------------

    def usage(self, pid: int) -> Usage:
        pid = _check_pid(pid, "pid")
        with self._homes.home(pid).lock:
            tally = self._homes.tally(pid)
            count, version_bytes = self._store.version_totals(pid)
            return Usage(
                pid,
                tally.bytes + version_bytes,
                self._homes.quota(pid),
                tally.files,
                tally.dirs,
                count,
                version_bytes,
            )

    def set_quota(self, pid: int, quota_bytes: int) -> None:
        pid = _check_pid(pid, "pid")
        if type(quota_bytes) is not int or quota_bytes < 0:
            raise InvalidArgument(f"quota_bytes must be an int >= 0, not {quota_bytes!r}")
        self._store.set_quota(pid, quota_bytes)

    def remove_home(self, pid: int) -> None:
        """Delete a home with its versions, grants and quota (the kernel reaped the process)."""
        self._homes.remove(_check_pid(pid, "pid"))

    # -- internals -----------------------------------------------------------------------------

    def _resolve(
        self, pid: object, path: object, owner: object, *, write: bool
    ) -> tuple[int, tuple[str, ...]]:
        pid = _check_pid(pid, "pid")
        owner = pid if owner is None else _check_pid(owner, "owner")
        parts = split_path(path)
        if owner != pid:
            self._authorize(pid, owner, parts, write)
        return owner, parts

    def _authorize(self, pid: int, owner: int, parts: tuple[str, ...], write: bool) -> None:
        for granted, mode in self._store.grants_between(owner, pid):
            prefix = tuple(granted.split("/")) if granted else ()
            if parts[: len(prefix)] == prefix and (mode == "rw" or not write):
                return
        raise PermissionDenied(
            f"pid {pid} has no {'rw' if write else 'r'} grant covering"
            f" {'/'.join(parts) or '.'!r} in pid {owner}'s home"
        )

    def _replaced(
        self,
        owner: int,
        parts: tuple[str, ...],
        new_content: Callable[[bytes | None], bytes],
        *,
        keep_old: bool,
    ) -> FileStat:
        st = self._homes.replace(owner, parts, new_content, keep_old=keep_old)
        return self._stat_of(owner, "/".join(parts), st)

    def _stat_of(self, owner: int, rel: str, st: os.stat_result) -> FileStat:
        kind = entry_kind(st.st_mode)
        version = (self._store.head(owner, rel)[0] or 1) if kind == "file" else 0
        return FileStat(rel or ".", kind, kind == "dir", st.st_size, st.st_mtime, version)
