"""Descriptor-relative file primitives for the jail: nothing here follows a symbolic link.

Every function works on an open directory descriptor and a single name in it, opening
directories with ``O_NOFOLLOW | O_DIRECTORY`` and files with ``O_NOFOLLOW``, so a link
swapped in at any moment is refused rather than followed. Only regular files with one link
are read, and ``open_written`` also insists on the inode the service recorded, because a
link count alone can read one while a rename races an outside hard link. OSErrors become
typed errors that name the path (``typed_error``).
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from llmos_kernel.services.fs_paths import MAX_DEPTH

ENTRY_BYTES = 512
"""What each file and directory costs on top of its content, so empty files cannot fill a disk."""

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Tally:
    """What a tree of entries costs against a quota."""

    bytes: int = 0
    files: int = 0
    dirs: int = 0

    def count(self, st: os.stat_result) -> None:
        is_file = stat.S_ISREG(st.st_mode)
        self.bytes += ENTRY_BYTES + (st.st_size if is_file else 0)
        self.files += is_file
        self.dirs += stat.S_ISDIR(st.st_mode)

    def remove(self, other: Tally) -> None:
        self.bytes -= other.bytes
        self.files -= other.files
        self.dirs -= other.dirs


_ERRNO_MESSAGES: dict[int, tuple[type[LlmosError], str]] = {
    errno.ENOENT: (NotFound, "{} does not exist"),
    errno.EEXIST: (AlreadyExists, "{} already exists"),
    errno.ENOTDIR: (InvalidArgument, "{} is a file, not a directory"),
    errno.EISDIR: (InvalidArgument, "{} is a directory"),
    errno.ELOOP: (
        PermissionDenied,
        "{} is a symbolic link; links inside a home are never followed",
    ),
    errno.ENOTEMPTY: (InvalidArgument, "{} is not empty; pass recursive=True to delete it all"),
    errno.ENAMETOOLONG: (InvalidArgument, "{} is too long"),
    errno.ENXIO: (PermissionDenied, "{} is not a regular file"),
    errno.EINVAL: (InvalidArgument, "{} cannot be used that way"),
    errno.EXDEV: (PermissionDenied, "{} is on another file system"),
    errno.EACCES: (PermissionDenied, "{} is not accessible"),
    errno.EPERM: (PermissionDenied, "{} is not accessible"),
    errno.ENOSPC: (QuotaExceeded, "no space left on the device for {}"),
    errno.EDQUOT: (QuotaExceeded, "the disk quota is exhausted writing {}"),
}


def typed_error(err: OSError, rel: str) -> LlmosError:
    if isinstance(err, LlmosError):
        return err
    name = repr(rel or ".")
    if err.errno not in _ERRNO_MESSAGES:
        return LlmosError(f"{name}: {err.strerror or err}")
    cls, message = _ERRNO_MESSAGES[err.errno]
    return cls(message.format(name))


def refuse_unless_regular(st: os.stat_result, rel: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{rel or '.'!r} is a directory")
    if stat.S_ISLNK(st.st_mode):
        raise typed_error(OSError(errno.ELOOP, ""), rel)
    if not stat.S_ISREG(st.st_mode):
        raise PermissionDenied(f"{rel!r} is a FIFO, socket or device; only regular files are used")
    if st.st_nlink > 1:
        raise PermissionDenied(f"{rel!r} has {st.st_nlink} hard links; linked files are refused")


def open_regular(dir_fd: int, name: str, rel: str) -> tuple[int, os.stat_result]:
    """Open a regular, singly linked file for reading; checked before opening (so a device is
    never opened) and again on the descriptor (so a swap in between is caught)."""
    refuse_unless_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), rel)
    fd = os.open(name, _READ, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        refuse_unless_regular(st, rel)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_written(dir_fd: int, name: str, rel: str, ino: int | None) -> tuple[int, os.stat_result]:
    """``open_regular`` for a file in a home: the descriptor must also be the inode the
    service recorded for the path (``ino``; None if it recorded none), so a file hard-linked
    from outside is refused even while a rename makes its link count read one."""
    fd, st = open_regular(dir_fd, name, rel)
    if st.st_ino != ino:
        os.close(fd)
        raise PermissionDenied(
            f"{rel!r} was not written through the file service, or was replaced outside"
            " it; only what the service wrote is read or kept. Delete it and write it again"
        )
    return fd, st


def open_dir(dir_fd: int, name: str, rel: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise typed_error(err, rel) from None
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        raise typed_error(OSError(errno.ELOOP if is_link else errno.ENOTDIR, ""), rel) from None


@contextmanager
def closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def pread_all(fd: int, offset: int, length: int) -> bytes:
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def stage(dir_fd: int, data: bytes) -> tuple[str, int]:
    """Write ``data`` to a new file in ``dir_fd`` and fsync it; returns its name and inode."""
    name = uuid.uuid4().hex
    fd = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        ino = os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)
    return name, ino


def unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def subtree(dir_fd: int, depth: int = 1) -> Iterator[tuple[int, str, os.stat_result, int]]:
    """Every entry under a directory as (parent fd, name, lstat, depth), children before their
    directory, links never followed."""
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"a directory tree goes deeper than {MAX_DEPTH} levels")
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            with closing(os.open(name, DIR_FLAGS, dir_fd=dir_fd)) as sub:
                yield from subtree(sub, depth + 1)
        yield dir_fd, name, st, depth


def remove_tree(parent_fd: int, name: str) -> Tally:
    """Delete an entry and everything under it without following links; returns what it held."""
    removed = Tally()
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        with closing(os.open(name, DIR_FLAGS, dir_fd=parent_fd)) as fd:
            for parent, child, child_st, _ in subtree(fd):
                (os.rmdir if stat.S_ISDIR(child_st.st_mode) else os.unlink)(child, dir_fd=parent)
                removed.count(child_st)
        os.rmdir(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)
    removed.count(st)
    return removed


def entry_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "link" if stat.S_ISLNK(mode) else "other"
