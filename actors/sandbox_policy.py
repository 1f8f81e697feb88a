"""What a sandboxed agent process may do, and how the child holds itself to it.

The host decides a ``Policy`` (``policy()``); the child applies it to itself with
``apply()`` after Python has started and before any program code runs, while it is still
single-threaded (Landlock and seccomp bind the calling thread and the threads it starts
later; on Landlock ABI < 8 there is no way to bind threads that already exist). Every
restriction is the kernel's, so it holds against native code (ctypes, C extensions) as
much as against Python. What is guaranteed once ``apply`` returns, and by which mechanism:

- **Files** (Landlock, every filesystem right this kernel handles): the child reads only
  the Python runtime (``sys.prefix``, ``sys.base_prefix``: the stdlib and site-packages),
  the llmos packages, the program's own code, and the shared libraries and loader data
  (``/usr/lib``, ``/lib*``, ``/etc/ld.so.cache``, time zones); it writes nowhere but an
  optional scratch directory; it executes nothing. Not ``/proc`` (other processes'
  ``environ``, ``cmdline``, ``mem``), not ``$HOME``, not the kernel's state dir. Landlock
  checks the path a symlink resolves to, and denies cross-directory links (REFER is not
  granted), so links made in the scratch dir reach nothing new. Landlock is the one
  kernel mechanism that confines an unprivileged process's filesystem view without
  root, namespaces or a helper binary; ``landlockpy`` binds it (the ``landlock`` package
  knows filesystem rules only, not the network rules and scopes of ABI 4 and 6).
- **Network** (seccomp, then Landlock): ``socket()`` is refused outright, and
  ``connect``/``bind``/``listen``/``accept``; ``socketpair`` only for AF_UNIX streams
  (asyncio's self-pipe), which reach nothing but each other. So the only channel out is
  the inherited socket to the host. Seccomp is the primary barrier because it covers
  every family (UDP, raw, netlink, AF_UNIX paths, vsock); Landlock adds TCP
  bind/connect denial (ABI 4) and scopes abstract UNIX sockets and signals to the
  sandbox (ABI 6) where the kernel has them (a second layer: with ``socket()`` refused
  first, the tests cannot reach it).
- **Processes** (seccomp, errors as EPERM, not kills): no ``fork``/``vfork``, ``clone``
  only with CLONE_THREAD and no namespace flags (threads work; ``clone3``, whose flags a
  filter cannot read, answers ENOSYS so libc falls back to ``clone``); no ``execve``; no
  ``ptrace``, ``process_vm_*``, pidfds; signals only to itself; no mounts, namespaces,
  keyrings, bpf, perf, io_uring (whose operations would bypass the filter), modules,
  clocks; no chmod/chown/xattr/utime/truncate-by-path (metadata Landlock does not cover);
  no changing its own rlimits or other processes' scheduling. Syscalls of other
  architectures (i386, x32) kill the process: libseccomp writes that check. The filter
  is a deny list (what no agent needs) rather than an allow list, because the program is
  arbitrary Python with C extensions whose syscalls cannot be enumerated; files and
  network do not depend on it (Landlock). A syscall newer than the installed libseccomp
  is allowed unless listed by number below. ``pyseccomp`` drives the system's
  libseccomp, the field's tool for this.
- **Privileges**: every capability is dropped and no_new_privs set, so a child started
  by root is an unprivileged root: no raising its hard limits, no overriding file
  permissions, no reaching other processes by privilege.
- **Resources** (rlimits, from the process's quotas): address space, CPU seconds (SIGXCPU,
  then SIGKILL a second later), open files, file size, no core dumps. RLIMIT_NPROC is not
  used: it counts every process of the user, and the child runs as its host's user;
  seccomp's fork denial is what bounds processes, and the address-space limit bounds
  threads (each reserves its stack).

Where Landlock or libseccomp is missing, ``check_available`` raises ``SandboxUnavailable``
and no sandboxed process starts: a weaker sandbox under the same name would be a lie.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import importlib.util
import os
import resource
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from actors.sandbox_protocol import Policy
from llmos_kernel import wire
from llmos_kernel.errors import InvalidArgument, SandboxUnavailable

__all__ = ["Limits", "SandboxUnavailable", "apply", "check_available", "policy"]

# -- the host's side: deciding --------------------------------------------------------------

LLMOS_PACKAGES = ("actors", "syscalls", "llmos_kernel")  # what the child itself imports
SYSTEM_READ = ("/usr/lib", "/usr/lib64", "/usr/local/lib", "/lib", "/lib64", "/etc/ld.so.cache",
               "/usr/share/zoneinfo", "/etc/localtime", "/sys/devices/system/cpu",
               "/dev/urandom")
MIN_LANDLOCK_ABI = 1  # filesystem rules; later rights are added where the kernel has them


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed process (None: unlimited)."""

    memory_bytes: int | None = 2 << 30  # address space, which also bounds its threads
    cpu_s: int | None = None  # CPU seconds over its life (agents mostly wait)
    open_files: int = 256
    file_bytes: int = 64 << 20  # the largest file it may write (in its scratch dir)

    @classmethod
    def from_quotas(cls, quotas: Mapping | None) -> Limits:
        """The limits a process's quotas name; other quotas (tokens, mailbox...) are the
        kernel's and are ignored here."""
        values = {}
        for f in fields(cls):
            if quotas and f.name in quotas:
                v = quotas[f.name]
                if (v is not None or f.name in ("open_files", "file_bytes")) and (
                        not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                    raise InvalidArgument(f"quota {f.name} must be an int > 0, got {v!r}")
                values[f.name] = v
        return cls(**values)


@functools.cache
def landlock_abi() -> int:
    """The Landlock ABI this kernel offers; 0 where it has none (or it is disabled)."""
    try:
        import landlockpy

        return landlockpy.abi_version()
    except (ImportError, OSError):
        return 0


def check_available() -> None:
    """Raise SandboxUnavailable, saying what is missing, unless a sandbox can be enforced."""
    abi = landlock_abi()
    if abi < MIN_LANDLOCK_ABI:
        raise SandboxUnavailable("this kernel has no Landlock (Linux 5.13+ with landlock in "
                                 "its LSM list), so a sandboxed process cannot be confined")
    if _seccomp_missing():
        raise SandboxUnavailable("libseccomp (libseccomp2) is not installed, so a sandboxed "
                                 "process's system calls cannot be filtered")


@functools.cache
def _seccomp_missing() -> bool:
    try:
        import pyseccomp  # noqa: F401 - it loads libseccomp as it is imported
    except (ImportError, RuntimeError, OSError):
        return True
    return False


def policy(program: wire.Program, limits: Limits, *, scratch: str | None = None,
           import_paths: Sequence[str] = ()) -> Policy:
    """What the child may read and write to run ``program``."""
    modules = {}
    if program.kind == "module" and program.ref:
        top = program.ref.partition(":")[0].split(".")[0]
        where = _location(top)
        if where is not None:
            modules[top] = where
    code = [p for name in LLMOS_PACKAGES for p in _locations(name)]
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    read = [*sorted(prefixes), *code, *modules.values(), *import_paths, *SYSTEM_READ]
    return Policy(read=list(dict.fromkeys(os.path.realpath(p) for p in read)), modules=modules,
                  import_paths=[os.path.realpath(p) for p in import_paths], scratch=scratch,
                  memory_bytes=limits.memory_bytes, cpu_s=limits.cpu_s,
                  open_files=limits.open_files, file_bytes=limits.file_bytes)


def _locations(name: str) -> list[str]:
    spec = importlib.util.find_spec(name)  # a top-level name: found, not imported
    if spec is None:
        return []
    return list(spec.submodule_search_locations or [spec.origin])


def _location(name: str) -> str | None:
    """A top-level module's file, or a regular package's directory (None: not found here,
    and the program will fail to load it as it would in a host)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or spec.origin in ("built-in", "frozen"):
        return None
    return os.path.dirname(spec.origin) if spec.submodule_search_locations else spec.origin


# -- the child's side: applying ---------------------------------------------------------------


class SandboxError(Exception):
    """The child could not restrict itself; it must not run the program."""


def apply(p: Policy) -> None:
    """Restrict this process for good: limits, privileges, files and network, syscalls."""
    import landlockpy  # noqa: F401 - both load their libraries now: finding libseccomp
    import pyseccomp  # noqa: F401 - runs ldconfig, which the restrictions would forbid

    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise SandboxError(f"{len(threads)} threads exist; restrictions bind only the "
                           "calling thread on this kernel, so the child must apply them alone")
    _limit(p)
    _drop_capabilities()
    _landlock(p)
    _seccomp(os.getpid())


def _limit(p: Policy) -> None:
    def lower(res: int, soft: int, hard: int) -> None:
        _, old_hard = resource.getrlimit(res)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(res, (soft, hard))

    if p.memory_bytes is not None:
        lower(resource.RLIMIT_AS, p.memory_bytes, p.memory_bytes)
    if p.cpu_s is not None:
        lower(resource.RLIMIT_CPU, p.cpu_s, p.cpu_s + 1)
    lower(resource.RLIMIT_NOFILE, p.open_files, p.open_files)
    lower(resource.RLIMIT_FSIZE, p.file_bytes, p.file_bytes)
    lower(resource.RLIMIT_CORE, 0, 0)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, pr_cap_ambient, ambient_clear_all = 24, 47, 4
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    libc.prctl(pr_cap_ambient, ambient_clear_all, 0, 0, 0)
    for cap in range(last + 1):  # fails without CAP_SETPCAP: then there is nothing to drop
        libc.prctl(pr_capbset_drop, cap, 0, 0, 0)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(ctypes.byref(header), data) != 0:
        raise SandboxError(f"capset: {os.strerror(ctypes.get_errno())}")
    with open("/proc/self/status") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    if int(effective, 16):
        raise SandboxError(f"capabilities remain after dropping them: {effective}")


def _landlock(p: Policy) -> None:
    from landlockpy import AccessFS, Ruleset, Scope

    read = AccessFS.READ_FILE | AccessFS.READ_DIR
    write = (AccessFS.WRITE_FILE | AccessFS.MAKE_REG | AccessFS.MAKE_DIR | AccessFS.MAKE_SYM
             | AccessFS.REMOVE_FILE | AccessFS.REMOVE_DIR | AccessFS.TRUNCATE)
    file_rights = AccessFS.READ_FILE | AccessFS.WRITE_FILE | AccessFS.TRUNCATE

    if landlock_abi() < MIN_LANDLOCK_ABI:
        raise SandboxError("this kernel has no Landlock")
    # Every filesystem and network right this kernel knows is handled (denied unless
    # granted below); scopes keep abstract UNIX sockets and signals inside the sandbox.
    with Ruleset(scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL) as ruleset:
        grants = [(path, read) for path in p.read]
        grants.append(("/dev/null", AccessFS.READ_FILE | AccessFS.WRITE_FILE))
        if p.scratch is not None:
            grants.append((p.scratch, read | write))
        for path, access in grants:
            if os.path.isdir(path):
                ruleset.allow_path(path, access)
            elif os.path.exists(path):
                ruleset.allow_path(path, access & file_rights)
        ruleset.restrict()


# Refused with EPERM whatever their arguments.
_DENIED = (
    # new processes and programs (threads are clone with CLONE_THREAD, below)
    "fork", "vfork", "execve", "execveat",
    # reaching into other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal", "process_madvise", "process_mrelease", "tkill",
    # namespaces, mounts, roots
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "mount_setattr",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    # kernel facilities no agent needs, each a large attack surface; io_uring's operations
    # (socket, connect, ...) would not pass through this filter at all
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
    "quotactl", "quotactl_fd", "syslog", "fanotify_init", "open_by_handle_at",
    "name_to_handle_at", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "sethostname", "setdomainname", "vhangup",
    # sockets beyond the inherited one (see socketpair below)
    "socket", "connect", "bind", "listen", "accept", "accept4",
    # what Landlock does not cover: file metadata, and truncation by path on ABI < 3
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "utime", "utimes", "utimensat", "futimesat", "truncate",
    # its own limits
    "setrlimit",
)
# Syscalls newer than the libseccomp this may run with, by their number on every
# architecture but alpha (one table since Linux 5.1): xattrs by path and a mount call.
_DENIED_BY_NUMBER = {"setxattrat": 463, "removexattrat": 466, "open_tree_attr": 467}

_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                     0x40000000)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C  # push input into a terminal


def _seccomp(pid: int) -> None:
    import pyseccomp as sc

    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)

    def deny(name: str | int, *args: sc.Arg, action: int = eperm) -> None:
        if isinstance(name, str) and sc.resolve_syscall(sc.Arch.NATIVE, name) < 0:
            return  # not a syscall of this architecture (libseccomp knows it by name)
        f.add_rule(action, name, *args)

    for name in _DENIED:
        deny(name)
    for number in _DENIED_BY_NUMBER.values():
        deny(number)
    deny("clone3", action=sc.ERRNO(errno.ENOSYS))
    deny("clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))
    for flag in _CLONE_NAMESPACES:
        deny("clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        deny(name, sc.Arg(0, sc.NE, pid))  # signals to itself only
    deny("socketpair", sc.Arg(0, sc.NE, socket.AF_UNIX))
    for kind in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):  # a datagram can be addressed
        deny("socketpair", sc.Arg(1, sc.MASKED_EQ, 0xF, kind))
    deny("prlimit64", sc.Arg(2, sc.NE, 0))  # reading limits is fine, setting them is not
    for request in (_TIOCSTI, _TIOCLINUX):
        deny("ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    for name in ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
                 "migrate_pages", "move_pages", "get_robust_list"):
        deny(name, sc.Arg(0, sc.NE, 0))  # itself (0) only, never another process
    deny("setpriority", sc.Arg(0, sc.NE, 0))  # PRIO_PROCESS...
    deny("setpriority", sc.Arg(1, sc.NE, 0))  # ...of itself
    deny("ioprio_set", sc.Arg(0, sc.NE, 1))  # IOPRIO_WHO_PROCESS...
    deny("ioprio_set", sc.Arg(1, sc.NE, 0))  # ...of itself
    f.load()
