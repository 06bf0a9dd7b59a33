"""The admin console in a real browser: Playwright driving Debian's Chromium against a real
API process, its own redis-server and real ``exploop-agent`` processes.

Chromium comes from Debian (``apt-get install chromium``; .ci/run installs it): Playwright's
own browser download cannot work on these machines. Set EXPLOOP_CONSOLE_SCREENSHOTS=<dir>
to save a screenshot of every page there (docs/console/ holds the README's).
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from exploop.celery_app import make_celery
from exploop.client import PlatformClient
from tests.support.openapi import start_stack
from tests.support.stack import auth

CHROMIUM = os.environ.get("EXPLOOP_CHROMIUM", "/usr/bin/chromium")
REFRESH_S = 1.0
HOSTILE = '<script>alert("pwned")</script>'
SHOTS = os.environ.get("EXPLOOP_CONSOLE_SCREENSHOTS")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("console"), EXPLOOP_CONSOLE_REFRESH=f"{REFRESH_S}s")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Console:
    """One browser page on the console, recording dialogs and script errors (CSP violations included)."""

    def __init__(self, browser: Browser, url: str):
        self.context = browser.new_context(viewport={"width": 1280, "height": 760})
        self.page: Page = self.context.new_page()
        self.url = url
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.confirm = True
        self.page.on("dialog", self._dialog)
        # Script errors and CSP refusals ("Refused to execute inline script..."); an HTTP status
        # the test asked for (401 on a bad sign-in, 403 on a forged POST) is asserted where it happens.
        self.page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
                     and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.accept() if self.confirm and dialog.type == "confirm" else dialog.dismiss()

    def goto(self, path: str) -> Page:
        self.page.goto(self.url + path)
        return self.page

    def sign_in(self, token: str) -> None:
        self.goto("/ui/login")
        self.page.fill("#token", token)
        self.page.click("#sign-in")
        expect(self.page.locator("h1")).to_have_text("Fleet")

    def post(self, path: str, csrf: bool = True) -> int:
        """A POST from this page's session, as a forged form or script would send it."""
        return self.page.evaluate("""async ([path, csrf]) => {
            const body = new URLSearchParams();
            const field = document.querySelector('input[name=csrf_token]');
            if (csrf && field) body.set('csrf_token', field.value);
            const r = await fetch(path, {method: 'POST', body, credentials: 'same-origin', redirect: 'manual'});
            return r.type === 'opaqueredirect' ? 302 : r.status;
        }""", [path, csrf])

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser, stack):
    c = Console(browser, stack.url)
    yield c
    c.close()


def _viewer_token(stack) -> str:
    reply = stack.admin("POST", "/admin/v1/admin-tokens", json={"name": f"viewer{time.monotonic_ns()}",
                                                                 "role": "viewer"})
    assert reply.status_code == 201, reply.text
    return reply.json()["token"]


def _agent_view(stack, name: str) -> dict:
    return stack.admin("GET", f"/admin/v1/agents/{name}").json()


def _consumed_queues(stack, nodename: str) -> set[str] | None:
    """The queues a real Celery worker consumes, asked over Celery remote control."""
    app = make_celery(stack.redis_url)
    try:
        replies = app.control.inspect(destination=[nodename], timeout=2).active_queues() or {}
    finally:
        app.close()
    return {q["name"] for q in replies[nodename]} if nodename in replies else None


