"""Every test here runs programs in the sandbox: on a machine that cannot enforce one
(no Landlock, no libseccomp) they are skipped, saying why."""

from __future__ import annotations

import pytest

from actors.sandbox_policy import check_available
from llmos_kernel.errors import LlmosError


@pytest.fixture(autouse=True)
def sandbox_available() -> None:
    try:
        check_available()
    except LlmosError as e:  # pragma: no cover - the development machines have Landlock ABI 7
        pytest.skip(f"no sandbox on this machine: {e}")
