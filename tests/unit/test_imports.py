"""Only the pool's workers load numpy and scikit-learn: other processes start fast and small."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["deployflag.settings", "deployflag.service", "deployflag.__main__", "deployflag.healthcheck"],
)
def test_importing_does_not_load_the_numeric_stack(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('numpy', 'sklearn', 'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
