"""One controller leads at a time (redis-py's Lock on a real Redis); a flush or a
resignation hands leadership over."""
from __future__ import annotations

from exploop.core.controller import LEADER_KEY, Controller


def test_one_leader_at_a_time_and_handover(app, redis_client):
    first, second = Controller(app, interval=1.0), Controller(app, interval=1.0)
    second.identity = first.identity + "-b"  # two processes on one host
    assert first.lead() is True
    assert second.lead() is False
    assert first.lead() is True  # keeps it, and the lock's TTL is pushed out again
    assert 0 < redis_client.pttl(LEADER_KEY) <= 3000
    assert redis_client.get(LEADER_KEY) == first.identity.encode()

    redis_client.flushall()  # the lock is gone: the old leader notices, anyone may take it
    assert first.lead() is False
    assert second.lead() is True
    assert first.lead() is False

    second.resign()
    assert not redis_client.exists(LEADER_KEY)
    assert first.lead() is True
