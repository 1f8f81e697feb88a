"""The fs syscalls as a security boundary, attacked from a program through the real kernel.

Every attack goes through the syscall layer (the host batch, the kernel's dispatch and the
jailed file service). Links, hard links and FIFOs are planted by the test straight into the
program's home under the kernel's state dir, as a hostile co-tenant of the disk could.
After each attack the files outside the home are unchanged and the kernel still serves.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path

import pytest

from llmos_kernel.errors import LlmosError, PermissionDenied
from syscalls import _context, fs, ipc, proc

SECRET = "the launch codes are 0000"
REFUSALS = {"InvalidArgument", "PermissionDenied", "NotFound", "NoSuchProcess",
            "QuotaExceeded", "AlreadyExists"}


def _home(kernel, pid: int) -> Path:
    return kernel.state_dir / "files" / "homes" / str(pid)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its content (links by their target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                out[str(path)] = "->" + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A directory outside every home, with a secret file the attacks try to reach."""
    root = tmp_path_factory.mktemp("outside")
    (root / "secret.txt").write_text(SECRET)
    (root / "dir").mkdir()
    return root


@pytest.fixture(scope="module")
def planted(kernel, outside) -> int:
    """Traps planted in the driver's home (links out and in, a hard link, a FIFO); returns
    the pid of another process that has a file of its own."""
    home = _home(kernel, kernel.pid)
    kernel.run(fs.mkdir("atk"))
    kernel.run(fs.write("atk/plain.txt", "inside"))
    other = kernel.run(proc.spawn("syscall_agents:probe", {"calls": [
        ["fs.write", {"path": "mine.txt", "data": "not yours"}]]}))
    kernel.run(proc.wait(other, timeout=60))
    traps = home / "atk"
    (traps / "link-out").symlink_to(outside / "secret.txt")
    (traps / "link-dir-out").symlink_to(outside / "dir")
    (traps / "link-in").symlink_to(traps / "plain.txt")
    (traps / "link-relative").symlink_to("../../../..")
    (traps / "link-other-home").symlink_to(_home(kernel, other))
    (traps / "dangling").symlink_to(outside / "not-yet-there.txt")
    os.link(outside / "secret.txt", traps / "hard-link")
    os.mkfifo(traps / "fifo")
    return other


ATTACKS = [
    ("dotdot", "fs.read", {"path": "../secret.txt"}),
    ("dotdot-deep", "fs.read", {"path": "atk/../../../../../../etc/passwd"}),
    ("dotdot-write", "fs.write", {"path": "../../escaped.txt", "data": "x"}),
    ("absolute", "fs.read", {"path": "/etc/passwd"}),
    ("absolute-double-slash", "fs.read", {"path": "//etc/passwd"}),
    ("absolute-write", "fs.write", {"path": "/tmp/escaped.txt", "data": "x"}),
    ("nul", "fs.read", {"path": "atk/plain.txt\x00../../secret"}),
    ("nul-write", "fs.write", {"path": "ok\x00/../../x", "data": "x"}),
    ("percent-slash", "fs.read", {"path": "..%2f..%2fsecret.txt"}),
    ("percent-dots", "fs.read", {"path": "%2e%2e/secret.txt"}),
    ("percent-double", "fs.read", {"path": "%252e%252e%252fsecret.txt"}),
    ("percent-nul", "fs.read", {"path": "plain.txt%00"}),
    ("backslash", "fs.read", {"path": "..\\..\\secret.txt"}),
    ("drive", "fs.read", {"path": "C:\\Windows\\win.ini"}),
    ("drive-relative", "fs.write", {"path": "C:escaped", "data": "x"}),
    ("fullwidth-dots", "fs.read", {"path": "\uff0e\uff0e/secret.txt"}),
    ("two-dot-leader", "fs.read", {"path": "\u2025/secret.txt"}),
    ("division-slash", "fs.read", {"path": "..\u2215secret.txt"}),
    ("fullwidth-solidus", "fs.write", {"path": "..\uff0fescaped", "data": "x"}),
    ("tilde", "fs.read", {"path": "~root/.bashrc"}),
    ("control-char", "fs.write", {"path": "a\nb", "data": "x"}),
    ("too-long", "fs.write", {"path": "a/" * 3000, "data": "x"}),
    ("too-deep", "fs.mkdir", {"path": "/".join(["d"] * 100)}),
    ("not-a-string", "fs.read", {"path": ["atk", "plain.txt"]}),
    ("symlink-out", "fs.read", {"path": "atk/link-out"}),
    ("symlink-dir-out-read", "fs.list", {"path": "atk/link-dir-out"}),
    ("symlink-dir-out-write", "fs.write", {"path": "atk/link-dir-out/planted.txt", "data": "x"}),
    ("symlink-in", "fs.read", {"path": "atk/link-in"}),
    ("symlink-relative", "fs.list", {"path": "atk/link-relative"}),
    ("symlink-other-home", "fs.read", {"path": "atk/link-other-home/mine.txt"}),
    ("symlink-dangling-write", "fs.write", {"path": "atk/dangling", "data": SECRET + "!"}),
    ("symlink-overwrite", "fs.write", {"path": "atk/link-out", "data": "overwritten"}),
    ("symlink-append", "fs.append", {"path": "atk/link-out", "data": "appended"}),
    ("symlink-rename-into", "fs.rename", {"src": "atk/plain.txt",
                                          "dst": "atk/link-dir-out/moved.txt"}),
    ("hard-link-read", "fs.read", {"path": "atk/hard-link"}),
    ("hard-link-write", "fs.write", {"path": "atk/hard-link", "data": "overwritten"}),
    ("hard-link-append", "fs.append", {"path": "atk/hard-link", "data": "appended"}),
    ("fifo-read", "fs.read", {"path": "atk/fifo"}),
    ("rename-out", "fs.rename", {"src": "atk/plain.txt", "dst": "../moved.txt"}),
    ("delete-parent", "fs.delete", {"path": "..", "recursive": True}),
    ("delete-home", "fs.delete", {"path": ".", "recursive": True}),
    ("mkdir-out", "fs.mkdir", {"path": "a/../../b"}),
    ("grant-out", "fs.grant", {"path": "../", "to": 1, "mode": "rw"}),
    ("other-home-ungranted", "fs.read", {"path": "mine.txt", "owner": "__other__"}),
    ("no-such-owner", "fs.read", {"path": "x", "owner": 999_999}),
    ("owner-wrong-type", "fs.read", {"path": "x", "owner": 1.5}),
    ("huge-file", "fs.write", {"path": "atk/huge.bin", "data": b"\0" * (17 << 20)}),
    ("huge-read-range", "fs.read", {"path": "atk/plain.txt", "length": 1 << 40}),
    ("negative-offset", "fs.read", {"path": "atk/plain.txt", "offset": -1}),
    ("claims-a-pid", "fs.write", {"path": "x.txt", "data": "x", "pid": 1}),
]


