"""The scan task: claim, check out, scan, report. Thin: the logic lives in scanners/.

Messages carry (job id, attempt). The claim succeeds only for the current
attempt of a queued job, so a redelivered or duplicate message is skipped here.
"""
from __future__ import annotations

import json
import logging
import os
import time

from celery import Celery
from celery.exceptions import Reject
from celery.worker.request import Request

from exploop.client import ApiClientError, ApiConnectionError, PlatformClient
from exploop.config import ScannerSettings
from exploop.destinations import DestinationPolicy
from exploop.routing import RUN_SCAN

from .workspace import JobError, Workspace

logger = logging.getLogger("exploop.agent")

__all__ = ["register_tasks", "SCANNERS"]

#: Capability -> scanner module run in its own process.
SCANNERS = {
    "sast": "workers.scanners.sast",
    "sca": "workers.scanners.sca",
    "secrets": "workers.scanners.secrets",
}
#: Capabilities whose scanner reads every commit (the others get a shallow clone).
NEEDS_HISTORY = {"secrets"}
#: What the API keeps of a finding (FindingIn); scanners may add detail for their own use.
_FINDING_FIELDS = ("rule_id", "severity", "confidence", "path", "start_line", "end_line", "message",
                   "engine", "cwe", "fingerprint", "secret_hash", "preview", "commit")
MAX_FINDINGS = 100_000  # CompleteIn's limit
MAX_REPORT_BYTES = 15 * 1024 * 1024  # under the API's 16 MiB MAX_CONTENT_LENGTH, with room for the summary

_clients: dict[int, PlatformClient] = {}
_settings: list[ScannerSettings] = []  # the agent's scanner settings, read once at start


def _client(runtime) -> PlatformClient:
    """One HTTP session per process (prefork children must not share the parent's)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients.clear()
        _clients[pid] = PlatformClient(runtime.api_url, runtime.api_key, timeout=15)
    return _clients[pid]


class OutcomeRequest(Request):
    """Counts each job's outcome in the main process as the pool hands back the result,
    so counts made in prefork children are never lost.

    Celery's generated request class replaces ``on_success`` without calling up, but
    it reports every success through ``send_event("task-succeeded", result=...)``.
    """

    def send_event(self, type, **fields):
        if type == "task-succeeded":
            metrics = getattr(self.task.app.exploop_runtime, "metrics", None)
            if metrics is not None:
                # The result arrives as its repr ("'completed'").
                metrics.record_outcome(str(fields.get("result")).strip("'\""))
        return super().send_event(type, **fields)


def register_tasks(app: Celery) -> None:
    """Register the scan task on the agent's Celery app."""
    # Read at start so a bad SCANNER_MEMORY_LIMIT or REPO_SIZE_LIMIT stops the agent at once.
    _settings.append(ScannerSettings.from_env())

    @app.task(name=RUN_SCAN, bind=True, acks_late=True, Request=OutcomeRequest)
    def run_scan(self, job_id: str, attempt: int, capability: str, region: str):
        runtime = app.exploop_runtime
        client = _client(runtime)
        fields = f"job_id={job_id} attempt={attempt} agent={runtime.name}"
        try:
            spec = client.claim(job_id, attempt)
        except ApiConnectionError as exc:
            # Put the message back for later (or for another agent) instead of losing it.
            logger.error("failed to connect to API while claiming %s: %s", fields, exc.message)
            time.sleep(2)
            raise Reject(str(exc), requeue=True) from None
        except ApiClientError as exc:
            if exc.status == 409 and isinstance(exc.detail, dict) and exc.detail.get("reason") == "draining":
                logger.info("agent draining, returning job to queue %s", fields)
                raise Reject("agent draining", requeue=True) from None
            if exc.status == 401:
                logger.error("authentication failed %s", fields)
                raise Reject("authentication failed", requeue=True) from None
            if exc.status >= 500:
                logger.error("API error while claiming %s: %s", fields, exc.message)
                time.sleep(2)
                raise Reject(exc.message, requeue=True) from None
            logger.info("skipping stale or duplicate delivery %s: %s", fields, exc.message)
            return "skipped"
        return _run(runtime, client, spec, fields)


class JobCancelled(Exception):
    """The job was cancelled while this agent ran it: stop and report nothing."""


def _run(runtime, client: PlatformClient, spec: dict, fields: str) -> str:
    job_id, attempt, token = spec["id"], spec["attempt"], spec["job_token"]
    started = time.monotonic()
    try:
        if runtime.simulated_scan_seconds is not None:  # benchmarks and fleet tests only
            _simulate(client, spec, runtime.simulated_scan_seconds)
            findings, summary = [], {"engines": [], "simulated": True}
        else:
            findings, summary = _scan(client, spec, started + spec["time_limit"])
    except JobCancelled:
        logger.info("job cancelled, stopped %s", fields)
        return "cancelled"
    except JobError as exc:
        if exc.retry:
            logger.warning("job timeout, will retry %s: %s", fields, exc)
        else:
            logger.error("job failed %s: %s", fields, exc)
        _report(lambda: client.fail(job_id, attempt, token, str(exc), retry=exc.retry), fields)
        return "failed"
    except Exception as exc:  # a scanner bug must fail the job, not the agent
        logger.exception("job crashed %s", fields)
        _report(lambda: client.fail(job_id, attempt, token, f"agent error: {exc.__class__.__name__}: {exc}",
                                    retry=True), fields)
        return "failed"
    summary["duration_seconds"] = round(time.monotonic() - started, 3)
    _report(lambda: client.complete(job_id, attempt, token, findings, summary), fields)
    logger.info("job completed %s findings=%d", fields, len(findings))
    return "completed"


