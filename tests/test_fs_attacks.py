"""Attacks on the file service's jail: every one must fail with a typed error and touch nothing.

Each test runs against a root beside an ``outside`` directory holding a secret. The jail
fixtures snapshot everything outside the attacker's own home (the outside directory, the
other agent's home and versions) and check after the test that none of it was changed,
deleted or added to; the tests check that nothing of it was read into a result.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmos_kernel.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from llmos_kernel.services.fs import ENTRY_BYTES, FileSystem

SECRET = b"the outside secret"
OTHERS_DATA = b"the other agent's private data"
CANARY = "only-outside.txt"
"""A name no attack writes, so a listing that shows it has looked outside."""
ME, OTHER = 1, 2
TYPED = (InvalidArgument, PermissionDenied, NotFound, QuotaExceeded, AlreadyExists)


@dataclass
class Jail:
    fs: FileSystem
    home: Path
    outside: Path
    other_home: Path
    untouched: Callable[[], dict[str, tuple]]
    before: dict[str, tuple]


def _snapshot(top: Path, skip: set[Path]) -> dict[str, tuple]:
    """Every entry under ``top`` (links not followed) with its type, content hash and mtime."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(top):
        base = Path(dirpath)
        dirnames[:] = [d for d in dirnames if base / d not in skip]
        for name in dirnames + filenames:
            path = base / name
            if path in skip or name.startswith("fs.sqlite"):
                continue
            st = path.lstat()
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            seen[str(path.relative_to(top))] = (stat.S_IFMT(st.st_mode), content, mtime)
    return seen


@contextmanager
def _open_jail(base: Path) -> Iterator[Jail]:
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / CANARY).write_bytes(SECRET)
    root = base / "root"
    with FileSystem(root, default_quota_bytes=1 << 20, max_file_bytes=256 << 10) as fs:
        fs.write(OTHER, "private.txt", OTHERS_DATA)
        fs.write(ME, "mine.txt", b"my data")
        skip = {root / "homes" / str(ME), root / "versions" / str(ME), root / "staging"}
        jail = Jail(
            fs,
            root / "homes" / str(ME),
            outside,
            root / "homes" / str(OTHER),
            lambda: _snapshot(base, skip),
            _snapshot(base, skip),
        )
        yield jail
    assert jail.untouched() == jail.before, "something outside the home changed"


@pytest.fixture
def jail(tmp_path):
    with _open_jail(tmp_path) as opened:
        yield opened


@pytest.fixture(scope="module")
def lexical_jail(tmp_path_factory):
    """One jail for the attacks that must be refused before any file is touched."""
    with _open_jail(tmp_path_factory.mktemp("lexical")) as opened:
        yield opened


def _leaks(result: object) -> bool:
    """Whether a result holds outside content, or lists the outside directory."""
    if isinstance(result, list) and any(entry.path.endswith(CANARY) for entry in result):
        return True
    text = repr(result).encode()
    return SECRET in text or OTHERS_DATA in text


OPS: dict[str, Callable[[FileSystem, object], object]] = {
    "read": lambda fs, p: fs.read(ME, p),
    "write": lambda fs, p: fs.write(ME, p, b"pwned"),
    "append": lambda fs, p: fs.append(ME, p, b"pwned"),
    "mkdir": lambda fs, p: fs.mkdir(ME, p),
    "delete": lambda fs, p: fs.delete(ME, p, recursive=True),
    "list": lambda fs, p: fs.list(ME, p),
    "stat": lambda fs, p: fs.stat(ME, p),
    "exists": lambda fs, p: fs.exists(ME, p),
    "versions": lambda fs, p: fs.versions(ME, p),
    "rollback": lambda fs, p: fs.rollback(ME, p, 1),
    "rename_from": lambda fs, p: fs.rename(ME, p, "moved"),
    "rename_to": lambda fs, p: fs.rename(ME, "mine.txt", p),
    "grant": lambda fs, p: fs.grant(ME, p, OTHER, "rw"),
    "revoke": lambda fs, p: fs.revoke(ME, p, OTHER),
    "read_others": lambda fs, p: fs.read(ME, p, owner=OTHER),
}

