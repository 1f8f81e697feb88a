"""The file service doing its job: files, directories, atomic writes, versions, quotas, grants.

Attacks on the jail are in test_fs_attacks.py; this file is how an agent uses its home.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from llmos_kernel.services.fs import ENTRY_BYTES, FileSystem, split_path

ME, OTHER, THIRD = 1, 2, 3
TYPED = (InvalidArgument, PermissionDenied, NotFound, QuotaExceeded, AlreadyExists)


@pytest.fixture
def fs(tmp_path):
    with FileSystem(tmp_path / "root") as service:
        yield service


def home_of(fs: FileSystem, pid: int) -> Path:
    return fs.root / "homes" / str(pid)


def test_write_then_read_round_trips_bytes_and_text(fs):
    started = time.time()
    written = fs.write(ME, "notes/today.md", "héllo wörld")
    assert written.path == "notes/today.md"
    assert (written.kind, written.is_dir, written.size, written.version) == ("file", False, 13, 1)
    assert started - 1 <= written.mtime <= time.time() + 1
    assert fs.read(ME, "notes/today.md") == "héllo wörld".encode()
    assert fs.read(ME, "notes/today.md", offset=1, length=4) == "héllo".encode()[1:5]
    assert fs.read(ME, "notes/today.md", offset=100) == b""
    fs.write(ME, "blob.bin", bytearray(range(256)))
    assert fs.read(ME, "blob.bin") == bytes(range(256))
    assert (home_of(fs, ME) / "notes" / "today.md").read_text() == "héllo wörld"


def test_append_creates_and_extends(fs):
    fs.append(ME, "log.txt", "one\n")
    stat = fs.append(ME, "log.txt", b"two\n")
    assert fs.read(ME, "log.txt") == b"one\ntwo\n"
    assert stat.size == 8 and stat.version == 2
    assert fs.versions(ME, "log.txt") == []


def test_paths_are_normalised_the_same_way_everywhere(fs):
    fs.write(ME, "a/b/c.txt", b"x")
    for spelling in ("a/b/c.txt", "./a//b/./c.txt", "a/b/c.txt/"):
        assert fs.read(ME, spelling) == b"x"
        assert fs.stat(ME, spelling).path == "a/b/c.txt"
    assert fs.list(ME, "") == fs.list(ME, ".") == fs.list(ME, "./") == fs.list(ME)
    assert fs.stat(ME, "").path == "." and fs.stat(ME, ".").is_dir


def test_list_and_stat_describe_entries(fs):
    fs.write(ME, "b.txt", b"bb")
    fs.mkdir(ME, "a")
    fs.write(ME, "a/inner.txt", b"i")
    entries = fs.list(ME)
    assert [(e.path, e.kind, e.is_dir) for e in entries] == [
        ("a", "dir", True),
        ("b.txt", "file", False),
    ]
    assert entries[1] == fs.stat(ME, "b.txt")
    assert [e.path for e in fs.list(ME, "a")] == ["a/inner.txt"]
    assert fs.exists(ME, "a/inner.txt") and not fs.exists(ME, "a/missing")
    with pytest.raises(NotFound, match="'nothing' does not exist"):
        fs.stat(ME, "nothing")
    with pytest.raises(NotFound):
        fs.list(ME, "nothing/deeper")


def test_mkdir_with_and_without_parents(fs):
    made = fs.mkdir(ME, "x/y/z")
    assert made.is_dir and made.path == "x/y/z"
    assert fs.mkdir(ME, "x/y/z").path == "x/y/z"
    with pytest.raises(AlreadyExists):
        fs.mkdir(ME, "x/y/z", parents=False)
    with pytest.raises(NotFound):
        fs.mkdir(ME, "p/q", parents=False)
    assert fs.mkdir(ME, "x/y/w", parents=False).is_dir


def test_rename_moves_files_and_trees_with_their_versions_and_grants(fs):
    fs.write(ME, "draft.txt", b"v1")
    fs.write(ME, "draft.txt", b"v2")
    moved = fs.rename(ME, "draft.txt", "final/report.txt")
    assert moved.path == "final/report.txt" and moved.version == 2
    assert not fs.exists(ME, "draft.txt")
    assert [v.path for v in fs.versions(ME, "final/report.txt")] == ["final/report.txt"]
    fs.grant(ME, "final", OTHER, "r")
    fs.rename(ME, "final", "archive/2024")
    assert fs.read(OTHER, "archive/2024/report.txt", owner=ME) == b"v2"
    assert fs.grants(ME)[0].path == "archive/2024"
    fs.rollback(ME, "archive/2024/report.txt", 1)
    assert fs.read(ME, "archive/2024/report.txt") == b"v1"
    fs.write(ME, "other.txt", b"o")
    with pytest.raises(AlreadyExists):
        fs.rename(ME, "other.txt", "archive/2024/report.txt")
    with pytest.raises(NotFound):
        fs.rename(ME, "missing.txt", "anywhere.txt")
    with pytest.raises(InvalidArgument, match="into itself"):
        fs.rename(ME, "archive", "archive/inside")


def test_delete_files_directories_and_trees(fs):
    empty = fs.usage(ME)
    fs.write(ME, "f.txt", b"f")
    fs.mkdir(ME, "empty")
    fs.write(ME, "tree/a/b.txt", b"b")
    fs.write(ME, "tree/a/b.txt", b"b2")
    fs.delete(ME, "f.txt")
    fs.delete(ME, "empty")
    with pytest.raises(InvalidArgument, match="recursive=True"):
        fs.delete(ME, "tree")
    fs.delete(ME, "tree", recursive=True)
    assert fs.list(ME) == []
    assert fs.usage(ME) == empty
    assert not any((fs.root / "versions" / str(ME)).iterdir())
    with pytest.raises(NotFound):
        fs.delete(ME, "f.txt")


def test_a_reader_never_sees_a_partial_file(fs):
    size = 1 << 20
    contents = {b"A" * size, b"B" * size}
    fs.write(ME, "big", b"A" * size)
    stop, seen = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            seen.append(fs.read(ME, "big"))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(12):
        fs.write(ME, "big", b"AB"[i % 2 : i % 2 + 1] * size)
    stop.set()
    thread.join()
    assert seen and all(data in contents for data in seen)


def test_a_failing_disk_leaves_the_old_content(fs, monkeypatch):
    fs.write(ME, "doc.txt", b"old")
    before = fs.usage(ME)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(QuotaExceeded, match="no space left"):
        fs.write(ME, "doc.txt", b"new content")
    monkeypatch.undo()
    assert fs.read(ME, "doc.txt") == b"old"
    assert fs.usage(ME) == before
    assert not any((fs.root / "staging").iterdir())


CRASHING_WRITER = """
import sys
from pathlib import Path
from llmos_kernel.services.fs import FileSystem

