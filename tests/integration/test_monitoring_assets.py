"""Alert rules and the Grafana dashboard, checked by Prometheus' own promtool."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "compose" / "prometheus"
DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "exploop.json"

promtool = pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed (.ci/run installs it)")


def run(*args, cwd=PROM):
    result = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@promtool
def test_alert_rules_are_valid():
    assert "SUCCESS" in run("check", "rules", "alerts.yml")


@promtool
def test_alert_rules_fire_and_stay_silent_as_tested():
    assert "SUCCESS" in run("test", "rules", "alerts_test.yml")


def test_the_runbook_alerts_are_all_there():
    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"PlatformAgentOffline", "PlatformAgentHighLoad", "PlatformAgentHighFailureRate",
            "PlatformAgentLeaseExpiring", "PlatformQueueBacklog", "PlatformAgentHeartbeatSlow",
            "PlatformJobsNotCompleting"} <= set(rules)
    # The runbook's thresholds: heartbeat p99 > 5s, completed rate = 0 for 10m (while jobs wait).
    assert "exploop_agent_heartbeat_latency_seconds_bucket" in rules["PlatformAgentHeartbeatSlow"]["expr"]
    assert rules["PlatformAgentHeartbeatSlow"]["expr"].startswith("histogram_quantile(0.99,")
    assert rules["PlatformAgentHeartbeatSlow"]["expr"].endswith("> 5")
    assert rules["PlatformJobsNotCompleting"]["for"] == "10m"
    # Only agents offline by lease page; disabled and stopped ones have their own status.
    assert 'exploop_agents{status="offline"}' in rules["PlatformAgentsOfflineByLease"]["expr"]
    assert rules["PlatformAgentOffline"]["expr"] == "exploop_agent_status != 1"
    assert rules["PlatformAgentHighFailureRate"]["expr"] == "rate(exploop_agent_jobs_failed_total[5m]) > 0.1"


def _dashboard_exprs():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return titles, exprs


def test_dashboard_has_the_runbook_panels():
    titles, exprs = _dashboard_exprs()
    for wanted in ("Agent Status Overview", "Jobs per Agent", "Queue Depth", "Success Rate",
                   "Latency Distribution", "Resource Usage"):
        assert any(t.startswith(wanted) for t in titles), wanted
    assert any("exploop_queue_depth" in e for e in exprs)


@promtool
def test_every_dashboard_expression_parses(tmp_path):
    _, exprs = _dashboard_exprs()
    # promtool parses PromQL in rule files: wrap each panel query in a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert f"SUCCESS: {len(exprs)} rules found" in run("check", "rules", str(path), cwd=tmp_path)
