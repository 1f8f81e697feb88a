"""Where llmos keeps things: one home, a model store, a state dir, and the names a
kernel is found by."""

from __future__ import annotations

import os
from pathlib import Path


def llmos_home() -> Path:
    """``$LLMOS_HOME``, else ``~/.llmos``."""
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


def models_dir() -> Path:
    return llmos_home() / "models"


def default_state_dir() -> Path:
    """``$LLMOS_STATE_DIR``, else ``$LLMOS_HOME/state``."""
    env = os.environ.get("LLMOS_STATE_DIR")
    return Path(env).expanduser() if env else llmos_home() / "state"


NAMESPACE = "llmos"  # the Ray namespace every llmos actor lives in
DEFAULT_NAME = "kernel"  # a kernel's actor name unless told otherwise
ROOT_TOKEN_FILE = "root.token"  # in the state dir, mode 0600: what drivers present


def publish_state_dir(name: str, state_dir: Path) -> None:
    """Where kernel ``name`` keeps its state (so its root token), put in the Ray
    cluster's key-value store: a client on any node finds the token file without asking
    the kernel, whose methods all want that token."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(f"state_dir:{name}", str(state_dir), overwrite=True,
                                 namespace=NAMESPACE)


def published_state_dir(name: str) -> Path | None:
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(f"state_dir:{name}", namespace=NAMESPACE)
    return Path(value.decode()) if value else None