DENIED, MALFORMED = PermissionDenied, InvalidArgument
HOSTILE_PATHS = [
    ("..", DENIED),
    ("../secret.txt", DENIED),
    ("../../../outside/secret.txt", DENIED),
    ("../2/private.txt", DENIED),
    ("a/../../x", DENIED),
    ("a/b/../../../x", DENIED),
    ("a/..", DENIED),
    ("./..", DENIED),
    ("../", DENIED),
    ("mine.txt/..", DENIED),
    ("..//..//outside", DENIED),
    ("/etc/passwd", DENIED),
    ("//etc/passwd", DENIED),
    ("/", DENIED),
    ("~", DENIED),
    ("~/x", DENIED),
    ("~root/.ssh/id_rsa", DENIED),
    ("a\x00b", MALFORMED),
    ("\x00", MALFORMED),
    ("mine.txt\x00.png", MALFORMED),
    ("..%2fsecret.txt", DENIED),
    ("%2e%2e/secret.txt", DENIED),
    ("%2E%2E%2F%2E%2E%2Fx", DENIED),
    ("%252e%252e%252fx", DENIED),
    ("%25252e%25252e", DENIED),
    ("a%00b", DENIED),
    ("..%5c..%5cx", DENIED),
    ("%EF%BC%8E%EF%BC%8E/x", DENIED),
    ("..\\..\\x", DENIED),
    ("a\\b", DENIED),
    ("C:\\Windows\\win.ini", DENIED),
    ("C:/x", DENIED),
    ("c:", DENIED),
    ("\\\\server\\share\\x", DENIED),
    ("//server/share/x", DENIED),
    ("\uff0e\uff0e/secret.txt", DENIED),
    ("..\u2215secret.txt", DENIED),
    ("..\u2044secret.txt", DENIED),
    ("\u2025/x", DENIED),
    ("\u2024\u2024/x", DENIED),
    ("\ufe52\ufe52/x", DENIED),
    ("..\uff0fx", DENIED),
    ("..\uff3cx", DENIED),
    ("..\ufe68x", DENIED),
    ("..\u29f8x", DENIED),
    ("..\u2216x", DENIED),
    ("a\u202etxt.exe", MALFORMED),
    ("a\u200bb", MALFORMED),
    ("a\nb", MALFORMED),
    ("\udc80", MALFORMED),
    ("x" * 5000, MALFORMED),
    ("y" * 256, MALFORMED),
    ("a/" * 65 + "x", MALFORMED),
    (None, MALFORMED),
    (42, MALFORMED),
    (b"../x", MALFORMED),
    (["a"], MALFORMED),
    (Path("mine.txt"), MALFORMED),
]


@pytest.mark.parametrize(
    ("path", "error"), HOSTILE_PATHS, ids=[repr(p)[:40] for p, _ in HOSTILE_PATHS]
)
def test_hostile_path_is_refused_by_every_operation(lexical_jail, path, error):
    for name, op in OPS.items():
        with pytest.raises(error) as caught:
            op(lexical_jail.fs, path)
        assert not _leaks(caught.value), name
    assert lexical_jail.fs.read(ME, "mine.txt") == b"my data"
    assert lexical_jail.fs.list(ME) == [lexical_jail.fs.stat(ME, "mine.txt")]
    assert lexical_jail.untouched() == lexical_jail.before


HARMLESS_NAMES = [
    "dev/zero",
    "etc/passwd",
    "...",
    "....",
    "%c0%ae%c0%ae",
    "a b",
    "café",
    "CON",
    "50%off",
]


@pytest.mark.parametrize("path", HARMLESS_NAMES)
def test_names_that_only_look_hostile_stay_inside_the_home(jail, path):
    jail.fs.write(ME, path, b"inside")
    assert (jail.home / path).read_bytes() == b"inside"
    assert jail.fs.read(ME, path) == b"inside"


