"""gunicorn settings of ``exploop api``: sized for long-polls and many agents, overridable."""
from __future__ import annotations

from exploop.run.gunicorn import _Gunicorn, gunicorn_options

AGENT_HEARTBEAT = 30  # seconds, the agents' default HEARTBEAT_INTERVAL
POLL_TIMEOUT = 30     # seconds, the agents' default POLL_TIMEOUT
STOP_GRACE = 60       # compose stop_grace_period / Kubernetes terminationGracePeriodSeconds of the API


def test_settings_fit_long_polls_and_many_agents():
    options = gunicorn_options("0.0.0.0", 8080, workers=4, threads=16)
    assert options["worker_class"] == "exploop.run.gunicorn.JsonErrorWorker" and options["threads"] == 16
    assert options["keepalive"] > AGENT_HEARTBEAT  # one connection per agent, reused
    assert options["keepalive"] > 60               # outlives a load balancer's idle timeout
    assert POLL_TIMEOUT < options["graceful_timeout"] < STOP_GRACE
    assert options["timeout"] > POLL_TIMEOUT
    assert options["workers"] * options["worker_connections"] >= 10_000


def test_gunicorn_accepts_every_setting(monkeypatch):
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    server = _Gunicorn(gunicorn_options("127.0.0.1", 8080, workers=2, threads=8))
    assert server.cfg.worker_class_str == "exploop.run.gunicorn.JsonErrorWorker"
    assert (server.cfg.keepalive, server.cfg.graceful_timeout, server.cfg.worker_connections) == (75, 45, 4000)
    assert server.cfg.bind == ["127.0.0.1:8080"]


def test_gunicorn_cmd_args_override(monkeypatch):
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--worker-connections 8000 --forwarded-allow-ips=10.0.0.1 --keep-alive 120")
    server = _Gunicorn(gunicorn_options("127.0.0.1", 8080, workers=2, threads=8))
    assert server.cfg.worker_connections == 8000
    assert server.cfg.keepalive == 120
    assert server.cfg.forwarded_allow_ips == ["10.0.0.1"]
    assert server.cfg.threads == 8  # untouched settings keep exploop's values