@pytest.mark.parametrize("name,call,args", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_refused_with_a_typed_error_and_nothing_escapes(kernel, planted, outside,
                                                                  name, call, args):
    assert len(ATTACKS) >= 30
    if args.get("owner") == "__other__":
        args = {**args, "owner": planted}
    state_before = _snapshot(kernel.state_dir / "files")
    outside_before = _snapshot(outside)

    async def attack():
        try:
            return {"ok": await _context.call(call, **args)}
        except LlmosError as e:
            return {"error": type(e).__name__, "message": str(e)}

    outcome = kernel.run(attack())
    assert outcome.get("error") in REFUSALS, outcome
    assert _snapshot(outside) == outside_before
    changed = {p for p in _snapshot(kernel.state_dir / "files").keys() ^ state_before.keys()
               if not p.endswith(("fs.sqlite-wal", "fs.sqlite-shm"))}
    assert not changed
    assert kernel.run(fs.read_text("atk/plain.txt")) == "inside"  # and the kernel still serves


def test_paths_that_look_odd_but_stay_inside_work(kernel):
    async def scenario():
        await fs.write("odd//./a.txt", "one")
        await fs.write("odd/ünïcödé 名前.txt", "two")
        await fs.write("odd/..hidden", "three")
        return sorted(e["path"] for e in await fs.list("odd"))

    assert kernel.run(scenario()) == ["odd/..hidden", "odd/a.txt", "odd/ünïcödé 名前.txt"]


def test_a_symlink_swapped_in_and_out_during_writes_never_leaks(kernel, outside):
    """A thread flips ``race`` between a directory and a link to outside while the program
    writes through it: each write lands in the home or is refused, never outside."""
    home = _home(kernel, kernel.pid)
    race = home / "race"
    stop = threading.Event()
    kernel.run(fs.mkdir("race"))

    def flipper():
        while not stop.is_set():
            try:
                if race.is_symlink():
                    race.unlink()
                    race.mkdir(exist_ok=True)
                else:
                    for child in race.iterdir():
                        child.unlink()
                    race.rmdir()
                    race.symlink_to(outside / "dir")
            except OSError:
                pass

    async def writes():
        outcomes = []
        for i in range(60):
            try:
                await fs.write(f"race/f{i}.txt", f"{i}")
                outcomes.append("ok")
            except LlmosError as e:
                outcomes.append(type(e).__name__)
        return outcomes

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        outcomes = kernel.run(writes())
    finally:
        stop.set()
        thread.join()
    assert set(outcomes) <= REFUSALS | {"ok"}, outcomes
    assert list((outside / "dir").iterdir()) == []


def test_grants_share_files_between_processes_and_can_be_revoked(kernel):
    me = kernel.pid
    keeper_name = f"keeper-{uuid.uuid4().hex[:6]}"

    async def scenario():
        keeper = await proc.spawn("syscall_agents:FileKeeper", {
            "files": {"notes/a.txt": "alpha", "private.txt": "mine"},
            "grants": [["notes", me, "r"]]}, name=keeper_name)

        async def as_keeper(call, args):
            return (await ipc.call(keeper, {"do": [call, args]}, timeout=60)).body

        async def try_(coro):
            try:
                return await coro
            except LlmosError as e:
                return type(e).__name__

        seen = {"grants": await as_keeper("fs.grants", {})}  # answered once its init is done
        seen |= {
            "read_by_name": await fs.read_text("notes/a.txt", owner=keeper_name),
            "read_private": await try_(fs.read("private.txt", owner=keeper)),
            "write_read_only": await try_(fs.write("notes/a.txt", "x", owner=keeper)),
            "list_granted": [e["path"] for e in await fs.list("notes", owner=keeper)],
            "list_home": await try_(fs.list(".", owner=keeper)),
        }
        await as_keeper("fs.grant", {"path": "notes", "to": me, "mode": "rw"})
        seen["write_rw"] = (await fs.write("notes/b.txt", "beta", owner=keeper))["path"]
        seen["keeper_reads_it"] = await as_keeper("fs.read", {"path": "notes/b.txt"})
        escape = {"path": "notes/../private.txt", "owner": keeper}
        seen["traverse_out_of_grant"] = await try_(_context.call("fs.read", **escape))
        await as_keeper("fs.revoke", {"path": "notes", "to": me})
        seen["after_revoke"] = await try_(fs.read("notes/a.txt", owner=keeper))
        outsider = await proc.spawn("syscall_agents:probe", {"calls": [
            ["fs.read", {"path": "notes/a.txt", "owner": keeper}]]})
        seen["outsider"] = (await proc.wait(outsider, timeout=60))["result"][0].get("error")
        await fs.write("for-keeper.txt", "from the driver")
        await fs.grant("for-keeper.txt", keeper, "r")
        seen["keeper_reads_driver"] = await as_keeper(
            "fs.read", {"path": "for-keeper.txt", "owner": me})
        seen["keeper_writes_driver"] = await as_keeper(
            "fs.write", {"path": "for-keeper.txt", "data": "x", "owner": me})
        await proc.kill(keeper)
        return seen

    seen = kernel.run(scenario())
    assert seen["read_by_name"] == "alpha"
    assert seen["read_private"] == seen["write_read_only"] == "PermissionDenied"
    assert seen["list_granted"] == ["notes/a.txt"]
    assert seen["list_home"] == "PermissionDenied"
    assert {"owner": seen["grants"]["ok"][0]["owner"], "grantee": me, "path": "notes",
            "mode": "r"}.items() <= seen["grants"]["ok"][0].items()
    assert seen["write_rw"] == "notes/b.txt"
    assert seen["keeper_reads_it"] == {"ok": "beta"}
    assert seen["traverse_out_of_grant"] == "PermissionDenied"
    assert seen["after_revoke"] == "PermissionDenied"
    assert seen["outsider"] == "PermissionDenied"
    assert seen["keeper_reads_driver"] == {"ok": "from the driver"}
    assert seen["keeper_writes_driver"]["error"] == "PermissionDenied"


def test_the_byte_quota_given_at_spawn_holds(kernel):
    async def scenario():
        pid = await proc.spawn("syscall_agents:probe", {"calls": [
            ["fs.write", {"path": "a.bin", "data": "a" * 3000}],
            ["fs.write", {"path": "b.bin", "data": "b" * 6000}],
            *[["fs.mkdir", {"path": f"d{i}"}] for i in range(20)],
            ["fs.usage", {}],
            ["fs.read", {"path": "a.bin"}],
        ]}, quotas={"fs_bytes": 8192})
        return (await proc.wait(pid, timeout=60))["result"]

    first, second, *mkdirs, usage, read = kernel.run(scenario())
    assert "ok" in first
    assert second["error"] == "QuotaExceeded"
    assert any(m.get("error") == "QuotaExceeded" for m in mkdirs)
    assert usage["ok"]["bytes_used"] <= usage["ok"]["quota_bytes"] == 8192
    assert read == {"ok": "a" * 3000}


def test_versions_and_rollback_through_the_syscalls(kernel):
    path = f"versioned-{uuid.uuid4().hex[:6]}.txt"

    async def scenario():
        for text in ("one", "two", "three"):
            await fs.write(path, text)
        kept = await fs.versions(path)
        await fs.rollback(path, kept[0]["version"])
        return kept, await fs.read_text(path), await fs.stat(path)

    kept, text, stat = kernel.run(scenario())
    assert len(kept) == 2 and text == "one" and stat["kind"] == "file"


def test_atomic_open_writes_whole_files(kernel):
    path = f"opened-{uuid.uuid4().hex[:6]}.txt"

    async def scenario():
        async with fs.open(path, "w") as f:
            f.write("head ")
        async with fs.open(path, "a") as f:
            f.write("tail")
        async with fs.open(path) as f:
            return f.read()

    assert kernel.run(scenario()) == "head tail"
    with pytest.raises(PermissionDenied):
        kernel.run(fs.read("../x"))