def _plant_links(jail: Jail) -> None:
    (jail.home / "a" / "b").mkdir(parents=True)
    os.symlink(jail.outside / "secret.txt", jail.home / "link_file")
    os.symlink(jail.outside, jail.home / "link_dir")
    os.symlink(jail.other_home, jail.home / "link_other")
    os.symlink("../../../outside", jail.home / "link_relative")
    os.symlink(jail.outside, jail.home / "a" / "b" / "link_mid")
    os.symlink("/dev/zero", jail.home / "link_dev")


LINKS = ["link_file", "link_dir", "link_other", "link_relative", "a/b/link_mid", "link_dev"]
THROUGH = ["secret.txt", "private.txt", "new.txt", "deeper/new.txt"]


@pytest.mark.parametrize("link", LINKS)
def test_planted_symlink_is_never_followed_as_a_directory(jail, link):
    _plant_links(jail)
    for below in THROUGH:
        for name, op in OPS.items():
            if name in ("read_others", "revoke"):
                continue
            with pytest.raises(PermissionDenied, match="symbolic link"):
                op(jail.fs, f"{link}/{below}")


ON_LINK_ITSELF = {
    "read": PermissionDenied,
    "write": PermissionDenied,
    "append": PermissionDenied,
    "mkdir": AlreadyExists,
    "list": PermissionDenied,
    "versions": PermissionDenied,
    "rollback": PermissionDenied,
    "rename_from": PermissionDenied,
    "rename_to": AlreadyExists,
    "grant": PermissionDenied,
    "revoke": NotFound,
}


@pytest.mark.parametrize("link", LINKS)
def test_planted_symlink_itself_is_inert_and_deletable(jail, link):
    _plant_links(jail)
    for name, error in ON_LINK_ITSELF.items():
        with pytest.raises(error):
            OPS[name](jail.fs, link)
    assert jail.fs.stat(ME, link).kind == "link"
    assert jail.fs.exists(ME, link)
    jail.fs.delete(ME, link)
    assert not jail.fs.exists(ME, link)


def test_grantee_cannot_follow_a_symlink_in_a_shared_directory(jail):
    (jail.home / "shared").mkdir()
    os.symlink(jail.home / "mine.txt", jail.home / "shared" / "alias")
    jail.fs.grant(ME, "shared", OTHER, "rw")
    with pytest.raises(PermissionDenied, match="symbolic link"):
        jail.fs.read(OTHER, "shared/alias", owner=ME)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        jail.fs.write(OTHER, "shared/alias", b"x", owner=ME)


def _race(swap: Callable[[], None], attacks: list[Callable[[], object]]) -> list[object]:
    """Run ``swap`` in a loop in one thread while the attacks run in turn in this one, for
    0.4 s and until some attacks met the directory (success) and some met the link
    (PermissionDenied), at most 5 s. Returns what each attack returned or raised; anything
    but a typed error fails the test."""
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            try:
                swap()
            except OSError:
                pass

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    results: list[object] = []
    start = time.monotonic()
    try:
        while time.monotonic() < start + 5 and not (
            time.monotonic() > start + 0.4 and _met_both(results)
        ):
            try:
                results.append(attacks[len(results) % len(attacks)]())
            except TYPED as err:
                results.append(err)
    finally:
        stop.set()
        thread.join()
    return results


def _met_both(results: list[object]) -> bool:
    return any(isinstance(r, PermissionDenied) for r in results) and any(
        not isinstance(r, Exception) for r in results
    )


def _replace_with(path: Path, make: Callable[[Path], None]) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    make(path)


def _assert_no_version_holds_the_secret(jail: Jail) -> None:
    for blob in (jail.home.parent.parent / "versions").rglob("*"):
        assert not blob.is_file() or blob.read_bytes() != SECRET


