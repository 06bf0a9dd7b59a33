"""One identity per agent: saved keys per AGENT_NAME, and a mismatch is one clear error.

Real ``exploop-agent`` processes against a real API, sharing one HOME as two agents
on one host run by one user do.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from exploop.run.children import script

pytestmark = pytest.mark.e2e


def run_agent(env: dict, home, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``exploop-agent`` to its exit (it fails at start in these cases)."""
    base = {k: v for k, v in os.environ.items() if k not in (
        "API_URL", "API_KEY", "BOOTSTRAP_TOKEN", "REGION", "CAPABILITIES", "AGENT_NAME", "EXPLOOP_STATE_DIR")}
    return subprocess.run([script("exploop-agent")], env=dict(base, HOME=str(home), METRICS_PORT="off", **env),
                          capture_output=True, text=True, timeout=timeout)


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_two_agents_on_one_host_run_as_two_agents(stack, tmp_path):
    stack.start_api()
    home = tmp_path / "host"
    home.mkdir()
    one = stack.start_agent("agent-one", home=home)
    stack.wait_agent_online("agent-one")
    two = stack.start_agent("agent-two", home=home)  # another AGENT_NAME and BOOTSTRAP_TOKEN
    stack.wait_agent_online("agent-two")

    saved = {name: home / ".exploop" / "agents" / f"{name}.json" for name in ("agent-one", "agent-two")}
    keys = {name: json.loads(path.read_text()) for name, path in saved.items()}
    assert {name: k["name"] for name, k in keys.items()} == {"agent-one": "agent-one", "agent-two": "agent-two"}
    assert keys["agent-one"]["api_key"] != keys["agent-two"]["api_key"]
    assert all(oct(path.stat().st_mode & 0o777) == "0o600" for path in saved.values())
    agents = {a["name"]: a for a in stack.admin("GET", "/admin/v1/agents").json()["items"]}
    assert set(agents) == {"agent-one", "agent-two"}
    assert agents["agent-one"]["nodename"] != agents["agent-two"]["nodename"]

    # The second one's graceful stop releases its own lease, not the first one's.
    assert two.stop() == 0
    stack.wait_for(lambda: stack.admin("GET", "/admin/v1/agents/agent-two").json()["status"] == "offline",
                   20, "agent-two offline")
    assert stack.admin("GET", "/admin/v1/agents/agent-one").json()["status"] == "online"
    assert one.alive()

    # A restart without a token finds its own key (its bootstrap token is spent).
    again = stack.start_agent("agent-two", home=home)
    stack.wait_agent_online("agent-two")
    assert f"using saved agent key name=agent-two file={saved['agent-two']}" in again.output()
    assert stack.admin("GET", "/admin/v1/agents").json()["total"] == 2


def test_a_name_that_does_not_match_the_saved_key_is_one_clear_error(stack, tmp_path):
    stack.start_api()
    home = tmp_path / "host"
    home.mkdir()
    # An unnamed agent: its generated name and key go to agent.json, the pre-per-name layout.
    first = stack.start_agent(home=home)
    name = stack.wait_agent_online()[0]["name"]
    assert first.stop() == 0
    legacy = json.loads((home / ".exploop" / "agent.json").read_text())
    assert legacy["name"] == name

    # Another name and no token: no key of its own, and the saved one is someone else's.
    result = run_agent({"API_URL": stack.url, "AGENT_NAME": "agent-other"}, home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result).startswith("exploop-agent: AGENT_NAME: no saved key for agent 'agent-other'")
    assert f"is agent {name!r}" in last_line(result)

    # A key of one agent run under another name.
    result = run_agent({"API_URL": stack.url, "AGENT_NAME": "agent-other", "API_KEY": legacy["api_key"]}, home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last_line(result) == (f"exploop-agent: AGENT_NAME: 'agent-other' but this key (API_KEY or the saved"
                                 f" key) belongs to agent {name!r}; use that agent's name or its own key")

    # A per-name file holding another agent's key (copied by hand).
    agents_dir = home / ".exploop" / "agents"
    agents_dir.mkdir(mode=0o700)
    (agents_dir / "agent-copy.json").write_text(json.dumps(legacy))
    result = run_agent({"API_URL": stack.url, "AGENT_NAME": "agent-copy"}, home)
    assert result.returncode == 2
    assert last_line(result) == (f"exploop-agent: AGENT_NAME: 'agent-copy' but {agents_dir / 'agent-copy.json'}"
                                 f" holds the key of agent {name!r}; remove that file or fix AGENT_NAME")

    # The agent of agent.json, now named explicitly, still finds its key there.
    named = stack.start_agent(name, home=home)
    stack.wait_agent_online(name)
    assert f"using saved agent key name={name} file={home / '.exploop' / 'agent.json'}" in named.output()
