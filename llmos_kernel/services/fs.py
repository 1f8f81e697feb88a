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
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import stat
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import unquote

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)

ENTRY_BYTES = 512
"""What each file and directory costs on top of its content, so empty files cannot fill a disk."""
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_DEPTH = 64
"""The deepest a directory tree in a home may go, counted in components from the home."""

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOOKALIKE_NAMES = ("SOLIDUS", "SLASH", "FULL STOP", "DOT LEADER", "SET MINUS", "DIAGONAL")
_DRIVE = re.compile(r"[A-Za-z]:")
_PERCENT_ROUNDS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    owner INTEGER, path TEXT, version INTEGER, ino INTEGER, PRIMARY KEY (owner, path));
CREATE TABLE IF NOT EXISTS versions (
    owner INTEGER, path TEXT, version INTEGER, size INTEGER, blob TEXT, saved_at REAL,
    PRIMARY KEY (owner, path, version));
CREATE INDEX IF NOT EXISTS versions_by_age ON versions (owner, saved_at);
CREATE TABLE IF NOT EXISTS grants (
    owner INTEGER, path TEXT, grantee INTEGER, mode TEXT, PRIMARY KEY (owner, path, grantee));
CREATE INDEX IF NOT EXISTS grants_by_grantee ON grants (grantee);
CREATE TABLE IF NOT EXISTS quotas (pid INTEGER PRIMARY KEY, quota_bytes INTEGER);
"""
_PATH_TABLES = ("heads", "versions", "grants")


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


def split_path(path: object) -> tuple[str, ...]:
    """The components of a path relative to a home, or an error for anything that could leave it.

    ``""`` and ``"."`` name the home itself; repeated and trailing slashes are fine.
    PermissionDenied for escapes and ambiguity (``..``, absolute paths, ``~``, backslashes,
    drive letters, percent-encoded or look-alike separators); InvalidArgument for malformed
    input (not a str, NUL or control characters, too long, too deep).
    """
    if not isinstance(path, str):
        raise InvalidArgument(f"a path must be a str, not {type(path).__name__}")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{path!r} is not valid Unicode (it has a lone surrogate)") from None
    if size > MAX_PATH_BYTES:
        raise InvalidArgument(f"the path is {size} bytes long; the limit is {MAX_PATH_BYTES}")
    _check_characters(path)
    _check_percent_encoding(path)
    if path.startswith("/"):
        raise PermissionDenied(f"{path!r} is absolute; paths are relative to the home")
    if _DRIVE.match(path):
        raise PermissionDenied(f"{path!r} starts like a Windows drive; paths are relative")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    for part in parts:
        if part == "..":
            raise PermissionDenied(f"{path!r} uses '..'; name the target from the home down")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidArgument(f"a name in {path[:60]!r}... is over {MAX_NAME_BYTES} bytes")
    if parts and parts[0].startswith("~"):
        raise PermissionDenied(f"{path!r} starts with '~'; there is no other home to expand to")
    if len(parts) > MAX_DEPTH:
        raise InvalidArgument(f"the path has {len(parts)} components; the limit is {MAX_DEPTH}")
    return parts


def _check_characters(path: str) -> None:
    for ch in path:
        if ch == "\\":
            raise PermissionDenied(f"{path!r} contains a backslash; separate directories with '/'")
        if ch == "\x00":
            raise InvalidArgument(f"{path!r} contains a NUL byte")
        if ch.isascii():
            if ch.isprintable():
                continue
            raise InvalidArgument(f"{path!r} contains the control character U+{ord(ch):04X}")
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs"):
            raise InvalidArgument(f"{path!r} contains the invisible character U+{ord(ch):04X}")
        if _looks_like_separator(ch):
            raise PermissionDenied(
                f"{path!r} contains U+{ord(ch):04X} ({unicodedata.name(ch, '?')}), which reads"
                " as '.', '/' or '\\'; use plain ASCII for those"
            )


def _looks_like_separator(ch: str) -> bool:
    folded = unicodedata.normalize("NFKC", ch)
    name = unicodedata.name(ch, "")
    return any(c in "./\\" for c in folded) or any(word in name for word in _LOOKALIKE_NAMES)


def _check_percent_encoding(path: str) -> None:
    decoded = path
    for _ in range(_PERCENT_ROUNDS):
        decoded, previous = unquote(decoded), decoded
        if decoded == previous:
            break
    else:
        raise PermissionDenied(f"{path!r} is percent-encoded more than {_PERCENT_ROUNDS} times")
    if decoded == path:
        return
    hidden = [ch for ch in "./\\\x00" if decoded.count(ch) > path.count(ch)]
    hidden += [ch for ch in decoded if not ch.isascii() and _looks_like_separator(ch)]
    if hidden:
        raise PermissionDenied(f"{path!r} percent-encodes {hidden[0]!r}; write it plainly")


@dataclass
class _Tally:
    """What a tree of entries costs against a quota."""

    bytes: int = 0
    files: int = 0
    dirs: int = 0

    def count(self, st: os.stat_result) -> None:
        is_file = stat.S_ISREG(st.st_mode)
        self.bytes += ENTRY_BYTES + (st.st_size if is_file else 0)
        self.files += is_file
        self.dirs += stat.S_ISDIR(st.st_mode)

    def remove(self, other: _Tally) -> None:
        self.bytes -= other.bytes
        self.files -= other.files
        self.dirs -= other.dirs


@dataclass
class _Home:
    lock: threading.RLock
    tally: _Tally | None = None


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


def _typed(err: OSError, rel: str) -> LlmosError:
    if isinstance(err, LlmosError):
        return err
    name = repr(rel or ".")
    if err.errno not in _ERRNO_MESSAGES:
        return LlmosError(f"{name}: {err.strerror or err}")
    cls, message = _ERRNO_MESSAGES[err.errno]
    return cls(message.format(name))


def _refuse_unless_regular(st: os.stat_result, rel: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{rel or '.'!r} is a directory")
    if stat.S_ISLNK(st.st_mode):
        raise _typed(OSError(errno.ELOOP, ""), rel)
    if not stat.S_ISREG(st.st_mode):
        raise PermissionDenied(f"{rel!r} is a FIFO, socket or device; only regular files are used")
    if st.st_nlink > 1:
        raise PermissionDenied(f"{rel!r} has {st.st_nlink} hard links; linked files are refused")


def _open_regular(dir_fd: int, name: str, rel: str) -> tuple[int, os.stat_result]:
    """Open a regular, singly linked file for reading; checked before opening (so a device is
    never opened) and again on the descriptor (so a swap in between is caught)."""
    _refuse_unless_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), rel)
    fd = os.open(name, _READ, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        _refuse_unless_regular(st, rel)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_written(dir_fd: int, name: str, rel: str, ino: int | None) -> tuple[int, os.stat_result]:
    """``_open_regular`` for a file in a home: the descriptor must also be the inode the
    service recorded for the path (``ino``; None if it recorded none), so a file hard-linked
    from outside is refused even while a rename makes its link count read one."""
    fd, st = _open_regular(dir_fd, name, rel)
    if st.st_ino != ino:
        os.close(fd)
        raise PermissionDenied(
            f"{rel!r} was not written through the file service, or was replaced outside"
            " it; only what the service wrote is read or kept. Delete it and write it again"
        )
    return fd, st


def _open_dir(dir_fd: int, name: str, rel: str) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise _typed(err, rel) from None
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        raise _typed(OSError(errno.ELOOP if is_link else errno.ENOTDIR, ""), rel) from None


@contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _stage(dir_fd: int, data: bytes) -> tuple[str, int]:
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


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _subtree(dir_fd: int, depth: int = 1) -> Iterator[tuple[int, str, os.stat_result, int]]:
    """Every entry under a directory as (parent fd, name, lstat, depth), children before their
    directory, links never followed."""
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"a directory tree goes deeper than {MAX_DEPTH} levels")
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            with _closing(os.open(name, _DIR, dir_fd=dir_fd)) as sub:
                yield from _subtree(sub, depth + 1)
        yield dir_fd, name, st, depth


def _remove(parent_fd: int, name: str) -> _Tally:
    """Delete an entry and everything under it without following links; returns what it held."""
    removed = _Tally()
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        with _closing(os.open(name, _DIR, dir_fd=parent_fd)) as fd:
            for parent, child, child_st, _ in _subtree(fd):
                (os.rmdir if stat.S_ISDIR(child_st.st_mode) else os.unlink)(child, dir_fd=parent)
                removed.count(child_st)
        os.rmdir(name, dir_fd=parent_fd)
    else:
        os.unlink(name, dir_fd=parent_fd)
    removed.count(st)
    return removed


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "link" if stat.S_ISLNK(mode) else "other"


def _subtree_clause(rel: str) -> tuple[str, tuple]:
    if not rel:
        return "", ()
    return " AND (path = ? OR substr(path, 1, ?) = ?)", (rel, len(rel) + 1, rel + "/")


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


class _Store:
    """Heads, versions, grants and quotas: one SQLite database in WAL mode, outside every home."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        if "ino" not in {row[1] for row in self._db.execute("PRAGMA table_info(heads)")}:
            self._db.execute("ALTER TABLE heads ADD COLUMN ino INTEGER")  # stores from 0.1

    def close(self) -> None:
        self._db.close()

    def rows(self, sql: str, *args: object) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def head(self, owner: int, rel: str) -> tuple[int | None, int | None]:
        """A file's current version number and the inode it was written to (None, None if
        the service never wrote it)."""
        found = self.rows(
            "SELECT version, ino FROM heads WHERE owner = ? AND path = ?", owner, rel
        )
        return found[0] if found else (None, None)

    def set_inodes(self, rows: list[tuple[int | None, int, str]]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE heads SET ino = ? WHERE owner = ? AND path = ?", rows)

    def record_write(
        self, owner: int, rel: str, version: int, ino: int, kept: tuple | None
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO heads (owner, path, version, ino) VALUES (?, ?, ?, ?)",
                (owner, rel, version, ino),
            )
            if kept:
                db.execute(
                    "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    (owner, rel, *kept, time.time()),
                )

    def versions(self, owner: int, rel: str) -> list[tuple[int, int, str, float]]:
        return self.rows(
            "SELECT version, size, blob, saved_at FROM versions WHERE owner = ? AND path = ?"
            " ORDER BY version",
            owner,
            rel,
        )

    def oldest_versions(self, owner: int) -> list[tuple[str, int, int, str]]:
        return self.rows(
            "SELECT path, version, size, blob FROM versions WHERE owner = ?"
            " ORDER BY saved_at, version",
            owner,
        )

    def version_totals(self, owner: int) -> tuple[int, int]:
        count, size = self.rows(
            "SELECT count(*), coalesce(sum(size), 0) FROM versions WHERE owner = ?", owner
        )[0]
        return count, size

    def drop_version(self, owner: int, rel: str, version: int) -> None:
        with self.transaction() as db:
            db.execute(
                "DELETE FROM versions WHERE owner = ? AND path = ? AND version = ?",
                (owner, rel, version),
            )

    def drop_subtree(self, owner: int, rel: str) -> list[str]:
        """Forget everything recorded at or under ``rel``; returns the version blobs to delete."""
        clause, args = _subtree_clause(rel)
        with self.transaction() as db:
            blobs = db.execute(
                "SELECT blob FROM versions WHERE owner = ?" + clause, (owner, *args)
            ).fetchall()
            for table in _PATH_TABLES:
                db.execute(f"DELETE FROM {table} WHERE owner = ?" + clause, (owner, *args))
        return [blob for (blob,) in blobs]

    def move_subtree(self, owner: int, src: str, dst: str) -> None:
        clause, args = _subtree_clause(src)
        with self.transaction() as db:
            for table in _PATH_TABLES:
                db.execute(
                    f"UPDATE {table} SET path = ? || substr(path, ?) WHERE owner = ?" + clause,
                    (dst, len(src) + 1, owner, *args),
                )

    def forget(self, pid: int) -> None:
        with self.transaction() as db:
            for table in ("heads", "versions", "grants"):
                db.execute(f"DELETE FROM {table} WHERE owner = ?", (pid,))
            db.execute("DELETE FROM grants WHERE grantee = ?", (pid,))
            db.execute("DELETE FROM quotas WHERE pid = ?", (pid,))

    def quota(self, pid: int) -> int | None:
        found = self.rows("SELECT quota_bytes FROM quotas WHERE pid = ?", pid)
        return found[0][0] if found else None

    def set_quota(self, pid: int, quota_bytes: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO quotas VALUES (?, ?)", (pid, quota_bytes))

    def put_grant(self, owner: int, rel: str, grantee: int, mode: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?)", (owner, rel, grantee, mode)
            )

    def delete_grant(self, owner: int, rel: str, grantee: int) -> bool:
        with self.transaction() as db:
            cursor = db.execute(
                "DELETE FROM grants WHERE owner = ? AND path = ? AND grantee = ?",
                (owner, rel, grantee),
            )
            return cursor.rowcount > 0

    def grants_between(self, owner: int, grantee: int) -> list[tuple[str, str]]:
        return self.rows(
            "SELECT path, mode FROM grants WHERE owner = ? AND grantee = ?", owner, grantee
        )

    def grants_of(self, pid: int) -> list[tuple[int, str, int, str]]:
        return self.rows(
            "SELECT owner, path, grantee, mode FROM grants WHERE owner = ? OR grantee = ?"
            " ORDER BY owner, path, grantee",
            pid,
            pid,
        )


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
        for value, what, least in (
            (default_quota_bytes, "default_quota_bytes", 0),
            (max_versions, "max_versions", 1),
            (max_file_bytes, "max_file_bytes", 0),
        ):
            if type(value) is not int or value < least:
                raise InvalidArgument(f"{what} must be an int >= {least}, not {value!r}")
        self.root = Path(root)
        self.default_quota_bytes = default_quota_bytes
        self.max_versions = max_versions
        self.max_file_bytes = max_file_bytes
        fds = []
        for sub in ("homes", "versions", "staging"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            fds.append(os.open(self.root / sub, _DIR))
        self._homes_fd, self._versions_fd, self._staging_fd = fds
        self._store = _Store(self.root / "fs.sqlite")
        self._homes: dict[int, _Home] = {}
        self._homes_lock = threading.Lock()
        self._clean_up_after_crash()
        self._adopt_files()

    def _clean_up_after_crash(self) -> None:
        """Delete staged writes and version blobs that no row names: what a crash between
        staging and renaming, or renaming and recording, leaves behind."""
        for name in os.listdir(self._staging_fd):
            _remove(self._staging_fd, name)
        known = {blob for (blob,) in self._store.rows("SELECT blob FROM versions")}
        for owner in os.listdir(self._versions_fd):
            with _closing(os.open(owner, _DIR, dir_fd=self._versions_fd)) as fd:
                for blob in set(os.listdir(fd)) - known:
                    _unlink_quietly(fd, blob)

    def _adopt_files(self) -> None:
        """Record the inode each head names now: a crash between renaming and recording, a
        store from before inodes were kept, or a state directory copied elsewhere would
        otherwise leave files the service refuses to read. Nothing is serving yet, so what
        is on disk is what the service last wrote or what its owner put there."""
        changed = []
        for owner, rel, ino in self._store.rows("SELECT owner, path, ino FROM heads"):
            try:
                with self._at(owner, split_path(rel)) as (dir_fd, name, _):
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                found = st.st_ino if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None
            except (LlmosError, OSError):
                found = None
            if found != ino:
                changed.append((found, owner, rel))
        if changed:
            self._store.set_inodes(changed)

    def close(self) -> None:
        for fd in (self._homes_fd, self._versions_fd, self._staging_fd):
            os.close(fd)
        self._store.close()

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
        with self._home(owner).lock:
            return self._replace(owner, parts, lambda old: content, keep_old=True)

    def append(
        self, pid: int, path: str, data: bytes | str, *, owner: int | None = None
    ) -> FileStat:
        """Add to the end of a file (created if missing), atomically; no version is kept."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        content = _as_bytes(data)
        with self._home(owner).lock:
            return self._replace(owner, parts, lambda old: (old or b"") + content, keep_old=False)

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
        with self._at(owner, parts) as (dir_fd, name, rel):
            with self._home(owner).lock:  # a write renames and records under it
                fd, st = _open_written(dir_fd, name, rel, self._store.head(owner, rel)[1])
            with _closing(fd):
                if length is None:
                    length = max(0, st.st_size - offset)
                if length > self.max_file_bytes:
                    raise InvalidArgument(
                        f"{rel!r}: reading {length} bytes at once is over the limit of"
                        f" {self.max_file_bytes}; read it in pieces with offset and length"
                    )
                return _pread_all(fd, offset, length)

    def list(self, pid: int, path: str = ".", *, owner: int | None = None) -> list[FileStat]:
        """The entries of a directory, sorted by name; links and special files are listed
        (kind "link" / "other") but never followed."""
        owner, parts = self._resolve(pid, path, owner, write=False)
        with self._at(owner, parts) as (dir_fd, name, rel):
            fd = _open_dir(dir_fd, name, rel)
            with _closing(fd):
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
        with self._at(owner, parts) as (dir_fd, name, rel):
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
        with self._home(owner).lock, self._at(owner, parts, create=parents) as (fd, name, rel):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                self._make_dir(owner, fd, name)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            else:
                if not (parents and stat.S_ISDIR(st.st_mode)):
                    raise AlreadyExists(f"{rel or '.'!r} already exists as a {_kind(st.st_mode)}")
            return self._stat_of(owner, rel, st)

    def rename(self, pid: int, src: str, dst: str, *, owner: int | None = None) -> FileStat:
        """Move a file or directory (with its versions and grants) to a path that is free."""
        owner, src_parts = self._resolve(pid, src, owner, write=True)
        owner, dst_parts = self._resolve(pid, dst, owner, write=True)
        if not src_parts or not dst_parts:
            raise InvalidArgument("the home itself cannot be renamed")
        if dst_parts[: len(src_parts)] == src_parts:
            raise InvalidArgument(f"cannot move {src!r} to itself or into itself ({dst!r})")
        with self._home(owner).lock, self._at(owner, src_parts) as (src_fd, src_name, src_rel):
            st = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                with _closing(os.open(src_name, _DIR, dir_fd=src_fd)) as fd:
                    height = max((depth for *_, depth in _subtree(fd)), default=0)
                if len(dst_parts) + height > MAX_DEPTH:
                    raise InvalidArgument(f"moving {src!r} there would nest over {MAX_DEPTH} deep")
            elif not stat.S_ISREG(st.st_mode):
                raise PermissionDenied(
                    f"{src_rel!r} is not a regular file or directory; only those can be moved"
                )
            with self._at(owner, dst_parts, create=True) as (dst_fd, dst_name, dst_rel):
                try:
                    found = os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise AlreadyExists(
                        f"{dst_rel!r} already exists as a {_kind(found.st_mode)}; delete it first"
                    )
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
        home = self._home(owner)
        with home.lock, self._at(owner, parts) as (dir_fd, name, rel):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) and not recursive:
                os.rmdir(name, dir_fd=dir_fd)
                removed = _Tally()
                removed.count(st)
            else:
                removed = _remove(dir_fd, name)
            os.fsync(dir_fd)
            if home.tally is not None:
                home.tally.remove(removed)
            self._drop_blobs(owner, self._store.drop_subtree(owner, rel))

    # -- versions ------------------------------------------------------------------------------

    def versions(self, pid: int, path: str, *, owner: int | None = None) -> list[VersionInfo]:
        """The kept earlier contents of a file, oldest first."""
        owner, parts = self._resolve(pid, path, owner, write=False)
        rel = "/".join(parts)
        return [
            VersionInfo(rel, version, size, saved_at)
            for version, size, _, saved_at in self._kept_versions(owner, parts)
        ]

    def rollback(self, pid: int, path: str, version: int, *, owner: int | None = None) -> FileStat:
        """Restore a kept version; the current content is kept as a new version, so a
        rollback can itself be rolled back."""
        owner, parts = self._resolve(pid, path, owner, write=True)
        if type(version) is not int:
            raise InvalidArgument(f"version must be an int, not {version!r}")
        rel = "/".join(parts)
        with self._home(owner).lock:
            blob = {v: b for v, _, b, _ in self._kept_versions(owner, parts)}.get(version)
            if blob is None:
                raise NotFound(f"version {version} of {rel or '.'!r} is not kept; see versions()")
            with self._blob_dir(owner) as blobs_fd:
                fd, st = _open_regular(blobs_fd, blob, rel)
                with _closing(fd):
                    content = _pread_all(fd, 0, st.st_size)
            return self._replace(owner, parts, lambda old: content, keep_old=True)

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
        with self._home(pid).lock, self._at(pid, parts) as (dir_fd, name, rel):
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
        with self._home(pid).lock:
            tally = self._tally(pid)
            count, version_bytes = self._store.version_totals(pid)
            return Usage(
                pid,
                tally.bytes + version_bytes,
                self._quota(pid),
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
        pid = _check_pid(pid, "pid")
        home = self._home(pid)
        with home.lock:
            for dir_fd in (self._homes_fd, self._versions_fd):
                try:
                    _remove(dir_fd, str(pid))
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise _typed(err, f"pid {pid}'s home") from None
            self._store.forget(pid)
            home.tally = None

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

    def _kept_versions(self, owner: int, parts: tuple[str, ...]) -> list[tuple]:
        with self._at(owner, parts) as (dir_fd, name, rel):
            _refuse_unless_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), rel)
        return self._store.versions(owner, rel)

    def _home(self, owner: int) -> _Home:
        with self._homes_lock:
            return self._homes.setdefault(owner, _Home(threading.RLock()))

    @contextmanager
    def _at(
        self, owner: int, parts: tuple[str, ...], *, create: bool = False
    ) -> Iterator[tuple[int, str, str]]:
        """(directory fd, name, relative path) of the entry ``parts`` names, reached one
        component at a time without following links (missing directories are made when
        ``create``); the home itself is (home fd, ".", ""). Any OSError in the block becomes
        a typed error naming the path."""
        rel = "/".join(parts)
        try:
            fd = self._home_fd(owner)
            for i, name in enumerate(parts[:-1]):
                try:
                    sub = self._subdir(owner, fd, name, "/".join(parts[: i + 1]), create)
                finally:
                    os.close(fd)
                fd = sub
            with _closing(fd):
                yield fd, parts[-1] if parts else ".", rel
        except OSError as err:
            raise _typed(err, rel) from None

    def _home_fd(self, owner: int) -> int:
        try:
            return os.open(str(owner), _DIR, dir_fd=self._homes_fd)
        except FileNotFoundError:
            with self._home(owner).lock:
                try:
                    os.mkdir(str(owner), 0o700, dir_fd=self._homes_fd)
                except FileExistsError:
                    pass
            return os.open(str(owner), _DIR, dir_fd=self._homes_fd)

    def _subdir(self, owner: int, fd: int, name: str, rel: str, create: bool) -> int:
        try:
            return _open_dir(fd, name, rel)
        except NotFound:
            if not create:
                raise
        self._make_dir(owner, fd, name)
        return _open_dir(fd, name, rel)

    def _make_dir(self, owner: int, fd: int, name: str) -> None:
        self._reserve(owner, ENTRY_BYTES)
        os.mkdir(name, 0o700, dir_fd=fd)
        self._tally(owner).count(os.stat(name, dir_fd=fd, follow_symlinks=False))

    @contextmanager
    def _blob_dir(self, owner: int) -> Iterator[int]:
        try:
            os.mkdir(str(owner), 0o700, dir_fd=self._versions_fd)
        except FileExistsError:
            pass
        with _closing(os.open(str(owner), _DIR, dir_fd=self._versions_fd)) as fd:
            yield fd

    def _replace(
        self,
        owner: int,
        parts: tuple[str, ...],
        new_content: Callable[[bytes | None], bytes],
        *,
        keep_old: bool,
    ) -> FileStat:
        """Swap in a file's new content: staged and fsynced outside the home, then renamed
        over the old one, which (with ``keep_old``) becomes a version if the quota has room."""
        with self._at(owner, parts, create=True) as (dir_fd, name, rel):
            version, ino = self._store.head(owner, rel)
            old = self._old_content(dir_fd, name, rel, ino)
            content = new_content(old)
            if len(content) > self.max_file_bytes:
                raise QuotaExceeded(
                    f"{rel!r} would be {len(content)} bytes; one file may hold at most"
                    f" {self.max_file_bytes}"
                )
            grow = len(content) + (ENTRY_BYTES if old is None else -len(old))
            head = 0 if old is None else version or 1
            keep = keep_old and old is not None
            if keep:
                kept = self._store.versions(owner, rel)
                for version, _, blob, _ in kept[: max(0, len(kept) - self.max_versions + 1)]:
                    self._drop_version(owner, rel, version, blob)
            keep = self._reserve(owner, grow, len(old) if keep else 0)
            staged, ino = _stage(self._staging_fd, content)
            blob = None
            try:
                if keep:
                    with self._blob_dir(owner) as blobs_fd:
                        blob, _ = _stage(blobs_fd, old)
                os.rename(staged, name, src_dir_fd=self._staging_fd, dst_dir_fd=dir_fd)
            except BaseException:
                _unlink_quietly(self._staging_fd, staged)
                self._drop_blobs(owner, [blob] if blob else [])
                raise
            os.fsync(dir_fd)
            self._store.record_write(
                owner, rel, head + 1, ino, (head, len(old), blob) if blob else None
            )
            tally = self._tally(owner)
            tally.bytes += grow
            tally.files += old is None
            return self._stat_of(owner, rel, os.stat(name, dir_fd=dir_fd, follow_symlinks=False))

    def _old_content(self, dir_fd: int, name: str, rel: str, ino: int | None) -> bytes | None:
        try:
            fd, st = _open_written(dir_fd, name, rel, ino)
        except FileNotFoundError:
            return None
        with _closing(fd):
            if st.st_size > self.max_file_bytes:
                raise QuotaExceeded(
                    f"{rel!r} is {st.st_size} bytes, over the {self.max_file_bytes} a file may"
                    " hold; delete it first"
                )
            return _pread_all(fd, 0, st.st_size)

    def _reserve(self, owner: int, grow: int, keep: int = 0) -> bool:
        """Make room for ``grow`` more bytes of files, and for a ``keep``-byte version if that
        fits, by dropping the home's oldest versions. QuotaExceeded if the files alone would
        not fit; returns whether the version fits."""
        quota = self._quota(owner)
        files = self._tally(owner).bytes
        if grow > 0 and files + grow > quota:
            raise QuotaExceeded(
                f"pid {owner}'s home would hold {files + grow} bytes of files, over its quota"
                f" of {quota}; delete something first"
            )
        if files + grow + keep > quota:
            keep = 0
        _, kept = self._store.version_totals(owner)
        excess = files + grow + kept + keep - quota
        for rel, version, size, blob in self._store.oldest_versions(owner):
            if excess <= 0:
                break
            self._drop_version(owner, rel, version, blob)
            excess -= size
        return keep > 0

    def _drop_version(self, owner: int, rel: str, version: int, blob: str) -> None:
        self._store.drop_version(owner, rel, version)
        self._drop_blobs(owner, [blob])

    def _drop_blobs(self, owner: int, blobs: list[str]) -> None:
        if blobs:
            with self._blob_dir(owner) as fd:
                for blob in blobs:
                    _unlink_quietly(fd, blob)

    def _tally(self, owner: int) -> _Tally:
        """The cached cost of a home's entries, measured by walking it on first use."""
        home = self._home(owner)
        if home.tally is None:
            tally = _Tally()
            with self._at(owner, ()) as (fd, _, _):
                for *_, st, _ in _subtree(fd):
                    tally.count(st)
            home.tally = tally
        return home.tally

    def _quota(self, owner: int) -> int:
        quota = self._store.quota(owner)
        return self.default_quota_bytes if quota is None else quota

    def _stat_of(self, owner: int, rel: str, st: os.stat_result) -> FileStat:
        kind = _kind(st.st_mode)
        version = (self._store.head(owner, rel)[0] or 1) if kind == "file" else 0
        return FileStat(rel or ".", kind, kind == "dir", st.st_size, st.st_mtime, version)
