"""charts/: what the Helm charts render, checked against the runbook and Kubernetes' schemas.

Rendered offline with helm-python-sdk (Helm's Go SDK); every manifest is validated with
kubernetes-validate. Without those packages these tests skip; .ci/validate-deploy
installs them and makes a missing one a failure.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
AGENT_CHART = ROOT / "charts" / "platform-agent"
SERVER_CHART = ROOT / "charts" / "exploop"
RUNBOOK_INSTALL = {"apiUrl": "https://api.exploop.io", "bootstrapToken": "rboot_test", "replicaCount": 3,
                   "agent": {"region": "us-east-1"}}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("EXPLOOP_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(f"{module} is not installed: pip install -r requirements-deploy.txt")
        pytest.skip(f"{module} not installed (.ci/validate-deploy installs requirements-deploy.txt)")


def render(chart: Path, values: dict, release: str = "platform-agent") -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, each one valid against the Kubernetes schemas (strict)."""
    helm = _require("helm_python")
    kubernetes_validate = _require("kubernetes_validate")
    with helm.Chart.load(chart) as loaded:
        rendered = loaded.render(values, name=release, namespace="exploop", is_install=True)
    manifests = {}
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                kubernetes_validate.validate(doc, "1.37.0", strict=True)
                manifests[(doc["kind"], doc["metadata"]["name"])] = doc
    return manifests


def render_error(chart: Path, values: dict) -> str:
    helm = _require("helm_python")
    with helm.Chart.load(chart) as loaded:
        with pytest.raises(helm.HelmError) as failure:
            loaded.render(values, name="platform-agent", namespace="exploop")
    return str(failure.value)


def lint(chart: Path, values: dict) -> dict:
    return _require("helm_python").lint(chart, values, strict=True, namespace="exploop")


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- platform-agent ----------------------------------------------------------------------

def test_runbook_install_makes_the_deployment_its_kubectl_commands_address():
    manifests = render(AGENT_CHART, RUNBOOK_INSTALL)
    deployment = manifests[("Deployment", "exploop-platform-agent")]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["name"] == "agent"  # kubectl set image deployment/exploop-platform-agent agent=...
    assert container["image"] == "exploopio/agent:platform"
    env = env_of(container)
    assert env["API_URL"] == "https://api.exploop.io" and env["REGION"] == "us-east-1"
    assert (env["CAPABILITIES"], env["MAX_CONCURRENT_JOBS"], env["LOG_LEVEL"]) == ("sast,sca,secrets", "5", "info")
    assert (env["HEARTBEAT_INTERVAL"], env["POLL_TIMEOUT"]) == ("30s", "30s")
    assert env["BOOTSTRAP_TOKEN"] == {"secretKeyRef": {"name": "exploop-platform-agent",
                                                       "key": "BOOTSTRAP_TOKEN", "optional": True}}
    secret = manifests[("Secret", "exploop-platform-agent")]
    assert secret["data"] == {"BOOTSTRAP_TOKEN": "cmJvb3RfdGVzdA=="}  # base64 of rboot_test


def test_pods_drain_on_sigterm_for_as_long_as_docker_stop_waits():
    pod = render(AGENT_CHART, RUNBOOK_INSTALL)[("Deployment", "exploop-platform-agent")]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    assert "lifecycle" not in pod["containers"][0]  # no preStop: SIGTERM is the warm shutdown


def test_default_resources_are_the_runbooks_medium_row():
    pod = render(AGENT_CHART, RUNBOOK_INSTALL)[("Deployment", "exploop-platform-agent")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "20Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "ephemeral-storage": "20Gi"}}


def test_each_pod_keeps_its_key_across_container_restarts():
    pod = render(AGENT_CHART, RUNBOOK_INSTALL)[("Deployment", "exploop-platform-agent")]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "state", "emptyDir": {"sizeLimit": "16Mi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "state", "mountPath": "/home/exploop/.exploop"}]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]


def test_the_runbooks_hpa():
    manifests = render(AGENT_CHART, dict(RUNBOOK_INSTALL, autoscaling={"enabled": True}))
    hpa = manifests[("HorizontalPodAutoscaler", "exploop-platform-agent-hpa")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "exploop-platform-agent"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "exploop_agent_jobs_running"},
        "target": {"type": "AverageValue", "averageValue": "4"}}}]
    # The HPA owns the replica count: helm upgrade must not reset it.
    assert "replicas" not in manifests[("Deployment", "exploop-platform-agent")]["spec"]


def test_queue_depth_alternative_counts_this_regions_queues():
    values = dict(RUNBOOK_INSTALL, agent={"region": "eu-west-1", "capabilities": "sast,secrets"},
                  autoscaling={"enabled": True, "metric": "queueDepth"})
    hpa = render(AGENT_CHART, values)[("HorizontalPodAutoscaler", "exploop-platform-agent-hpa")]
    assert hpa["spec"]["metrics"] == [{"type": "External", "external": {
        "metric": {"name": "exploop_queue_depth", "selector": {"matchExpressions": [
            {"key": "queue", "operator": "In", "values": ["sast.eu-west-1", "secrets.eu-west-1"]}]}},
        "target": {"type": "AverageValue", "averageValue": "5"}}}]


