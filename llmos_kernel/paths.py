"""Where llmos keeps things on disk: one home, a model store and a state dir."""

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
