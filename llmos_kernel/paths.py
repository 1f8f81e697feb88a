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
