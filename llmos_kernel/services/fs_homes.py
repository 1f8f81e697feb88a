"""The homes on disk: every change to a home's bytes, with its quota and versions kept.

``Homes`` owns what lives under a root: ``homes/<pid>`` (reached only by descriptor walks,
see ``fs_jail``), ``versions/<pid>`` (earlier contents, as blobs), ``staging`` and the
``fs.sqlite`` record. A file's content is replaced only by staging it, fsyncing it and
renaming it over the old one, so a reader sees a whole file, old or new; the old content
becomes a version while the owner's quota has room, and the oldest versions go first when
files need it. The service remembers the inode it wrote for each file and reads or keeps
only that inode; opening a root clears what a crash left half-done and adopts what is on
disk, so a crash, an upgrade or a copied state directory loses nothing. Who may touch
which path is not decided here (``fs.FileSystem`` does that).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmos_kernel.errors import InvalidArgument, LlmosError, NotFound, QuotaExceeded
from llmos_kernel.services.fs_jail import (
    DIR_FLAGS,
    ENTRY_BYTES,
    Tally,
    closing,
    open_dir,
    open_written,
    pread_all,
    refuse_unless_regular,
    remove_tree,
    stage,
    subtree,
    typed_error,
    unlink_quietly,
)
from llmos_kernel.services.fs_paths import split_path
from llmos_kernel.services.fs_store import Store


@dataclass
class Home:
    """One home's lock (it serialises changes) and the cached cost of its entries."""

    lock: threading.RLock
    tally: Tally | None = None


