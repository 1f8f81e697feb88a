"""Keep the unit layer model-free: a test here that asks (directly or through another fixture)
for the real model or for Ray, both set up by tests/conftest.py, is a collection error."""

from __future__ import annotations

from pathlib import Path

import pytest

HEAVY_ROOTS = {"model_path", "ray_session"}  # every heavy session fixture builds on these
HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        heavy = HEAVY_ROOTS & set(getattr(item, "fixturenames", ()))
        if heavy and HERE in item.path.parents:
            raise pytest.UsageError(f"{item.nodeid} needs {', '.join(sorted(heavy))}: "
                                    "tests/unit must run without a model or Ray")
