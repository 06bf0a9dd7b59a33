"""Every module imports on its own in a fresh interpreter (nothing relies on import order)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.test_imports import PACKAGES, ROOT, _modules


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_alone(package):
    names = sorted(name for name in _modules() if name.split(".")[0] == package)
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names}
    failures = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures[name] = err.strip().splitlines()[-1]
    assert failures == {}