class Homes:
    """Every home under ``root``, with its version blobs, staged writes and record.

    ``default_quota_bytes`` applies to a home without a quota of its own; a file keeps at
    most ``max_versions`` earlier contents and holds at most ``max_file_bytes``.
    """

    def __init__(
        self, root: Path, *, default_quota_bytes: int, max_versions: int, max_file_bytes: int
    ) -> None:
        for value, what, least in (
            (default_quota_bytes, "default_quota_bytes", 0),
            (max_versions, "max_versions", 1),
            (max_file_bytes, "max_file_bytes", 0),
        ):
            if type(value) is not int or value < least:
                raise InvalidArgument(f"{what} must be an int >= {least}, not {value!r}")
        self.default_quota_bytes = default_quota_bytes
        self.max_versions = max_versions
        self.max_file_bytes = max_file_bytes
        fds = []
        for sub in ("homes", "versions", "staging"):
            (root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            fds.append(os.open(root / sub, DIR_FLAGS))
        self._homes_fd, self._versions_fd, self._staging_fd = fds
        self.store = Store(root / "fs.sqlite")
        self._by_owner: dict[int, Home] = {}
        self._lock = threading.Lock()
        self._clean_up_after_crash()
        self._adopt_files()

    def _clean_up_after_crash(self) -> None:
        """Delete staged writes and version blobs that no row names: what a crash between
        staging and renaming, or renaming and recording, leaves behind."""
        for name in os.listdir(self._staging_fd):
            remove_tree(self._staging_fd, name)
        known = {blob for (blob,) in self.store.rows("SELECT blob FROM versions")}
        for owner in os.listdir(self._versions_fd):
            with closing(os.open(owner, DIR_FLAGS, dir_fd=self._versions_fd)) as fd:
                for blob in set(os.listdir(fd)) - known:
                    unlink_quietly(fd, blob)

    def _adopt_files(self) -> None:
        """Record the inode each head names now: a crash between renaming and recording, a
        store from before inodes were kept, or a state directory copied elsewhere would
        otherwise leave files the service refuses to read. Nothing is serving yet, so what
        is on disk is what the service last wrote or what its owner put there."""
        changed = []
        for owner, rel, ino in self.store.rows("SELECT owner, path, ino FROM heads"):
            try:
                with self.at(owner, split_path(rel)) as (dir_fd, name, _):
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                found = st.st_ino if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None
            except (LlmosError, OSError):
                found = None
            if found != ino:
                changed.append((found, owner, rel))
        if changed:
            self.store.set_inodes(changed)

    def close(self) -> None:
        for fd in (self._homes_fd, self._versions_fd, self._staging_fd):
            os.close(fd)
        self.store.close()

    def home(self, owner: int) -> Home:
        with self._lock:
            return self._by_owner.setdefault(owner, Home(threading.RLock()))

    @contextmanager
    def at(
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
            with closing(fd):
                yield fd, parts[-1] if parts else ".", rel
        except OSError as err:
            raise typed_error(err, rel) from None

    def _home_fd(self, owner: int) -> int:
        try:
            return os.open(str(owner), DIR_FLAGS, dir_fd=self._homes_fd)
        except FileNotFoundError:
            with self.home(owner).lock:
                try:
                    os.mkdir(str(owner), 0o700, dir_fd=self._homes_fd)
                except FileExistsError:
                    pass
            return os.open(str(owner), DIR_FLAGS, dir_fd=self._homes_fd)

    def _subdir(self, owner: int, fd: int, name: str, rel: str, create: bool) -> int:
        try:
            return open_dir(fd, name, rel)
        except NotFound:
            if not create:
                raise
        self.make_dir(owner, fd, name)
        return open_dir(fd, name, rel)

    def make_dir(self, owner: int, fd: int, name: str) -> None:
        self._reserve(owner, ENTRY_BYTES)
        os.mkdir(name, 0o700, dir_fd=fd)
        self.tally(owner).count(os.stat(name, dir_fd=fd, follow_symlinks=False))

    @contextmanager
    def blob_dir(self, owner: int) -> Iterator[int]:
        try:
            os.mkdir(str(owner), 0o700, dir_fd=self._versions_fd)
        except FileExistsError:
            pass
        with closing(os.open(str(owner), DIR_FLAGS, dir_fd=self._versions_fd)) as fd:
            yield fd

    def kept_versions(self, owner: int, parts: tuple[str, ...]) -> list[tuple]:
        with self.at(owner, parts) as (dir_fd, name, rel):
            refuse_unless_regular(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), rel)
        return self.store.versions(owner, rel)

    def remove(self, pid: int) -> None:
        """Delete a home with its versions, grants and quota (the kernel reaped the process)."""
        home = self.home(pid)
        with home.lock:
            for dir_fd in (self._homes_fd, self._versions_fd):
                try:
                    remove_tree(dir_fd, str(pid))
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise typed_error(err, f"pid {pid}'s home") from None
            self.store.forget(pid)
            home.tally = None

    def replace(
        self,
        owner: int,
        parts: tuple[str, ...],
        new_content: Callable[[bytes | None], bytes],
        *,
        keep_old: bool,
    ) -> os.stat_result:
        """Swap in a file's new content: staged and fsynced outside the home, then renamed
        over the old one, which (with ``keep_old``) becomes a version if the quota has room.
        Returns the new file's lstat."""
        with self.at(owner, parts, create=True) as (dir_fd, name, rel):
            version, ino = self.store.head(owner, rel)
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
                kept = self.store.versions(owner, rel)
                for version, _, blob, _ in kept[: max(0, len(kept) - self.max_versions + 1)]:
                    self._drop_version(owner, rel, version, blob)
            keep = self._reserve(owner, grow, len(old) if keep else 0)
            staged, ino = stage(self._staging_fd, content)
            blob = None
            try:
                if keep:
                    with self.blob_dir(owner) as blobs_fd:
                        blob, _ = stage(blobs_fd, old)
                os.rename(staged, name, src_dir_fd=self._staging_fd, dst_dir_fd=dir_fd)
            except BaseException:
                unlink_quietly(self._staging_fd, staged)
                self.drop_blobs(owner, [blob] if blob else [])
                raise
            os.fsync(dir_fd)
            self.store.record_write(
                owner, rel, head + 1, ino, (head, len(old), blob) if blob else None
            )
            tally = self.tally(owner)
            tally.bytes += grow
            tally.files += old is None
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    def _old_content(self, dir_fd: int, name: str, rel: str, ino: int | None) -> bytes | None:
        try:
            fd, st = open_written(dir_fd, name, rel, ino)
        except FileNotFoundError:
            return None
        with closing(fd):
            if st.st_size > self.max_file_bytes:
                raise QuotaExceeded(
                    f"{rel!r} is {st.st_size} bytes, over the {self.max_file_bytes} a file may"
                    " hold; delete it first"
                )
            return pread_all(fd, 0, st.st_size)

    def _reserve(self, owner: int, grow: int, keep: int = 0) -> bool:
        """Make room for ``grow`` more bytes of files, and for a ``keep``-byte version if that
        fits, by dropping the home's oldest versions. QuotaExceeded if the files alone would
        not fit; returns whether the version fits."""
        quota = self.quota(owner)
        files = self.tally(owner).bytes
        if grow > 0 and files + grow > quota:
            raise QuotaExceeded(
                f"pid {owner}'s home would hold {files + grow} bytes of files, over its quota"
                f" of {quota}; delete something first"
            )
        if files + grow + keep > quota:
            keep = 0
        _, kept = self.store.version_totals(owner)
        excess = files + grow + kept + keep - quota
        for rel, version, size, blob in self.store.oldest_versions(owner):
            if excess <= 0:
                break
            self._drop_version(owner, rel, version, blob)
            excess -= size
        return keep > 0

    def _drop_version(self, owner: int, rel: str, version: int, blob: str) -> None:
        self.store.drop_version(owner, rel, version)
        self.drop_blobs(owner, [blob])

    def drop_blobs(self, owner: int, blobs: list[str]) -> None:
        if blobs:
            with self.blob_dir(owner) as fd:
                for blob in blobs:
                    unlink_quietly(fd, blob)

    def tally(self, owner: int) -> Tally:
        """The cached cost of a home's entries, measured by walking it on first use."""
        home = self.home(owner)
        if home.tally is None:
            tally = Tally()
            with self.at(owner, ()) as (fd, _, _):
                for *_, st, _ in subtree(fd):
                    tally.count(st)
            home.tally = tally
        return home.tally

    def quota(self, owner: int) -> int:
        quota = self.store.quota(owner)
        return self.default_quota_bytes if quota is None else quota
