"""The Docker images: hadolint on both Dockerfiles, the agent image's contract, its healthcheck.

There is no Docker engine in CI, so the images are not built here: hadolint checks the
Dockerfiles, the tests below read the agent image's instructions, and the healthcheck
script runs against real processes and a real HTTP server.
"""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from exploop.run.children import free_port

ROOT = Path(__file__).resolve().parents[2]
HEALTHCHECK = ROOT / "docker" / "agent-healthcheck.py"
# .ci/validate-deploy installs the validators and sets this: there, a missing tool fails.
REQUIRE_TOOLS = os.environ.get("EXPLOOP_REQUIRE_DEPLOY_TOOLS") == "1"


def tool(name: str) -> str:
    """Path of a validator installed next to this Python, else skip (or fail under validate-deploy)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    if REQUIRE_TOOLS:
        pytest.fail(f"{name} is not installed: pip install -r requirements-deploy.txt")
    pytest.skip(f"{name} not installed (.ci/validate-deploy installs requirements-deploy.txt)")


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    parsed = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]
    last_from = max(i for i, (op, _) in enumerate(parsed) if op == "FROM")
    return parsed[last_from:]


def one(dockerfile: str, op: str) -> str:
    found = [args for name, args in instructions(dockerfile) if name == op]
    assert len(found) == 1, (op, found)
    return found[0]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.agent"])
def test_hadolint_is_clean(dockerfile):
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_agent_image_runs_as_the_non_root_exploop_user():
    assert one("Dockerfile.agent", "USER") == "10001:10001"
    run = " ".join(args for op, args in instructions("Dockerfile.agent") if op == "RUN")
    assert "useradd --system --uid 10001 --gid exploop --home-dir /home/exploop" in run
    assert "install -d -o exploop -g exploop -m 0700 /home/exploop/.exploop" in run
    env = one("Dockerfile.agent", "ENV")
    assert "HOME=/home/exploop" in env and "METRICS_PORT=9100" in env


def test_agent_image_keeps_its_key_in_the_runbook_volume():
    assert one("Dockerfile.agent", "VOLUME") == '["/home/exploop/.exploop"]'


def test_agent_image_entrypoint_is_exploop_agent_under_tini():
    assert one("Dockerfile.agent", "ENTRYPOINT") == '["/usr/bin/tini", "--", "exploop-agent"]'
    assert one("Dockerfile.agent", "STOPSIGNAL") == "SIGTERM"
    assert not [args for op, args in instructions("Dockerfile.agent") if op == "CMD"]


def test_agent_image_has_git_and_a_healthcheck():
    run = " ".join(args for op, args in instructions("Dockerfile.agent") if op == "RUN")
    assert '"git=${GIT_VERSION}"' in run
    healthcheck = one("Dockerfile.agent", "HEALTHCHECK")
    assert "/usr/local/bin/exploop-agent-healthcheck" in healthcheck
    assert "--start-period=90s" in healthcheck


def test_server_image_defaults_to_the_api():
    assert one("Dockerfile", "USER") == "10001:10001"
    assert one("Dockerfile", "CMD") == '["exploop", "api", "--host", "0.0.0.0", "--port", "8080"]'


# --- the healthcheck script --------------------------------------------------------------

class _Metrics(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/metrics" else 404)
        self.end_headers()
        self.wfile.write(b"exploop_agent_status 1\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_server():
    servers = []

    def start(status: int) -> int:
        handler = type("Handler", (_Metrics,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def healthcheck(tmp_path: Path, proc: Path | None = None, **env) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    if proc is not None:
        base["EXPLOOP_HEALTHCHECK_PROC"] = str(proc)
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def fake_proc(root: Path, processes: dict[int, tuple[list[str], str]]) -> Path:
    """A /proc with the given pid -> (argv, state)."""
    for pid, (argv, state) in processes.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (root / str(pid) / "stat").write_text(f"{pid} (python3) {state} 1 1 1 0 -1\n")
    return root


def test_healthy_when_the_metrics_endpoint_answers(tmp_path, metrics_server):
    port = metrics_server(200)
    result = healthcheck(tmp_path, proc=fake_proc(tmp_path / "proc", {}), METRICS_PORT=str(port))
    assert (result.returncode, result.stdout) == (0, f"healthy: metrics endpoint http://127.0.0.1:{port}/metrics answered 200\n")


def test_unhealthy_when_the_metrics_endpoint_fails(tmp_path, metrics_server):
    port = metrics_server(500)
    result = healthcheck(tmp_path, METRICS_PORT=str(port), API_KEY="ragent_x")
    assert result.returncode == 1
    assert result.stdout == f"unhealthy: metrics endpoint http://127.0.0.1:{port}/metrics answered 500\n"


def test_without_metrics_a_live_agent_with_a_key_is_healthy(tmp_path):
    agent = tmp_path / "bin" / "exploop-agent"
    agent.parent.mkdir()
    agent.write_text("import time\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, str(agent)])
    try:
        port = free_port()  # nothing listens there
        result = healthcheck(tmp_path, METRICS_PORT=str(port), API_KEY="ragent_x")
    finally:
        child.kill()
        child.wait()
    assert result.returncode == 0, result.stdout
    assert f"nothing listens on http://127.0.0.1:{port}/metrics; exploop-agent runs" in result.stdout
    assert result.stdout.rstrip().endswith("with its key from API_KEY")


def test_without_metrics_the_saved_key_file_counts(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.json").write_text("{}")
    proc = fake_proc(tmp_path / "proc", {41: (["/opt/exploop/bin/python", "/opt/exploop/bin/exploop-agent"], "S")})
    result = healthcheck(tmp_path, proc=proc, METRICS_PORT="off", EXPLOOP_STATE_DIR=str(state))
    assert result.returncode == 0, result.stdout
    assert result.stdout == f"healthy: METRICS_PORT=off; exploop-agent runs (pid 41) with its key from {state / 'agent.json'}\n"


def test_without_metrics_a_named_agent_counts_its_own_key_file(tmp_path):
    state = tmp_path / "state"
    (state / "agents").mkdir(parents=True)
    (state / "agents" / "agent-b.json").write_text("{}")
    proc = fake_proc(tmp_path / "proc", {41: (["/opt/exploop/bin/python", "/opt/exploop/bin/exploop-agent"], "S")})
    result = healthcheck(tmp_path, proc=proc, METRICS_PORT="off", EXPLOOP_STATE_DIR=str(state), AGENT_NAME="agent-b")
    assert result.returncode == 0, result.stdout
    assert result.stdout.rstrip().endswith(f"with its key from {state / 'agents' / 'agent-b.json'}")
    other = healthcheck(tmp_path, proc=proc, METRICS_PORT="off", EXPLOOP_STATE_DIR=str(state), AGENT_NAME="agent-c")
    assert other.returncode == 1 and "has no key yet" in other.stdout


def test_without_metrics_an_agent_without_a_key_is_unhealthy(tmp_path):
    proc = fake_proc(tmp_path / "proc", {41: (["/opt/exploop/bin/python", "/opt/exploop/bin/exploop-agent"], "S")})
    result = healthcheck(tmp_path, proc=proc, METRICS_PORT="off")
    assert result.returncode == 1
    assert "but has no key yet (no API_KEY, no saved agent.json)" in result.stdout


def test_zombies_and_tini_are_not_the_agent(tmp_path):
    proc = fake_proc(tmp_path / "proc", {
        1: (["/usr/bin/tini", "--", "exploop-agent"], "S"),
        7: (["/opt/exploop/bin/python", "/opt/exploop/bin/exploop-agent"], "Z"),
    })
    result = healthcheck(tmp_path, proc=proc, METRICS_PORT="off", API_KEY="ragent_x")
    assert (result.returncode, result.stdout) == (
        1, "unhealthy: METRICS_PORT=off and no exploop-agent process is running\n")


def test_healthcheck_needs_only_the_standard_library():
    source = HEALTHCHECK.read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from ")) and "__future__" not in line}
    assert imports <= set(sys.stdlib_module_names), imports
