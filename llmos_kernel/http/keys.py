"""API keys: who an HTTP caller is, and what it may use.

Each key names a kernel process the gateway attaches for it, with the key's priority and
token quota, so the scheduler's priorities, fair share and quotas apply to HTTP callers
exactly as to agents. With no key configured the server answers loopback callers only,
as that one anonymous process.

A keys file is JSON: ``{"KEY": {"name": "alice", "priority": 10, "tokens": 100000,
"max_streams": 8}, ...}`` (every field but the name optional).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from llmos_kernel.errors import InvalidArgument

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class ApiKey:
    name: str
    priority: int = 0
    tokens: int | None = None  # token quota of its process; None: unlimited
    max_streams: int = 16  # requests in flight at once

    @property
    def quotas(self) -> dict | None:
        return None if self.tokens is None else {"tokens": self.tokens}


class KeyRing:
    def __init__(self, keys: dict[str, ApiKey]):
        for key in keys:
            if not isinstance(key, str) or len(key) < 8:
                raise InvalidArgument("an API key must be a string of at least 8 characters")
        self.keys = dict(keys)

    @classmethod
    def load(cls, path: str | Path | None = None, api_key: str | None = None) -> KeyRing:
        keys: dict[str, ApiKey] = {}
        if api_key:
            keys[api_key] = ApiKey("api-key")
        if path is not None:
            try:
                raw = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise InvalidArgument(f"cannot read the keys file {path}: {e}") from None
            if not isinstance(raw, dict):
                raise InvalidArgument(f"{path}: expected an object of key -> settings")
            for key, fields in raw.items():
                if not isinstance(fields, dict) or not isinstance(fields.get("name"), str):
                    raise InvalidArgument(f"{path}: the settings of each key need a 'name'")
                unknown = set(fields) - {"name", "priority", "tokens", "max_streams"}
                if unknown:
                    raise InvalidArgument(f"{path}: unknown key setting(s) {sorted(unknown)}; "
                                          "known: name, priority, tokens, max_streams")
                keys[key] = ApiKey(**fields)
        return cls(keys)

    @property
    def open(self) -> bool:
        """No key configured: loopback callers only, as one anonymous process."""
        return not self.keys

    def find(self, presented: str | None) -> ApiKey | None:
        if presented is None:
            return None
        for key, info in self.keys.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                return info
        return None
