"""Errors a tenant sees name the problem, never the agent's file system."""
from __future__ import annotations

import sys
from pathlib import Path

from exploop.config import ScannerSettings
from workers.tasks import tenant_safe

SETTINGS = ScannerSettings(osv_db_dir=Path("/var/lib/exploop/osv"))


def test_checkout_paths_become_repository_relative():
    message = "scanner sast failed: SyntaxError: '/tmp/exploop-j1-x8k2/repo/app/main.py' line 3"
    assert tenant_safe(message, SETTINGS) == "scanner sast failed: SyntaxError: 'app/main.py' line 3"
    assert tenant_safe("cannot write /tmp/exploop-j1-x8k2/home/.cache", SETTINGS) == \
        "cannot write <workspace>/home/.cache"


def test_agent_directories_are_replaced():
    message = ("scanner sca failed: OSError: [Errno 5] /var/lib/exploop/osv/PyPI/all.zip; "
               f"File \"{sys.prefix}/lib/python3.11/zipfile.py\"; {Path.home()}/.exploop/agent.json")
    safe = tenant_safe(message, SETTINGS)
    assert "/var/lib/exploop" not in safe and sys.prefix not in safe and str(Path.home()) not in safe
    assert "<OSV_DB_DIR>/PyPI/all.zip" in safe and "<agent home>/.exploop/agent.json" in safe


def test_plain_messages_are_kept():
    message = "ref 'nope' not found in https://git.example.com/acme/app.git"
    assert tenant_safe(message, SETTINGS) == message
    message = "requirements/tmp/dev.txt: invalid TOML; ./tmp/x; tmpfile"
    assert tenant_safe(message, SETTINGS) == message
