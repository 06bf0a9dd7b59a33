"""Every module imports on its own in a fresh interpreter (no circular imports)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import admin
import exploop
import workers


def _modules():
    for package in (exploop, workers, admin):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):
                yield info.name


def test_every_module_imports_alone():
    procs = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in sorted(_modules())}
    failures = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            failures[name] = err.strip().splitlines()[-1]
    assert len(procs) > 15
    assert failures == {}