def test_sign_in_and_out(console, stack):
    console.goto("/ui/agents")
    expect(console.page).to_have_url(re.compile(r"/ui/login\?next="))
    console.page.fill("#token", "radmin_not-a-token")
    console.page.click("#sign-in")
    expect(console.page.locator(".notice-error")).to_contain_text("Sign-in failed")
    console.page.fill("#token", stack.admin_token)
    console.page.click("#sign-in")
    expect(console.page).to_have_url(re.compile(r"/ui/agents$"))  # back to the page asked for
    cookie = next(c for c in console.context.cookies() if c["name"] == "exploop_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    console.page.click("#sign-out")
    expect(console.page.locator("h1")).to_have_text("Sign in")
    console.goto("/ui/")
    expect(console.page).to_have_url(re.compile(r"/ui/login"))
    assert console.errors == []


def test_agent_appears_live_and_goes_offline_after_kill_9(console, stack):
    console.sign_in(stack.admin_token)
    page = console.goto("/ui/agents?name=live-")
    page.evaluate("window.__sameDocument = true")
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    agent = stack.start_agent("live-one", EXPLOOP_SIMULATED_SCAN="0.2s")
    row = page.locator('tr[data-agent="live-one"]')
    expect(row).to_have_attribute("data-status", "online", timeout=60_000)
    assert page.evaluate("window.__sameDocument") is True  # no reload: the table refreshed itself
    # The live refresh is one request per interval, to the one fragment URL, whatever the fleet size.
    assert requested and {u.split("?")[0] for u in requested} == {stack.url + "/ui/agents/rows"}
    ttl = _agent_view(stack, "live-one")["lease_ttl"]
    agent.signal(signal.SIGKILL)
    agent.stopped = True
    killed = time.monotonic()
    # Lease TTL plus one refresh, with a margin for a loaded CI machine.
    expect(row).to_have_attribute("data-status", "offline", timeout=(ttl + REFRESH_S + 5) * 1000)
    assert time.monotonic() - killed <= ttl + REFRESH_S + 5
    assert page.evaluate("window.__sameDocument") is True
    assert console.errors == []


def test_drain_and_uncordon_from_the_page_steer_the_real_workers(console, stack):
    tenant = stack.tenant("drainco")
    stack.start_agent("drain-a", EXPLOOP_SIMULATED_SCAN="0.2s")
    stack.start_agent("drain-b", EXPLOOP_SIMULATED_SCAN="0.2s")
    stack.wait_for(lambda: {a["name"] for a in stack.admin("GET", "/admin/v1/agents?status=online").json()["items"]}
                   >= {"drain-a", "drain-b"}, 60, "drain-a and drain-b online")
    node_a = _agent_view(stack, "drain-a")["nodename"]
    stack.wait_for(lambda: _consumed_queues(stack, node_a), 30, "drain-a consuming")
    console.sign_in(stack.admin_token)
    page = console.goto("/ui/agents/drain-a")
    page.click('button[data-action="drain"]')
    assert console.dialogs and console.dialogs[-1].startswith("confirm: Drain drain-a?")
    expect(page.locator("#agent-status")).to_have_text("draining")
    expect(page.locator(".notice-ok")).to_contain_text("draining")
    # The real Celery worker stopped consuming at once (remote control), not at its next lease.
    stack.wait_for(lambda: _consumed_queues(stack, node_a) == set(), 30, "drain-a stops consuming")
    jobs = [stack.submit(tenant) for _ in range(3)]
    for job_id in jobs:
        stack.wait_job(tenant, job_id, ("completed",))
        assert stack.job(job_id)["agent"] == "drain-b"
    page.click('button[data-action="uncordon"]')
    expect(page.locator("#agent-status")).to_have_text("online")
    stack.wait_for(lambda: "secrets.us-east-1" in (_consumed_queues(stack, node_a) or set()), 30,
                   "drain-a consuming again")
    # With drain-b drained (through the page too), the next job can only go to drain-a.
    page = console.goto("/ui/agents/drain-b")
    page.click('button[data-action="drain"]')
    expect(page.locator("#agent-status")).to_have_text("draining")
    job_id = stack.submit(tenant)
    stack.wait_job(tenant, job_id, ("completed",))
    assert stack.job(job_id)["agent"] == "drain-a"
    page = console.goto(f"/ui/jobs/{job_id}")
    expect(page.locator("#attempts li")).to_have_count(1)
    expect(page.locator("#attempts li")).to_contain_text("drain-a")
    expect(page.locator("#attempts li")).to_contain_text("completed")
    console.shot("job")
    stack.admin("POST", "/admin/v1/agents/drain-b/uncordon")
    assert console.errors == []


def test_disable_and_enable_from_the_pages_steer_the_real_workers(console, stack):
    # A region of their own: the other tests' agents (us-east-1) never take these jobs.
    tenant = stack.tenant("disableco")
    for name in ("dis-a", "dis-b"):
        stack.start_agent(name, REGION="ap-south-1", CAPABILITIES="secrets", EXPLOOP_SIMULATED_SCAN="0.2s")
    stack.wait_for(lambda: {a["name"] for a in stack.admin("GET", "/admin/v1/agents?status=online").json()["items"]}
                   >= {"dis-a", "dis-b"}, 60, "dis-a and dis-b online")
    node_a = _agent_view(stack, "dis-a")["nodename"]
    stack.wait_for(lambda: _consumed_queues(stack, node_a), 30, "dis-a consuming")
    console.sign_in(stack.admin_token)
    # Disable from the Agents table.
    page = console.goto("/ui/agents?region=ap-south-1")
    row = page.locator('tr[data-agent="dis-a"]')
    expect(row.locator('button[data-action="enable"]')).to_have_count(0)
    row.locator('button[data-action="disable"]').click()
    assert console.dialogs and console.dialogs[-1].startswith("confirm: Disable dis-a? It is switched off at once")
    expect(page.locator(".notice-ok")).to_contain_text("Agent dis-a disabled")
    row = page.locator('tr[data-agent="dis-a"]')
    expect(row).to_have_attribute("data-status", "disabled")
    expect(row.locator('button[data-action="enable"]')).to_have_count(1)
    expect(row.locator('button[data-action="disable"]')).to_have_count(0)
    # The real Celery worker stopped consuming at once (remote control) and stays held: its
    # renewals are refused while it is disabled.
    stack.wait_for(lambda: _consumed_queues(stack, node_a) == set(), 30, "dis-a stops consuming")
    jobs = [stack.submit(tenant, region="ap-south-1") for _ in range(3)]
    for job_id in jobs:
        stack.wait_job(tenant, job_id, ("completed",))
        assert stack.job(job_id)["agent"] == "dis-b"
    assert _agent_view(stack, "dis-a")["status"] == "disabled"
    # The Agent page says so, and enables it again.
    page = console.goto("/ui/agents/dis-a")
    expect(page.locator("#agent-status")).to_have_text("disabled")
    expect(page.locator("#disabled-note")).to_be_visible()
    console.shot("agent-disabled")
    page.click('button[data-action="enable"]')
    assert console.dialogs[-1].startswith("confirm: Enable dis-a?")
    expect(page.locator(".notice-ok")).to_contain_text("Agent dis-a enabled")
    # Online from its next lease renewal, shown by the live panel without a reload.
    expect(page.locator("#agent-status")).to_have_text("online", timeout=30_000)
    expect(page.locator('button[data-action="disable"]')).to_have_count(1)
    stack.wait_for(lambda: "secrets.ap-south-1" in (_consumed_queues(stack, node_a) or set()), 30,
                   "dis-a consuming again")
    # With dis-b disabled (from its page too), the next job can only go to dis-a.
    page = console.goto("/ui/agents/dis-b")
    page.click('button[data-action="disable"]')
    expect(page.locator("#agent-status")).to_have_text("disabled")
    job_id = stack.submit(tenant, region="ap-south-1")
    stack.wait_job(tenant, job_id, ("completed",))
    assert stack.job(job_id)["agent"] == "dis-a"
    audit = stack.admin("GET", "/admin/v1/audit", params={"target": "dis-a"}).json()["items"]
    assert {(e["actor"], e["action"]) for e in audit} >= {("tests", "disable agent"), ("tests", "enable agent")}
    stack.admin("POST", "/admin/v1/agents/dis-b/enable")
    assert console.errors == []


def test_viewer_sees_no_action_and_a_forged_post_is_refused(console, stack):
    stack.admin("POST", "/admin/v1/agents", json={"name": "view-target", "region": "us-east-1",
                                                  "capabilities": ["sast"]})
    console.sign_in(_viewer_token(stack))
    for path in ("/ui/agents?name=view-target", "/ui/agents/view-target", "/ui/tokens"):
        page = console.goto(path)
        expect(page.locator("h1")).to_be_visible()
        expect(page.locator("button[data-action]")).to_have_count(0)
        expect(page.locator("#create-token")).to_have_count(0)
    assert console.post("/ui/agents/view-target/drain") == 403
    assert console.post("/ui/agents/view-target/disable") == 403
    view = _agent_view(stack, "view-target")
    assert view["desired_state"] == "active" and view["status"] != "disabled"
    # A disabled agent: shown as such, and still no button (no enable either); a forged enable is refused.
    stack.admin("POST", "/admin/v1/agents", json={"name": "view-disabled", "region": "us-east-1",
                                                  "capabilities": ["sast"]})
    assert stack.admin("POST", "/admin/v1/agents/view-disabled/disable").status_code == 200
    page = console.goto("/ui/agents/view-disabled")
    expect(page.locator("#agent-status")).to_have_text("disabled")
    expect(page.locator("button[data-action]")).to_have_count(0)
    assert console.post("/ui/agents/view-disabled/enable") == 403
    assert _agent_view(stack, "view-disabled")["status"] == "disabled"
    audit = stack.admin("GET", "/admin/v1/audit?action=permission denied").json()["items"]
    assert {"POST /ui/agents/view-target/drain", "POST /ui/agents/view-target/disable",
            "POST /ui/agents/view-disabled/enable"} <= {e["target"] for e in audit}


def test_a_post_without_csrf_token_is_refused(console, stack):
    stack.admin("POST", "/admin/v1/agents", json={"name": "csrf-target", "region": "us-east-1",
                                                  "capabilities": ["sast"]})
    console.sign_in(stack.admin_token)
    console.goto("/ui/agents/csrf-target")
    assert console.post("/ui/agents/csrf-target/drain", csrf=False) == 403
    assert _agent_view(stack, "csrf-target")["desired_state"] == "active"
    assert console.post("/ui/agents/csrf-target/drain", csrf=True) == 302  # the same POST with the token works
    assert _agent_view(stack, "csrf-target")["desired_state"] == "draining"


def test_hostile_agent_and_job_values_render_as_text(console, stack):
    # Agent names are validated at registration (no '<'); what an agent reports about itself is not.
    refused = requests.post(f"{stack.url}/platform/register", timeout=10, json={
        "token": stack.bootstrap_token(), "name": HOSTILE, "region": "us-east-1", "capabilities": ["sast"]})
    assert refused.status_code == 400
    reply = stack.admin("POST", "/admin/v1/agents", json={"name": "hostile-agent", "region": "eu-west-1",
                                                          "capabilities": ["sast"]})
    key = reply.json()["api_key"]
    agent = PlatformClient(stack.url, key)
    agent.renew_lease({"jobs_running": 0, "running_jobs": [], "version": "<b>1</b>", "host": HOSTILE,
                       "heartbeat_interval": 30})
    tenant = stack.tenant("hostileco")
    job = requests.post(f"{stack.url}/api/v1/jobs", headers=auth(tenant), timeout=10, json={
        "repo_url": f"https://user:s3cr3t@git.example.com/{HOSTILE}.git", "capability": "sast",
        "region": "eu-west-1"}).json()
    claimed = agent.claim(job["id"], 1)
    agent.fail(job["id"], 1, claimed["job_token"], error=HOSTILE)
    console.sign_in(stack.admin_token)
    for path in ("/ui/agents?name=hostile", "/ui/agents/hostile-agent", "/ui/jobs?tenant=hostileco",
                 f"/ui/jobs/{job['id']}", "/ui/audit"):
        page = console.goto(path)
        expect(page.locator("h1")).to_be_visible()
        if page.locator("[data-live]").count():  # let one live refresh land too
            expect(page.locator("[data-live][data-refreshed-at]")).to_have_count(1)
        assert "s3cr3t" not in page.content()
    page = console.goto(f"/ui/jobs/{job['id']}")
    expect(page.locator("#job-error")).to_have_text(HOSTILE)
    expect(page.locator("#attempts .reason")).to_have_text(HOSTILE)
    page = console.goto("/ui/agents/hostile-agent")
    expect(page.locator("text=" + HOSTILE).first).to_be_visible()
    assert console.dialogs == [] and console.errors == []


def test_a_token_created_in_the_page_registers_one_agent(console, stack):
    console.sign_in(stack.admin_token)
    page = console.goto("/ui/tokens")
    page.fill('input[name="description"]', "console test")
    page.check('input[name="capabilities"][value="secrets"]')
    page.check('input[name="capabilities"][value="sast"]')
    page.check('input[name="capabilities"][value="sca"]')
    page.click("#create-token-button")
    value = page.locator("#new-token").inner_text()
    console.shot("tokens")
    page = console.goto("/ui/tokens")
    assert value not in page.content()  # shown once
    stack.start_agent("from-console", BOOTSTRAP_TOKEN=value, EXPLOOP_SIMULATED_SCAN="0.2s")
    stack.wait_agent_online("from-console", timeout=60)
    again = requests.post(f"{stack.url}/platform/register", timeout=10, json={
        "token": value, "region": "us-east-1", "capabilities": ["secrets"]})
    assert again.status_code == 401 and "used" in again.json()["error"]
    page = console.goto("/ui/tokens")
    row = page.locator(f'tr[data-token="{value[:12]}"]')
    expect(row).to_contain_text("1/1")
    expect(row).to_contain_text("used")
    page = console.goto("/ui/agents/from-console")
    expect(page.locator("text=console test")).to_be_visible()
    assert console.errors == []


def test_every_page_renders_without_script_errors(console, stack):
    """Every page loads its script and style under the CSP with no error (and is screenshotted)."""
    stack.admin("POST", "/admin/v1/agents", json={"name": "shown-agent", "region": "us-east-1",
                                                  "capabilities": ["sast", "secrets"]})  # 409 if there: fine
    shown = next(a["name"] for a in stack.admin("GET", "/admin/v1/agents?status=online").json()["items"]
                 + [{"name": "shown-agent"}])
    console.sign_in(stack.admin_token)
    for name, path in (("fleet", "/ui/"), ("agents", "/ui/agents"), ("agent", f"/ui/agents/{shown}"),
                       ("jobs", "/ui/jobs"), ("tenants", "/ui/tenants"), ("audit", "/ui/audit")):
        page = console.goto(path)
        expect(page.locator("h1")).to_be_visible()
        assert page.evaluate("getComputedStyle(document.querySelector('.top')).display") == "flex", path
        console.shot(name)
    console.page.click("#sign-out")
    console.shot("login")
    assert console.errors == [] and console.dialogs == []