def test_directory_swapped_for_a_symlink_mid_operation_never_leads_outside(jail):
    swap_dir = jail.home / "swap"
    state = {"link": False}

    def swap() -> None:
        if state["link"]:
            _replace_with(swap_dir, lambda p: (p.mkdir(), (p / "inner.txt").write_bytes(b"ok")))
        else:
            _replace_with(swap_dir, lambda p: os.symlink(jail.outside, p))
        state["link"] = not state["link"]

    fs = jail.fs
    attacks = [
        lambda: fs.read(ME, "swap/secret.txt"),
        lambda: fs.read(ME, "swap/inner.txt"),
        lambda: fs.write(ME, "swap/secret.txt", b"pwned"),
        lambda: fs.append(ME, "swap/secret.txt", b"pwned"),
        lambda: fs.write(ME, "swap/new.txt", b"planted"),
        lambda: fs.mkdir(ME, "swap/newdir"),
        lambda: fs.list(ME, "swap"),
        lambda: fs.delete(ME, "swap/secret.txt"),
        lambda: fs.rename(ME, "swap/secret.txt", "stolen.txt"),
        lambda: fs.versions(ME, "swap/secret.txt"),
    ]
    results = _race(swap, attacks)
    assert _met_both(results)
    assert not any(_leaks(r) for r in results)
    assert (
        not (jail.home / "stolen.txt").exists() or (jail.home / "stolen.txt").read_bytes() != SECRET
    )
    _assert_no_version_holds_the_secret(jail)


PLANT_OUTSIDE_FILE = {"symlink": os.symlink, "hard link": os.link}


@pytest.mark.parametrize("plant", PLANT_OUTSIDE_FILE)
def test_file_swapped_for_a_link_mid_operation_never_leads_outside(jail, plant):
    target, spare = jail.home / "flip", jail.home / "spare"
    state = {"planted": False}

    def swap() -> None:
        if os.path.lexists(spare):
            spare.unlink()
        if state["planted"]:
            spare.write_bytes(b"inside")
        else:
            PLANT_OUTSIDE_FILE[plant](jail.outside / "secret.txt", spare)
        os.replace(spare, target)
        state["planted"] = not state["planted"]

    fs = jail.fs
    attacks = [
        lambda: fs.read(ME, "flip"),
        lambda: fs.write(ME, "flip", b"pwned"),
        lambda: fs.append(ME, "flip", b"pwned"),
        lambda: fs.stat(ME, "flip"),
    ]
    results = _race(swap, attacks)
    assert _met_both(results)
    assert not any(_leaks(r) for r in results)
    _assert_no_version_holds_the_secret(jail)


PLANT_AT = {
    "symlink": lambda jail, spare: os.symlink(jail.outside / "secret.txt", spare),
    "hard link": lambda jail, spare: os.link(jail.outside / "secret.txt", spare),
    "fifo": lambda jail, spare: os.mkfifo(spare),
    "directory symlink": lambda jail, spare: os.symlink(jail.outside, spare),
}


@pytest.mark.parametrize("plant", PLANT_AT)
def test_a_swap_just_before_each_open_is_caught(jail, plant, monkeypatch):
    """The attacker wins every race: ``victim`` is replaced right before each open of it,
    after any check the service made."""
    jail.fs.write(ME, "victim", b"inside")
    jail.fs.mkdir(ME, "victim_dir")
    spare, real_open = jail.home / "spare", os.open

    def open_after_swap(name, flags, *args, **kwargs):
        if name in ("victim", "victim_dir"):
            if os.path.lexists(spare):
                spare.unlink()
            PLANT_AT[plant](jail, spare)
            if (jail.home / name).is_dir() and not (jail.home / name).is_symlink():
                shutil.rmtree(jail.home / name)
            os.replace(spare, jail.home / name)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_swap)
    attacks = {
        "read": lambda: jail.fs.read(ME, "victim"),
        "write": lambda: jail.fs.write(ME, "victim", b"pwned"),
        "append": lambda: jail.fs.append(ME, "victim", b"pwned"),
        "read below": lambda: jail.fs.read(ME, "victim_dir/secret.txt"),
        "write below": lambda: jail.fs.write(ME, "victim_dir/secret.txt", b"pwned"),
        "list": lambda: jail.fs.list(ME, "victim_dir"),
    }
    outcome: dict[str, object] = {}

    def attack() -> None:
        for name, call in attacks.items():
            try:
                outcome[name] = call()
            except TYPED as err:
                outcome[name] = err

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    thread.join(timeout=5)
    monkeypatch.undo()
    assert outcome.keys() == attacks.keys(), "an operation blocked on a planted file"
    for name, result in outcome.items():
        assert isinstance(result, (PermissionDenied, InvalidArgument)), (name, result)
    _assert_no_version_holds_the_secret(jail)


