"""The unit layer needs no Ray: nothing that ``pytest tests/unit`` imports may import it.

Collection imports every test module (and the llmos modules they use) before any test
runs, so a fresh interpreter that only collects ``tests/unit`` shows whether any of
them imports Ray at module level. It runs in its own process so that it holds whether
this suite runs alone or as part of the whole one (whose other tests import Ray).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent.resolve()
ROOT = HERE.parents[1]

PROBE = """
import sys, pytest
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]])
ray = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
print("RAY-MODULES:", ray[:5])
sys.exit(code or (3 if ray else 0))
"""


def test_collecting_the_unit_layer_imports_no_ray():
    done = subprocess.run([sys.executable, "-c", PROBE, str(HERE)], cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=300)
    assert "RAY-MODULES: []" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-3000:]
