"""The Lease Manager's own rules, without processes: fencing when its lease runs out, the
disabled hold, lost jobs and the incarnation carried by every renewal."""
from __future__ import annotations

import time

from exploop.client import ApiClientError, ApiConnectionError
from workers.lease_manager import LeaseManager


class ScriptedApi:
    """The API side of ``PUT /platform/lease``: answers from a script, records the bodies."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.answer: Exception | None = None

    def renew_lease(self, body: dict, timeout: float | None = None) -> dict:
        self.bodies.append(body)
        if self.answer is not None:
            raise self.answer
        return {"agent": "agent-a", "desired_state": "active", "lease_ttl": 1}


def manager(api: ScriptedApi, holds: list) -> LeaseManager:
    return LeaseManager(api, 0.3, lambda: {"status": "active"}, lambda state: None, lambda: None,
                        hold=holds.append, incarnation="inc-1")


def test_every_renewal_carries_the_incarnation_and_lost_jobs_until_accepted():
    api, holds = ScriptedApi(), []
    lease = manager(api, holds)
    lease.lost("job1", 2, "worker process died")
    api.answer = ApiConnectionError("http://api", "connection refused")
    assert lease.renew() is False
    api.answer = None
    assert lease.renew() is True
    assert lease.renew() is True
    assert [b.get("lost_jobs") for b in api.bodies] == [
        [{"job_id": "job1", "attempt": 2, "reason": "worker process died"}]] * 2 + [None]
    assert {b["incarnation"] for b in api.bodies} == {"inc-1"}


def test_an_agent_whose_lease_ran_out_fences_itself_until_a_renewal_succeeds(caplog):
    api, holds = ScriptedApi(), []
    lease = manager(api, holds)
    assert lease.renew() and not lease.held
    api.answer = ApiConnectionError("http://api", "connection refused")
    assert lease.renew() is False and not lease.held  # inside its TTL: still its lease
    deadline = time.monotonic() + 5
    while lease.lease_remaining() > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    lease.renew()
    assert lease.fenced and holds == [True]
    assert "lease expired: no renewal" in caplog.text
    api.answer = None
    assert lease.renew() and not lease.held and holds == [True, False]
    assert "lease renewed after it expired" in caplog.text


def test_a_disabled_agent_is_held_without_backoff_until_enabled(caplog):
    api, holds = ScriptedApi(), []
    lease = manager(api, holds)
    api.answer = ApiClientError(403, "agent 'agent-a' is disabled by an admin", {"reason": "disabled"})
    assert lease.renew() is False and lease.renew() is False
    assert lease.disabled and holds == [True] and lease.failures == 0
    assert caplog.text.count("agent disabled by an admin") == 1
    api.answer = None
    assert lease.renew() and holds == [True, False] and not lease.held


def test_a_refused_key_stops_renewing_and_calls_back_once():
    api, refused = ScriptedApi(), []
    lease = LeaseManager(api, 0.3, lambda: {}, lambda state: None, lambda: refused.append(1))
    api.answer = ApiClientError(401, "authentication failed")
    assert lease.renew() is False
    assert lease.auth_failed and refused == [1] and lease._stop.is_set()
