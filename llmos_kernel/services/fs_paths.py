"""What a path string may name in a home: components below it, and nothing that could leave it.

``split_path`` is the only way a caller's path becomes components. It refuses, before any
file is touched, every spelling that could reach outside a home or mean two things:
``..``, absolute paths, ``~``, backslashes, drive letters, and separators hidden by percent
encoding or Unicode look-alikes. The descriptor walk (``fs_jail``) then never meets them.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from llmos_kernel.errors import InvalidArgument, PermissionDenied

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_DEPTH = 64
"""The deepest a directory tree in a home may go, counted in components from the home."""

_LOOKALIKE_NAMES = ("SOLIDUS", "SLASH", "FULL STOP", "DOT LEADER", "SET MINUS", "DIAGONAL")
_DRIVE = re.compile(r"[A-Za-z]:")
_PERCENT_ROUNDS = 3


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

