"""Schemathesis against a live ``exploop api`` process: every operation of /openapi.json.

Each operation is called with the credential its ``security`` names (agent key,
tenant key, admin token; none for register, health and metrics), with valid
(positive) and invalid (negative) inputs. Every response must be documented and
match its schema, and none may be a server error. Half of the positive cases get
path parameters of real objects (jobs, agents, tokens), so the fuzzer reaches the
code behind the 404s.

The run is bounded: FUZZ_EXAMPLES cases per operation (override with
EXPLOOP_FUZZ_EXAMPLES), no shrinking, no example database, derandomized so CI
runs the same cases every time.
"""
from __future__ import annotations

import os

import hypothesis.strategies as st
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from tests.support.openapi import build_world, openapi_document, start_stack

pytestmark = [pytest.mark.fuzz, pytest.mark.e2e]

FUZZ_EXAMPLES = int(os.environ.get("EXPLOOP_FUZZ_EXAMPLES", "30"))

DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)
# Credentials come from the test (the right one per audience), not from the generator;
# missing and wrong credentials are the isolation matrix's job (test_isolation.py).
# NUL characters are refused (400) before any schema check, since PostgreSQL cannot
# store them: a documented rule (docs/api.md) tested in test_limits.py, not generated here.
schema.config.generation.update(max_examples=FUZZ_EXAMPLES, deterministic=True,
                                with_security_parameters=False, allow_x00=False, database="none")

#: Filled by the ``world`` fixture: the live API and its objects, read by the hooks.
LIVE: dict = {}
#: Requests sent per operation (printed at the end: ``pytest -s tests/e2e/test_fuzz.py``).
CALLS: dict[str, int] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # Schemathesis checks that operations refuse requests without credentials (401); so
    # many failures from one address would soon be answered 429 instead, which
    # test_limits.py covers. Here the limit is out of reach.
    stack = start_stack(tmp_path_factory.mktemp("fuzz"), workers=1, threads=8,
                        EXPLOOP_AUTH_FAILURE_LIMIT="1000000", EXPLOOP_MAX_POLL_TIMEOUT="0.2s")
    try:
        w = build_world(stack)
        # Two of the tenant's jobs running on the fuzz agent, so reports reach real code.
        for job_id in w.jobs[:2]:
            reply = w.post(f"/platform/jobs/{job_id}/claim", w.agent, json={"attempt": 1})
            assert reply.status_code == 200, reply.text
        for i in range(3):
            assert stack.admin("POST", "/admin/v1/agents", json={
                "name": f"spare-{i}", "region": "us-east-1"}).status_code == 201
        stack.bootstrap_token()
        admin_tokens = stack.admin("GET", "/admin/v1/admin-tokens").json()["items"]
        tokens = stack.admin("GET", "/admin/v1/tokens").json()["items"]
        LIVE.update(
            world=w,
            # Real values per path parameter, by path prefix. Never the agents the run
            # itself uses: deleting them would turn every later agent case into a 401.
            pools={"job_id": w.jobs,
                   "name": ["spare-0", "spare-1", "spare-2", "no-such-agent"],
                   "/admin/v1/tokens/": [t["id"] for t in tokens],
                   "/admin/v1/admin-tokens/": [10 ** 6]},
            protected_admin_tokens={str(t["id"]) for t in admin_tokens},
        )
        yield w
        assert stack.api.alive(), "the API process died during the fuzz run"
        print(f"\nfuzz: {sum(CALLS.values())} requests over {len(CALLS)} operations"
              f" (max {max(CALLS.values(), default=0)} for one), {FUZZ_EXAMPLES} examples per operation")
    finally:
        LIVE.clear()
        stack.stop()


@schema.hook
def flatmap_case(context, case):
    """Positive cases: half of them on real objects (negative ones stay as generated)."""
    meta = case.meta
    if not case.path_parameters or meta is None or meta.generation.mode.is_negative or not LIVE:
        return st.just(case)
    pools = {}
    for name in case.path_parameters:
        key = name if name != "token_id" else case.operation.path.rsplit("{", 1)[0]
        pools[name] = LIVE["pools"].get(key)
    if not all(pools.values()):
        return st.just(case)

    def real(values):
        return case.operation.Case(
            path_parameters=dict(case.path_parameters, **values), query=case.query,
            headers=case.headers, cookies=case.cookies, body=case.body, media_type=case.media_type,
            _meta=case._meta)
    chosen = st.fixed_dictionaries({name: st.sampled_from(pool) for name, pool in pools.items()})
    return st.one_of(st.just(case), chosen.map(real))


def _prepare(case) -> None:
    """Adjust a case (generated or one of schemathesis' explicit boundary cases) before sending.

    - A positive job submission names a region with agents and a repository URL the
      API takes: both are checked against live state and configuration, which no
      schema can express, and answered 400 otherwise (test_api.py covers those).
    - The run's own admin tokens are never revoked: that would end its admin access.
    """
    positive = case.meta is None or not case.meta.generation.mode.is_negative
    if case.operation.path == "/api/v1/jobs" and case.operation.method.lower() == "post" and positive \
            and isinstance(case.body, dict):
        case.body = dict(case.body, repo_url="https://git.example.invalid/acme/app.git")
        if "region" in case.body:
            case.body["region"] = "us-east-1"
    if case.operation.path == "/admin/v1/admin-tokens/{token_id}/revoke" \
            and str(case.path_parameters.get("token_id")) in LIVE["protected_admin_tokens"]:
        case.path_parameters = dict(case.path_parameters, token_id=10 ** 6)


def _headers(case) -> dict:
    spec = DOCUMENT["paths"][case.operation.path][case.operation.method.lower()]
    security = spec.get("security") or []
    audience = {"agentKey": "agent", "tenantKey": "tenant", "adminToken": "admin"}.get(
        next(iter(security[0])) if security else None)
    return LIVE["world"].headers(audience)


_session = requests.Session()


@schema.parametrize()
@settings(deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_api_contract(case, world):
    _prepare(case)
    name = f"{case.operation.method.upper()} {case.operation.path}"
    CALLS[name] = CALLS.get(name, 0) + 1
    case.call_and_validate(base_url=world.url, headers=_headers(case), session=_session,
                           timeout=30)


def test_fuzzed_document_is_the_one_served(world):
    """The document fuzzed (rendered by the factory) is the one the live API serves."""
    served = requests.get(world.url + "/openapi.json", timeout=10).json()
    assert served == DOCUMENT