def _scanner_args(capability: str, settings: ScannerSettings) -> list[str]:
    """Command-line options of a capability's scanner, from the agent's settings."""
    if capability == "sca":
        if settings.osv_db_dir is None:
            raise JobError("OSV database not configured on this agent: set OSV_DB_DIR and run "
                           "`exploop-agent osv-sync` (no package was checked)")
        return ["--osv-db", str(settings.osv_db_dir)]
    if capability == "sast" and settings.semgrep_bin:
        return ["--semgrep", settings.semgrep_bin]
    return []


def _scan(client: PlatformClient, spec: dict, deadline: float) -> tuple[list, dict]:
    settings = _settings[-1] if _settings else ScannerSettings.from_env()
    capability = spec["capability"]
    module = SCANNERS.get(capability)
    if module is None:
        raise JobError(f"capability {capability!r} has no scanner on this agent")
    args = _scanner_args(capability, settings)
    started = time.monotonic()

    def still_wanted() -> None:
        """Report progress while git or a scanner runs; raises JobCancelled if cancelled."""
        _progress(client, spec, min(89, 30 + int(time.monotonic() - started)), "scanning")

    with Workspace(spec["id"], deadline, memory_limit=settings.memory_limit,
                   size_limit=settings.repo_size_limit, check=still_wanted) as workspace:
        commit = workspace.checkout(spec["repo_url"], spec["ref"], history=capability in NEEDS_HISTORY,
                                    destinations=DestinationPolicy.from_dict(spec.get("destinations")))
        _progress(client, spec, 30, f"checked out {commit[:12]}")
        result = workspace.run_scanner(module, *args)
        _progress(client, spec, 90, "scan finished")
    findings = [{k: f[k] for k in _FINDING_FIELDS if f.get(k) is not None} for f in result["findings"]]
    for finding in findings:
        finding.setdefault("commit", commit)
    # The API stores at most MAX_FINDINGS per job in a request of at most 16 MiB: say so
    # instead of sending a report it would refuse (the job would hang as "running").
    if len(findings) > MAX_FINDINGS:
        raise JobError(f"scanner {capability} reported {len(findings)} findings; a job stores at most "
                       f"{MAX_FINDINGS}")
    size = len(json.dumps(findings))
    if size > MAX_REPORT_BYTES:
        raise JobError(f"scanner {capability} findings are {size / 1048576:.1f} MiB; a job report holds "
                       f"at most {MAX_REPORT_BYTES / 1048576:.0f} MiB")
    summary = dict(result.get("summary") or {}, commit=commit, engines=result["engines"])
    return findings, summary


def _simulate(client: PlatformClient, spec: dict, seconds: float) -> None:
    """A simulated scan: sleep, reporting progress (and noticing a cancel) every second."""
    deadline = time.monotonic() + seconds
    next_report = time.monotonic() + 1
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.25))
        if time.monotonic() >= next_report and time.monotonic() < deadline:
            _progress(client, spec, int(100 * (1 - left / seconds)), "simulated scan")
            next_report += 1


def _progress(client: PlatformClient, spec: dict, percent: int, message: str) -> None:
    try:
        client.progress(spec["id"], spec["attempt"], spec["job_token"], percent, message)
    except ApiClientError as exc:  # progress is advisory; the result is what matters
        if exc.status == 409 and isinstance(exc.detail, dict) and exc.detail.get("status") == "cancelled":
            raise JobCancelled() from None
        logger.warning("progress report failed job_id=%s: %s", spec["id"], exc.message)


#: How long an agent keeps trying to deliver a result while the API is unreachable or
#: failing (an API restart, a deploy). Giving up early would strand the job as running.
REPORT_PATIENCE = 15 * 60


def _report(call, fields: str, patience: float = REPORT_PATIENCE) -> None:
    """Send the result, retrying with capped backoff while the API is down or erroring."""
    deadline = time.monotonic() + patience
    n = 0
    while True:
        try:
            call()
            return
        except ApiClientError as exc:
            if not isinstance(exc, ApiConnectionError) and exc.status < 500:
                logger.error("result refused %s: %s", fields, exc.message)
                return
            reason = "failed to connect to API" if isinstance(exc, ApiConnectionError) else "API error"
            if time.monotonic() > deadline:
                logger.error("giving up reporting %s after %ds (%s); the controller's timeout will"
                             " requeue it", fields, patience, exc.message)
                return
            logger.error("%s reporting %s: %s; retrying", reason, fields, exc.message)
            time.sleep(min(2 ** n, 10))
            n += 1
