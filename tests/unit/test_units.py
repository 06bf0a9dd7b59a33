"""Pure logic: durations, agent settings, routing, credentials."""
from __future__ import annotations

import pytest

from exploop.config import AgentSettings, ConfigError, format_duration, parse_duration
from exploop.core.security import AGENT_PREFIX, hash_token, matches, new_token
from exploop.redaction import redact_url
from exploop.routing import RUN_SCAN, queue_for, queues_for, route_task
from workers.scanners.secrets import mask


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 604800),
                                          ("250ms", 0.25), ("45", 45), (" 2m ", 120), (1.5, 1.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "-1s", "0s", "1h30m", "s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError) as err:
        parse_duration(text, "HEARTBEAT_INTERVAL")
    assert "HEARTBEAT_INTERVAL" in str(err.value)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (12, "12s"), (59, "59s"), (60, "1m"),
                                          (3599, "59m"), (7200, "2h"), (90000, "1d")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_agent_settings_defaults():
    s = AgentSettings.from_env({"API_URL": "https://api.exploop.io/", "API_KEY": "ragent_x"})
    assert s.api_url == "https://api.exploop.io"
    assert s.heartbeat_interval == 30 and s.poll_timeout == 30
    assert s.capabilities is None and s.max_concurrent_jobs is None and s.log_level == "INFO"


def test_agent_settings_all_variables():
    s = AgentSettings.from_env({"API_URL": "http://x:8080", "BOOTSTRAP_TOKEN": "rboot_t",
                                "REGION": "eu-west-1", "CAPABILITIES": "sast, secrets",
                                "MAX_CONCURRENT_JOBS": "10", "LOG_LEVEL": "warn",
                                "HEARTBEAT_INTERVAL": "10s", "POLL_TIMEOUT": "1m"})
    assert (s.region, s.capabilities, s.max_concurrent_jobs) == ("eu-west-1", ("sast", "secrets"), 10)
    assert (s.log_level, s.heartbeat_interval, s.poll_timeout) == ("WARNING", 10, 60)


@pytest.mark.parametrize("env,variable", [
    ({}, "API_URL"),
    ({"API_URL": "ftp://x"}, "API_URL"),
    ({"API_URL": "http://x", "API_KEY": "secret"}, "API_KEY"),
    ({"API_URL": "http://x", "CAPABILITIES": "sast,dast"}, "CAPABILITIES"),
    ({"API_URL": "http://x", "MAX_CONCURRENT_JOBS": "0"}, "MAX_CONCURRENT_JOBS"),
    ({"API_URL": "http://x", "MAX_CONCURRENT_JOBS": "five"}, "MAX_CONCURRENT_JOBS"),
    ({"API_URL": "http://x", "HEARTBEAT_INTERVAL": "soon"}, "HEARTBEAT_INTERVAL"),
    ({"API_URL": "http://x", "POLL_TIMEOUT": "-5s"}, "POLL_TIMEOUT"),
    ({"API_URL": "http://x", "LOG_LEVEL": "loud"}, "LOG_LEVEL"),
    ({"API_URL": "http://x", "REGION": "US East"}, "REGION"),
])
def test_agent_settings_name_the_bad_variable(env, variable):
    with pytest.raises(ConfigError) as err:
        AgentSettings.from_env(env)
    assert str(err.value).startswith(variable + ":")


def test_queue_names():
    assert queue_for("sast", "us-east-1") == "sast.us-east-1"
    assert queues_for(["secrets", "sca"], "eu-west-1") == ["secrets.eu-west-1", "sca.eu-west-1"]
    with pytest.raises(ValueError):
        queue_for("dast", "us-east-1")
    with pytest.raises(ValueError):
        queue_for("sast", "")


def test_router_sends_scans_to_their_queue():
    kwargs = {"job_id": "j", "attempt": 1, "capability": "secrets", "region": "us-east-1"}
    assert route_task(RUN_SCAN, [], kwargs, {}) == {"queue": "secrets.us-east-1"}
    assert route_task("other.task", [], {}, {}) is None


def test_tokens_are_prefixed_random_and_hashed():
    a, b = new_token(AGENT_PREFIX), new_token(AGENT_PREFIX)
    assert a.startswith("ragent_") and a != b and len(a) > 40
    assert matches(a, hash_token(a)) and not matches(b, hash_token(a))
    assert a not in hash_token(a)


def test_mask_keeps_only_a_short_prefix():
    assert mask("AKIAIOSFODNN7EXAMPLE") == "AKIA" + "*" * 16
    assert mask("abc") == "****"


def test_json_log_lines_carry_the_message_and_its_fields():
    import json
    import logging

    from exploop.logs import JsonFormatter
    record = logging.LogRecord("exploop.agent", logging.INFO, __file__, 1,
                               "job completed job_id=%s attempt=%s agent=%s findings=%d",
                               ("abc123", 2, "agent-us-east-1", 3), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job completed job_id=abc123 attempt=2 agent=agent-us-east-1 findings=3"
    assert (line["job_id"], line["agent"], line["level"]) == ("abc123", "agent-us-east-1", "info")


def test_parse_size():
    from exploop.config import parse_size
    assert parse_size("4g") == 4 * 1024 ** 3 and parse_size("512Mi") == 512 * 1024 ** 2
    for bad in ("", "x", "-1g", "4q"):
        with pytest.raises(ConfigError):
            parse_size(bad, "MEMORY_LIMIT")


def test_redact_url_hides_userinfo_only():
    assert redact_url("https://user:tok@git.example.com/a/b.git") == "https://***@git.example.com/a/b.git"
    assert redact_url("ssh://git@host/x") == "ssh://***@host/x"
    assert redact_url("https://host/a@b") == "https://host/a@b"


def test_backoff_grows_is_capped_and_jitter_only_shortens():
    from exploop.retry import backoff
    for attempt, full in ((0, 0.5), (1, 1.0), (3, 4.0), (10, 15.0), (10_000, 15.0)):
        delays = [backoff(attempt) for _ in range(200)]
        assert all(0.8 * full <= d <= full for d in delays), (attempt, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered: a fleet does not retry in lock step
    assert backoff(5, base=1, cap=3, jitter=0) == 3
    assert backoff(-1, base=2, jitter=0) == 2
