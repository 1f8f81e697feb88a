"""Which hosts a process may reach with ``net.fetch``: the allowlist given at spawn.

An entry is a host name or IP (any port), ``host:port``, or ``*.domain`` (any subdomain
of the domain, not the domain itself); no scheme, no path. The list is empty unless
someone allowed hosts, and a child's list is cut to what its parent may reach
(``narrow``), so delegation never widens access. Pure functions: the spawn check and the
network service share them.
"""

from __future__ import annotations

import re
from typing import Any

from llmos_kernel.errors import InvalidArgument

MAX_ALLOWLIST = 64
_ENTRY = re.compile(r"^(\*\.)?([a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(:\d{1,5})?$")


def check_allowlist(entries: Any) -> list[str]:
    """A spawn's ``net`` option as a list of normalized entries, or InvalidArgument."""
    if entries is None:
        return []
    if not isinstance(entries, list) or len(entries) > MAX_ALLOWLIST or \
            not all(isinstance(e, str) for e in entries):
        raise InvalidArgument(f"net must be a list of at most {MAX_ALLOWLIST} host names, "
                              "e.g. ['api.example.com', 'localhost:8080', '*.example.org']")
    out = []
    for entry in entries:
        norm = entry.strip().lower()
        if not _ENTRY.match(norm) or (":" in norm and not 0 < _port_of(norm) < 65536):
            raise InvalidArgument(f"net: {entry!r} is not a host, host:port or *.domain "
                                  "(no scheme, no path)")
        out.append(norm)
    return sorted(set(out))


def _port_of(entry: str) -> int:
    host, _, port = entry.rpartition(":")
    return int(port) if host and not entry.endswith("]") else 0


def _split(entry: str) -> tuple[str, int | None]:
    if entry.endswith("]") or ":" not in entry:
        return entry, None
    host, _, port = entry.rpartition(":")
    return host, int(port)


def allows(allowlist: list[str], host: str, port: int) -> bool:
    """Whether ``host:port`` is reached by some entry of ``allowlist``."""
    host = host.lower().rstrip(".")
    for entry in allowlist:
        pattern, entry_port = _split(entry)
        if entry_port is not None and entry_port != port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern.strip("[]"):
            return True
    return False


def narrow(child: list[str], parent: list[str]) -> list[str]:
    """The entries of ``child`` that ``parent`` covers: a child never reaches further."""
    def covered(entry: str) -> bool:
        pattern, port = _split(entry)
        if pattern.startswith("*."):  # only under an equal or wider wildcard
            domain = pattern[2:]
            return any(p.startswith("*.") and (domain == p[2:] or domain.endswith("." + p[2:]))
                       and q in (None, port) for p, q in map(_split, parent))
        host = pattern.strip("[]")
        if port is not None:
            return allows(parent, host, port)
        return any(q is None and allows([p], host, 0) for p, q in map(_split, parent))

    return [entry for entry in child if covered(entry)]