def test_statefulset_keeps_every_agents_key_on_its_own_volume():
    manifests = render(AGENT_CHART, dict(RUNBOOK_INSTALL, workload="StatefulSet", autoscaling={"enabled": True}))
    statefulset = manifests[("StatefulSet", "exploop-platform-agent")]
    assert statefulset["spec"]["serviceName"] == "exploop-platform-agent"
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert "volumes" not in statefulset["spec"]["template"]["spec"]
    hpa = manifests[("HorizontalPodAutoscaler", "exploop-platform-agent-hpa")]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
    assert ("Service", "exploop-platform-agent") in manifests


def test_another_region_is_another_release():
    manifests = render(AGENT_CHART, dict(RUNBOOK_INSTALL, agent={"region": "eu-west-1"}),
                       release="platform-agent-eu-west-1")
    assert ("Deployment", "exploop-platform-agent-eu-west-1") in manifests


def test_api_key_alternative_is_a_single_agent():
    manifests = render(AGENT_CHART, {"apiUrl": "https://api.exploop.io", "apiKey": "ragent_abc", "replicaCount": 1})
    assert set(manifests[("Secret", "exploop-platform-agent")]["data"]) == {"API_KEY"}
    assert "replicas" in manifests[("Deployment", "exploop-platform-agent")]["spec"]
    error = render_error(AGENT_CHART, {"apiUrl": "https://api.exploop.io", "apiKey": "ragent_abc"})
    assert "apiKey is one agent's identity: it allows replicaCount=1 and no autoscaling" in error


@pytest.mark.parametrize("values, message", [
    ({"bootstrapToken": "rboot_x"}, "apiUrl is required: --set apiUrl=https://api.exploop.io"),
    ({"apiUrl": "api.exploop.io", "bootstrapToken": "rboot_x"}, 'apiUrl: expected an http(s) URL, got "api.exploop.io"'),
    ({"apiUrl": "https://api.exploop.io"}, "an identity is required: --set bootstrapToken=<token>"),
])
def test_unusable_values_fail_with_one_clear_line(values, message):
    assert message in render_error(AGENT_CHART, values)


def test_values_schema_rejects_unknown_capabilities():
    report = lint(AGENT_CHART, dict(RUNBOOK_INSTALL, agent={"capabilities": "sast,dast"}))
    assert any("/agent/capabilities" in error for error in report["errors"])
    assert lint(AGENT_CHART, RUNBOOK_INSTALL)["errors"] == []


# --- exploop (API, controller, Flower) ---------------------------------------------------

SERVER_VALUES = {"database": {"url": "postgresql://exploop:pw@postgres:5432/exploop"},
                 "redis": {"url": "redis://redis:6379/0"}}


def test_server_chart_runs_api_controller_and_flower():
    manifests = render(SERVER_CHART, SERVER_VALUES, release="exploop")
    api = manifests[("Deployment", "exploop-api")]["spec"]["template"]["spec"]
    [container] = api["containers"]
    assert container["args"][:4] == ["exploop", "api", "--host", "0.0.0.0"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in container["livenessProbe"]  # a database outage restarts nothing
    assert api["terminationGracePeriodSeconds"] == 60
    env = env_of(container)
    assert env["EXPLOOP_SQLALCHEMY_DATABASE_URI"]["secretKeyRef"]["key"] == "EXPLOOP_SQLALCHEMY_DATABASE_URI"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/exploop-api-metrics"
    controller = manifests[("Deployment", "exploop-controller")]["spec"]["template"]["spec"]["containers"][0]
    assert controller["args"][:2] == ["exploop", "controller"]
    flower = manifests[("Deployment", "exploop-flower")]["spec"]["template"]["spec"]["containers"][0]
    assert flower["args"][:3] == ["celery", "--broker=$(EXPLOOP_REDIS_URL)", "flower"]
    assert env_of(flower)["FLOWER_UNAUTHENTICATED_API"] == "true"
    assert ("Service", "exploop-api") in manifests and ("PodDisruptionBudget", "exploop-api") in manifests


def test_server_chart_needs_a_database():
    helm = _require("helm_python")
    with helm.Chart.load(SERVER_CHART) as loaded, pytest.raises(helm.HelmError) as failure:
        loaded.render({"redis": {"url": "redis://redis:6379/0"}}, name="exploop", namespace="exploop")
    assert "database.url is required" in str(failure.value)


def test_every_ci_scenario_lints_clean():
    for chart in (AGENT_CHART, SERVER_CHART):
        scenarios = sorted((chart / "ci").glob("*-values.yaml"))
        assert scenarios, chart
        for values_file in scenarios:
            report = lint(chart, yaml.safe_load(values_file.read_text()))
            problems = [m for m in report["messages"] if m["severity"] >= 2]
            assert (report["errors"], problems) == ([], []), values_file.name


def test_server_chart_takes_a_sentinel_url_and_region_brokers():
    values = {**SERVER_VALUES,
              "redis": {"url": "sentinel://s0:26379;sentinel://s1:26379", "sentinelMasterName": "main"},
              "config": {"regions": "us-east-1,eu-west-1", "regionBrokers": "eu-west-1=redis://redis-eu:6379/0"}}
    manifests = render(SERVER_CHART, values, release="exploop")
    for name in ("exploop-api", "exploop-controller"):
        env = env_of(manifests[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0])
        assert env["EXPLOOP_SENTINEL_MASTER_NAME"] == "main"
        assert env["EXPLOOP_REGION_BROKERS"] == "eu-west-1=redis://redis-eu:6379/0"
    secret = manifests[("Secret", "exploop")]["data"]["EXPLOOP_REDIS_URL"]
    assert base64.b64decode(secret).decode() == "sentinel://s0:26379;sentinel://s1:26379"
