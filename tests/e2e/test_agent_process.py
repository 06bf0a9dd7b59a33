"""The exploop-agent binary at start: configuration errors and credential errors."""
from __future__ import annotations

import os
import subprocess

import pytest

from exploop.run.children import script


def run_agent(env: dict, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (
        "API_URL", "API_KEY", "BOOTSTRAP_TOKEN", "REGION", "CAPABILITIES")}
    return subprocess.run([script("exploop-agent")], env=dict(base, HOME=str(tmp_path), **env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("env,variable", [
    ({}, "API_URL"),
    ({"API_URL": "http://127.0.0.1:1", "HEARTBEAT_INTERVAL": "often"}, "HEARTBEAT_INTERVAL"),
    ({"API_URL": "http://127.0.0.1:1", "CAPABILITIES": "dast"}, "CAPABILITIES"),
    ({"API_URL": "http://127.0.0.1:1", "MAX_CONCURRENT_JOBS": "-1"}, "MAX_CONCURRENT_JOBS"),
    ({"API_URL": "http://127.0.0.1:1"}, "API_KEY or BOOTSTRAP_TOKEN"),
])
def test_bad_environment_is_one_line_naming_the_variable(env, variable, tmp_path):
    result = run_agent(env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"exploop-agent: {variable}")
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_invalid_bootstrap_token_is_logged_and_exits(stack, tmp_path):
    stack.start_api()
    result = run_agent({"API_URL": stack.url, "BOOTSTRAP_TOKEN": "rboot_made_up"}, tmp_path)
    assert result.returncode == 1
    assert "invalid bootstrap token" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_refused_api_key_is_authentication_failed(stack, tmp_path):
    stack.start_api()
    result = run_agent({"API_URL": stack.url, "API_KEY": "ragent_revoked"}, tmp_path)
    assert result.returncode == 1
    assert "authentication failed" in result.stderr and "Traceback" not in result.stderr