def test_hard_link_to_an_outside_file_is_refused(jail):
    os.link(jail.outside / "secret.txt", jail.home / "hard")
    for name in ("read", "write", "append", "versions"):
        with pytest.raises(PermissionDenied, match="hard link"):
            OPS[name](jail.fs, "hard")
    jail.fs.grant(ME, ".", OTHER, "rw")
    with pytest.raises(PermissionDenied, match="hard link"):
        jail.fs.read(OTHER, "hard", owner=ME)
    jail.fs.delete(ME, "hard")
    assert (jail.outside / "secret.txt").read_bytes() == SECRET
    _assert_no_version_holds_the_secret(jail)


def _plant_socket(name: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(name)


PLANTERS: dict[str, Callable[[str], None]] = {"fifo": os.mkfifo, "socket": _plant_socket}
if os.geteuid() == 0:  # only root may make device nodes
    PLANTERS["char_device"] = lambda name: os.mknod(name, 0o600 | stat.S_IFCHR, os.makedev(1, 5))


@pytest.mark.parametrize("kind", PLANTERS)
def test_special_files_are_refused_without_blocking(jail, kind, monkeypatch):
    monkeypatch.chdir(jail.home)
    PLANTERS[kind]("special")
    outcome: dict[str, object] = {}

    def attack() -> None:
        for name in ("read", "write", "append", "versions", "grant", "rename_from"):
            with pytest.raises(PermissionDenied, match="FIFO, socket or device|not a regular"):
                OPS[name](jail.fs, "special")
        outcome["done"] = True

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert outcome.get("done"), "an operation on a special file blocked or failed"
    assert jail.fs.stat(ME, "special").kind == "other"
    jail.fs.delete(ME, "special")
    assert not os.path.lexists(jail.home / "special")


@pytest.fixture
def small(tmp_path):
    with FileSystem(tmp_path / "root", default_quota_bytes=64 << 10, max_file_bytes=32 << 10) as fs:
        yield fs


def test_huge_write_over_the_quota_leaves_the_old_content(small):
    small.write(ME, "keep.txt", b"old")
    before = small.usage(ME)
    with pytest.raises(QuotaExceeded):
        small.write(ME, "keep.txt", b"x" * (40 << 10))
    for i in range(3):
        small.write(ME, f"fill{i}", b"f" * (20 << 10))
    with pytest.raises(QuotaExceeded, match="quota"):
        small.write(ME, "keep.txt", b"x" * (10 << 10))
    assert small.read(ME, "keep.txt") == b"old"
    assert small.usage(ME).bytes_used <= small.usage(ME).quota_bytes
    assert before.files + 3 == small.usage(ME).files


def test_many_small_files_hit_the_quota(small):
    written = 0
    with pytest.raises(QuotaExceeded):
        for i in range((64 << 10) // ENTRY_BYTES + 1):
            small.write(ME, f"many/{i}", b"")
            written += 1
    usage = small.usage(ME)
    assert written < (64 << 10) // ENTRY_BYTES
    assert usage.bytes_used <= usage.quota_bytes
    assert usage.files == written == len(small.list(ME, "many"))


def test_empty_directories_hit_the_quota(small):
    with pytest.raises(QuotaExceeded):
        for i in range((64 << 10) // ENTRY_BYTES + 1):
            small.mkdir(ME, f"d{i}")
    assert small.usage(ME).bytes_used <= small.usage(ME).quota_bytes


def test_append_over_the_quota_leaves_the_file_whole(small):
    small.set_quota(ME, 20 << 10)
    chunk = b"a" * 4096
    with pytest.raises(QuotaExceeded):
        for _ in range(10):
            small.append(ME, "log", chunk)
    content = small.read(ME, "log")
    assert content and len(content) % len(chunk) == 0 and set(content) == {ord("a")}


def test_grantee_writes_count_against_the_owners_quota(small):
    small.mkdir(ME, "shared")
    small.grant(ME, "shared", OTHER, "rw")
    with pytest.raises(QuotaExceeded):
        for i in range(10):
            small.write(OTHER, f"shared/{i}", b"g" * (10 << 10), owner=ME)
    assert small.usage(ME).bytes_used <= small.usage(ME).quota_bytes
    assert small.usage(OTHER).files == 0


WRONG_SHAPE = [
    ("write", "mine.txt/x", InvalidArgument),
    ("write", "dir", InvalidArgument),
    ("append", "dir", InvalidArgument),
    ("read", "dir", InvalidArgument),
    ("read", ".", InvalidArgument),
    ("list", "mine.txt", InvalidArgument),
    ("mkdir", "mine.txt", AlreadyExists),
    ("mkdir", "mine.txt/sub", InvalidArgument),
    ("versions", "dir", InvalidArgument),
    ("rename_from", "dir", InvalidArgument),
    ("delete", ".", InvalidArgument),
    ("rename_to", ".", InvalidArgument),
]


@pytest.mark.parametrize(("op", "path", "error"), WRONG_SHAPE)
def test_file_where_a_directory_is_expected_and_vice_versa(jail, op, path, error):
    jail.fs.write(ME, "dir/inner.txt", b"inner")
    if op == "rename_from":
        with pytest.raises(error):
            jail.fs.rename(ME, path, "dir/inside")
    else:
        with pytest.raises(error):
            OPS[op](jail.fs, path)
    assert jail.fs.read(ME, "mine.txt") == b"my data"
    assert jail.fs.read(ME, "dir/inner.txt") == b"inner"


def test_non_empty_directory_needs_recursive(jail):
    jail.fs.write(ME, "dir/inner.txt", b"inner")
    with pytest.raises(InvalidArgument, match="recursive"):
        jail.fs.delete(ME, "dir")
    assert jail.fs.read(ME, "dir/inner.txt") == b"inner"


BAD_ARGUMENTS = {
    "pid as str": lambda fs: fs.read("1", "mine.txt"),
    "pid as bool": lambda fs: fs.read(True, "mine.txt"),
    "pid as float": lambda fs: fs.read(1.0, "mine.txt"),
    "negative pid": lambda fs: fs.read(-1, "mine.txt"),
    "owner as str": lambda fs: fs.read(ME, "mine.txt", owner="2"),
    "data as int": lambda fs: fs.write(ME, "x", 42),
    "data as None": lambda fs: fs.write(ME, "x", None),
    "data as list": lambda fs: fs.append(ME, "x", [b"a"]),
    "data as dict": lambda fs: fs.write(ME, "x", {"a": 1}),
    "data with a lone surrogate": lambda fs: fs.write(ME, "x", "\udc80"),
    "negative offset": lambda fs: fs.read(ME, "mine.txt", offset=-1),
    "offset as str": lambda fs: fs.read(ME, "mine.txt", offset="0"),
    "negative length": lambda fs: fs.read(ME, "mine.txt", length=-5),
    "huge length": lambda fs: fs.read(ME, "mine.txt", length=1 << 40),
    "version as str": lambda fs: fs.rollback(ME, "mine.txt", "1"),
    "grant mode w": lambda fs: fs.grant(ME, "mine.txt", OTHER, "w"),
    "grant mode None": lambda fs: fs.grant(ME, "mine.txt", OTHER, None),
    "grantee as str": lambda fs: fs.grant(ME, "mine.txt", "bob", "r"),
    "grant to self": lambda fs: fs.grant(ME, "mine.txt", ME, "r"),
    "negative quota": lambda fs: fs.set_quota(ME, -1),
    "quota as float": lambda fs: fs.set_quota(ME, 1e9),
    "usage of a str pid": lambda fs: fs.usage("1"),
    "remove_home of None": lambda fs: fs.remove_home(None),
}


@pytest.mark.parametrize("call", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_wrong_types_and_ranges_are_invalid_arguments(jail, call):
    with pytest.raises(InvalidArgument):
        call(jail.fs)
    assert jail.fs.read(ME, "mine.txt") == b"my data"
    assert not (jail.home / "x").exists()


@pytest.fixture
def sharing(jail):
    fs = jail.fs
    fs.write(ME, "shared/doc.txt", b"shared doc")
    fs.write(ME, "shared2/doc.txt", b"not shared")
    fs.write(ME, "private.txt", b"private")
    fs.grant(ME, "shared", OTHER, "r")
    return fs


def test_another_home_needs_a_grant(sharing):
    for path in ("private.txt", ".", "shared2/doc.txt", "shared2"):
        with pytest.raises(PermissionDenied, match="no r grant"):
            sharing.read(OTHER, path, owner=ME)
    with pytest.raises(PermissionDenied):
        sharing.list(OTHER, ".", owner=ME)
    with pytest.raises(PermissionDenied):
        sharing.read(OTHER, "x", owner=99)
    assert sharing.read(OTHER, "shared/doc.txt", owner=ME) == b"shared doc"


READ_ONLY_VIOLATIONS = {
    "write": lambda fs: fs.write(OTHER, "shared/doc.txt", b"pwned", owner=ME),
    "append": lambda fs: fs.append(OTHER, "shared/doc.txt", b"pwned", owner=ME),
    "new file": lambda fs: fs.write(OTHER, "shared/new.txt", b"pwned", owner=ME),
    "mkdir": lambda fs: fs.mkdir(OTHER, "shared/sub", owner=ME),
    "delete": lambda fs: fs.delete(OTHER, "shared/doc.txt", owner=ME),
    "rename": lambda fs: fs.rename(OTHER, "shared/doc.txt", "shared/moved", owner=ME),
    "rollback": lambda fs: fs.rollback(OTHER, "shared/doc.txt", 1, owner=ME),
    "dotdot": lambda fs: fs.read(OTHER, "shared/../private.txt", owner=ME),
    "dotdot only": lambda fs: fs.read(OTHER, "shared/..", owner=ME),
    "regrant": lambda fs: fs.grant(OTHER, "shared", 3, "r"),
}


@pytest.mark.parametrize("call", READ_ONLY_VIOLATIONS.values(), ids=READ_ONLY_VIOLATIONS.keys())
def test_read_grant_allows_reading_only_inside_its_subtree(sharing, call):
    with pytest.raises((PermissionDenied, NotFound)):
        call(sharing)
    assert sharing.read(ME, "shared/doc.txt") == b"shared doc"
    assert sharing.read(ME, "private.txt") == b"private"
    assert sharing.list(ME, "shared") == [sharing.stat(ME, "shared/doc.txt")]


def test_revoked_and_recreated_paths_lose_their_grant(sharing):
    sharing.revoke(ME, "shared", OTHER)
    with pytest.raises(PermissionDenied):
        sharing.read(OTHER, "shared/doc.txt", owner=ME)
    sharing.grant(ME, "shared", OTHER, "rw")
    sharing.delete(ME, "shared", recursive=True)
    sharing.write(ME, "shared/doc.txt", b"new secret")
    with pytest.raises(PermissionDenied):
        sharing.read(OTHER, "shared/doc.txt", owner=ME)
    with pytest.raises(NotFound):
        sharing.revoke(ME, "shared", OTHER)


def test_rename_cannot_move_a_file_into_or_out_of_the_jail(jail):
    os.symlink(jail.outside, jail.home / "exit")
    for src, dst in (
        ("mine.txt", "../mine.txt"),
        ("mine.txt", "exit/mine.txt"),
        ("../outside/secret.txt", "stolen"),
        ("exit/secret.txt", "stolen"),
        ("exit", "exit2"),
    ):
        with pytest.raises(PermissionDenied):
            jail.fs.rename(ME, src, dst)
    with pytest.raises(AlreadyExists):
        jail.fs.rename(ME, "mine.txt", "exit")
    assert jail.fs.read(ME, "mine.txt") == b"my data"
    assert not (jail.home / "stolen").exists()


def test_removed_home_of_one_pid_is_not_inherited(jail):
    jail.fs.grant(ME, "mine.txt", OTHER, "r")
    jail.fs.remove_home(ME)
    assert jail.fs.list(ME) == []
    assert jail.fs.grants(OTHER) == []
    with pytest.raises(PermissionDenied):
        jail.fs.read(OTHER, "mine.txt", owner=ME)
