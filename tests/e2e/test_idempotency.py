"""Idempotency-Key under concurrency, against a real API with several gunicorn workers."""
from __future__ import annotations

import threading
import uuid

import pytest
import redis
import requests

from tests.support.openapi import start_stack
from tests.support.stack import auth

pytestmark = pytest.mark.e2e

RETRIES = 20
ROUNDS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("idempotency"), workers=3, threads=8)
    yield s
    s.stop()


def _fire(url: str, headers: dict, body: dict, n: int) -> list:
    """``n`` identical POSTs released together (a client retrying in a storm)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int) -> None:
        session = requests.Session()
        barrier.wait()
        try:
            reply = session.post(url, headers=headers, json=body, timeout=60)
            results[i] = (reply.status_code, reply.json())
        except requests.RequestException as exc:  # pragma: no cover - reported below
            results[i] = (0, repr(exc))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_retries_create_exactly_one_job(stack):
    tenant = stack.tenant("acme")
    body = {"repo_url": "https://git.example.invalid/acme/app.git", "capability": "sast",
            "region": "us-east-1"}
    broker = redis.Redis.from_url(stack.redis_url)
    created = []
    for _ in range(ROUNDS):
        key = str(uuid.uuid4())
        results = _fire(stack.url + "/api/v1/jobs", dict(auth(tenant), **{"Idempotency-Key": key}),
                        body, RETRIES)
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * (RETRIES - 1) + [201], results
        ids = {reply["id"] for _, reply in results}
        assert len(ids) == 1, results
        created.append(ids.pop())
    jobs = stack.admin("GET", "/admin/v1/jobs", params={"tenant": "acme", "per_page": 500}).json()
    assert sorted(j["id"] for j in jobs["items"]) == sorted(created)
    # Published once each: one message per job on the queue.
    assert broker.llen("sast.us-east-1") == ROUNDS
    broker.close()


def test_same_key_from_another_tenant_is_another_job(stack):
    body = {"repo_url": "https://git.example.invalid/app.git", "capability": "sast", "region": "us-east-1"}
    first, second = stack.tenant("one"), stack.tenant("two")
    headers = {"Idempotency-Key": "shared-key"}
    a = requests.post(stack.url + "/api/v1/jobs", headers=dict(auth(first), **headers), json=body, timeout=10)
    b = requests.post(stack.url + "/api/v1/jobs", headers=dict(auth(second), **headers), json=body, timeout=10)
    assert (a.status_code, b.status_code) == (201, 201) and a.json()["id"] != b.json()["id"]


def test_same_key_for_a_different_request_is_409(stack):
    tenant = stack.tenant("three")
    headers = dict(auth(tenant), **{"Idempotency-Key": "reused"})
    body = {"repo_url": "https://git.example.invalid/app.git", "capability": "sast", "region": "us-east-1"}
    first = requests.post(stack.url + "/api/v1/jobs", headers=headers, json=body, timeout=10)
    assert first.status_code == 201
    replay = requests.post(stack.url + "/api/v1/jobs", headers=headers, json=body, timeout=10)
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    other = requests.post(stack.url + "/api/v1/jobs", headers=headers, timeout=10,
                          json=dict(body, capability="secrets"))
    assert other.status_code == 409
    assert other.json()["detail"] == {"reason": "idempotency_key_reused", "job": first.json()["id"]}


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
def test_malformed_keys_are_400(stack, key):
    tenant = stack.tenant(f"bad-{len(key)}-{abs(hash(key)) % 1000}")
    body = {"repo_url": "https://git.example.invalid/app.git", "capability": "sast", "region": "us-east-1"}
    reply = requests.post(stack.url + "/api/v1/jobs", json=body, timeout=10,
                          headers=dict(auth(tenant), **{"Idempotency-Key": key.encode("utf-8")}))
    assert reply.status_code == 400 and "Idempotency-Key" in reply.json()["detail"]