fs = FileSystem(Path(sys.argv[1]))
size = int(sys.argv[2])
fs.write(1, "data", b"A" * size)
print("ready", flush=True)
for i in range(10**6):
    fs.write(1, "data", b"AB"[i % 2 : i % 2 + 1] * size)
"""


def test_a_writer_killed_mid_write_leaves_a_whole_file(tmp_path):
    size = 4 << 20
    root = tmp_path / "root"
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(root), str(size)], stdout=subprocess.PIPE
    )
    assert writer.stdout.readline() == b"ready\n"
    time.sleep(random.uniform(0.1, 0.4))
    writer.kill()
    writer.wait()
    writer.stdout.close()
    with FileSystem(root) as fs:
        assert fs.read(ME, "data") in (b"A" * size, b"B" * size)
        assert not any((root / "staging").iterdir())
        for kept in fs.versions(ME, "data"):
            assert kept.size == size
        usage = fs.usage(ME)
        assert usage.files == 1
        assert len(list((root / "versions" / str(ME)).iterdir())) == usage.versions


def test_versions_and_rollback_of_a_rollback(tmp_path):
    with FileSystem(tmp_path / "root", max_versions=3) as fs:
        for text in (b"one", b"two", b"three", b"four"):
            current = fs.write(ME, "f", text)
        assert current.version == 4
        assert [(v.version, v.size) for v in fs.versions(ME, "f")] == [(1, 3), (2, 3), (3, 5)]
        restored = fs.rollback(ME, "f", 1)
        assert fs.read(ME, "f") == b"one" and restored.version == 5
        assert [v.version for v in fs.versions(ME, "f")] == [2, 3, 4]
        fs.rollback(ME, "f", 4)
        assert fs.read(ME, "f") == b"four"
        assert [v.version for v in fs.versions(ME, "f")] == [3, 4, 5]
        fs.rollback(ME, "f", 5)
        assert fs.read(ME, "f") == b"one"
        with pytest.raises(NotFound, match="version 1"):
            fs.rollback(ME, "f", 1)


def test_old_versions_make_way_for_files_under_the_quota(tmp_path):
    quota = 64 << 10
    with FileSystem(tmp_path / "root", default_quota_bytes=quota) as fs:
        for i in range(12):
            fs.write(ME, "f", bytes([i]) * (10 << 10))
            usage = fs.usage(ME)
            assert usage.bytes_used <= quota
        assert 0 < usage.versions < 11
        newest = fs.versions(ME, "f")[-1]
        assert newest.version == 11
        fs.rollback(ME, "f", newest.version)
        assert fs.read(ME, "f") == bytes([10]) * (10 << 10)


def test_usage_counts_contents_entries_and_versions(tmp_path):
    root = tmp_path / "root"
    with FileSystem(root) as fs:
        fs.write(ME, "a.txt", b"12345")
        fs.write(ME, "a.txt", b"123")
        fs.write(ME, "d/b.txt", b"xy")
        fs.mkdir(ME, "d/e")
        usage = fs.usage(ME)
        assert (usage.files, usage.dirs, usage.versions, usage.version_bytes) == (2, 2, 1, 5)
        assert usage.bytes_used == 3 + 2 + 4 * ENTRY_BYTES + 5
        assert usage.quota_bytes == 64 * 2**20
    with FileSystem(root) as reopened:
        assert reopened.usage(ME) == usage


def test_a_lowered_quota_blocks_growth_but_not_shrinking(fs):
    fs.write(ME, "big", b"x" * 10_000)
    fs.set_quota(ME, 5_000)
    assert fs.usage(ME).quota_bytes == 5_000
    with pytest.raises(QuotaExceeded):
        fs.write(ME, "more", b"y")
    fs.write(ME, "big", b"x" * 100)
    assert fs.usage(ME).versions == 0
    fs.delete(ME, "big")
    fs.write(ME, "more", b"y")


def test_grants_share_a_subtree_until_revoked(fs):
    fs.write(ME, "project/spec.md", b"spec")
    fs.write(ME, "project/src/main.py", b"print()")
    fs.write(ME, "diary.txt", b"private")
    given = fs.grant(ME, "project", OTHER, "rw")
    fs.grant(ME, "project/spec.md", THIRD, "r")
    assert given.path == "project" and given.mode == "rw"
    assert fs.read(OTHER, "project/src/main.py", owner=ME) == b"print()"
    fs.write(OTHER, "project/src/util.py", b"pass", owner=ME)
    fs.append(OTHER, "project/spec.md", b" v2", owner=ME)
    assert fs.read(ME, "project/src/util.py") == b"pass"
    assert [e.path for e in fs.list(OTHER, "project/src", owner=ME)] == [
        "project/src/main.py",
        "project/src/util.py",
    ]
    assert fs.read(THIRD, "project/spec.md", owner=ME) == b"spec v2"
    assert fs.usage(ME).files == 4 and fs.usage(OTHER).files == 0
    assert {(g.owner, g.grantee) for g in fs.grants(ME)} == {(ME, OTHER), (ME, THIRD)}
    assert fs.grants(OTHER) == [given]
    fs.grant(ME, "project", OTHER, "r")
    with pytest.raises(PermissionDenied):
        fs.write(OTHER, "project/x", b"x", owner=ME)
    fs.revoke(ME, "project", OTHER)
    with pytest.raises(PermissionDenied):
        fs.read(OTHER, "project/spec.md", owner=ME)
    assert fs.grants(OTHER) == []
    with pytest.raises(NotFound):
        fs.grant(ME, "no/such/dir", OTHER, "r")


def test_state_survives_reopening_the_service(tmp_path):
    root = tmp_path / "root"
    with FileSystem(root) as fs:
        fs.write(ME, "f.txt", b"first")
        fs.write(ME, "f.txt", b"second")
        fs.grant(ME, "f.txt", OTHER, "r")
        fs.set_quota(ME, 1 << 20)
        before = (fs.list(ME), fs.versions(ME, "f.txt"), fs.grants(ME), fs.usage(ME))
    with FileSystem(root) as fs:
        assert (fs.list(ME), fs.versions(ME, "f.txt"), fs.grants(ME), fs.usage(ME)) == before
        assert fs.read(OTHER, "f.txt", owner=ME) == b"second"
        fs.rollback(ME, "f.txt", 1)
        assert fs.read(ME, "f.txt") == b"first"


def test_a_file_replaced_behind_the_services_back_is_refused_until_it_reopens(tmp_path):
    root = tmp_path / "root"
    with FileSystem(root) as fs:
        fs.write(ME, "f.txt", b"written by the service")
        spare = home_of(fs, ME) / "spare"
        spare.write_bytes(b"put there by hand")
        os.replace(spare, home_of(fs, ME) / "f.txt")
        with pytest.raises(PermissionDenied, match="not written through the file service"):
            fs.read(ME, "f.txt")
        with pytest.raises(PermissionDenied):
            fs.append(ME, "f.txt", b"more")
        (home_of(fs, ME) / "unrecorded.txt").write_bytes(b"never written through it")
        with pytest.raises(PermissionDenied):
            fs.read(ME, "unrecorded.txt")
        fs.delete(ME, "unrecorded.txt")
    with FileSystem(root) as fs:  # what is on disk when nothing is serving is adopted
        assert fs.read(ME, "f.txt") == b"put there by hand"
        fs.append(ME, "f.txt", b", then appended")
        assert fs.read(ME, "f.txt") == b"put there by hand, then appended"


def test_a_store_from_before_inodes_and_a_copied_state_dir_keep_every_file(tmp_path):
    root = tmp_path / "root"
    with FileSystem(root) as fs:
        for i in range(5):
            fs.write(ME, f"d/f{i}.txt", f"content {i}")
    db = sqlite3.connect(root / "fs.sqlite")
    db.executescript(
        "CREATE TABLE old AS SELECT owner, path, version FROM heads; DROP TABLE heads;"
        " ALTER TABLE old RENAME TO heads;"
    )
    db.close()
    copy = tmp_path / "copied"
    shutil.copytree(root, copy)  # new inodes for every file
    for where in (root, copy):
        with FileSystem(where) as fs:
            assert [fs.read(ME, f"d/f{i}.txt") for i in range(5)] == [
                f"content {i}".encode() for i in range(5)
            ]
            fs.write(ME, "d/f0.txt", b"changed")
            assert fs.versions(ME, "d/f0.txt")[0].size == len(b"content 0")


def test_remove_home_forgets_files_versions_grants_and_quota(fs):
    fs.write(ME, "f", b"1")
    fs.write(ME, "f", b"2")
    fs.grant(ME, "f", OTHER, "r")
    fs.write(OTHER, "g", b"x")
    fs.grant(OTHER, "g", ME, "r")
    fs.set_quota(ME, 1234)
    fs.remove_home(ME)
    assert fs.list(ME) == [] and fs.grants(ME) == [] and fs.grants(OTHER) == []
    assert fs.usage(ME).quota_bytes == 64 * 2**20 and fs.usage(ME).versions == 0
    assert not (fs.root / "versions" / str(ME)).exists()
    assert fs.read(OTHER, "g") == b"x"


def test_threads_appending_to_one_file_lose_nothing(fs):
    def appender(tag: int) -> None:
        for _ in range(20):
            fs.append(ME, "shared.log", bytes([65 + tag]) * 10)

    threads = [threading.Thread(target=appender, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log = fs.read(ME, "shared.log")
    chunks = [log[i : i + 10] for i in range(0, len(log), 10)]
    assert len(chunks) == 80 and all(len(set(chunk)) == 1 for chunk in chunks)
    assert sorted(set(log)) == [65, 66, 67, 68]
    assert fs.usage(ME).bytes_used == 800 + ENTRY_BYTES


@given(st.text(max_size=80))
@settings(max_examples=400, deadline=None)
def test_split_path_yields_plain_names_or_a_typed_error(path):
    try:
        parts = split_path(path)
    except TYPED:
        return
    for part in parts:
        assert part not in ("", ".", "..") and not set(part) & {"/", "\\", "\x00"}
    assert split_path("/".join(parts)) == parts


COMPONENTS = [
    "a", "b", "dir", "file.txt", "é", "..", ".", "", "~", "link", "loop", "\\", "C:",
    "%2e%2e", "%2f", "\uff0e\uff0e", "\u2215", "x\x00", "/",
]  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("property")
    (base / "outside").mkdir()
    (base / "outside" / "secret").write_bytes(b"secret")
    with FileSystem(base / "root") as fs:
        fs.write(ME, "dir/file.txt", b"inside")
        fs.write(ME, "file.txt", b"inside")
        home = home_of(fs, ME)
        os.symlink(base / "outside", home / "link")
        os.symlink(".", home / "dir" / "loop")
        yield fs, home, base / "outside"


@given(st.lists(st.sampled_from(COMPONENTS), max_size=6).map("/".join))
@settings(max_examples=150, deadline=None)
def test_any_path_lands_inside_the_home_or_raises_a_typed_error(planted, path):
    fs, home, outside = planted
    try:
        fs.write(ME, path, b"payload")
    except TYPED:
        pass
    else:
        target = home.joinpath(*split_path(path))
        assert target.read_bytes() == b"payload" and not target.is_symlink()
        assert os.path.realpath(target).startswith(str(home) + os.sep)
        for parent in target.relative_to(home).parents:
            assert not (home / parent).is_symlink()
    try:
        assert b"secret" not in fs.read(ME, path)
    except TYPED:
        pass
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
