"""The scan task: claim, check out, scan, report. Thin: the logic lives in scanners/.

Messages carry (job id, attempt). The claim succeeds only for the current
attempt of a queued job, so a redelivered or duplicate message is skipped here.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from billiard.einfo import ExceptionWithTraceback
from celery import Celery
from celery.exceptions import Reject, WorkerLostError
from celery.worker.request import Request

from exploop.client import ApiClientError, ApiConnectionError, PlatformClient
from exploop.config import ScannerSettings
from exploop.destinations import DestinationPolicy
from exploop.retry import backoff
from exploop.routing import RUN_SCAN

from .lease_manager import KEY_REFUSED_SIGNAL
from .mirror import MirrorCache
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
_mirrors: dict[str, MirrorCache] = {}  # the cache of repository mirrors, by directory


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

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        """A pool child that died mid-job (WorkerLostError, kill -9, OOM killer): tell the API
        at once, through the Lease Manager, so the job is requeued now rather than at its time
        limit. The message is acknowledged (``reject_on_worker_lost=False``): the requeue
        publishes the next attempt, and a redelivered copy would only race it."""
        exc = exc_info.exception
        exc = exc.exc if isinstance(exc, ExceptionWithTraceback) else exc
        runtime = getattr(self.task.app, "exploop_runtime", None)
        manager = getattr(runtime, "lease_manager", None)
        kwargs = self.kwargs or {}
        if isinstance(exc, (WorkerLostError, SystemExit)) and runtime is not None and manager is not None \
                and kwargs.get("job_id"):
            logger.error("job lost: its worker process died job_id=%s attempt=%s agent=%s (%s); asking"
                         " the API to requeue it", kwargs["job_id"], kwargs.get("attempt"), runtime.name, exc)
            manager.lost(kwargs["job_id"], int(kwargs.get("attempt") or 0), f"worker process died: {exc}")
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def register_tasks(app: Celery) -> None:
    """Register the scan task on the agent's Celery app."""
    @app.task(name=RUN_SCAN, bind=True, acks_late=True, reject_on_worker_lost=False, Request=OutcomeRequest)
    def run_scan(self, job_id: str, attempt: int, capability: str, region: str):
        runtime = app.exploop_runtime
        client = _client(runtime)
        fields = f"job_id={job_id} attempt={attempt} agent={runtime.name}"
        try:
            spec = client.claim(job_id, attempt, incarnation=runtime.incarnation)
        except ApiConnectionError as exc:
            # Put the message back for later (or for another agent) instead of losing it.
            logger.error("failed to connect to API while claiming %s: %s", fields, exc.message)
            time.sleep(2)
            raise Reject(str(exc), requeue=True) from None
        except ApiClientError as exc:
            reason = exc.detail_field("reason")
            if exc.status in (403, 409) and reason in ("draining", "disabled"):
                logger.info("agent %s, returning job to queue %s", reason, fields)
                raise Reject(f"agent {reason}", requeue=True) from None
            if exc.status == 401:
                key_refused(runtime)
                raise Reject("authentication failed", requeue=True) from None
            if exc.status >= 500:
                logger.error("API error while claiming %s: %s", fields, exc.message)
                time.sleep(2)
                raise Reject(exc.message, requeue=True) from None
            logger.info("skipping stale or duplicate delivery %s: %s", fields, exc.message)
            return "skipped"
        return _run(runtime, client, spec, fields)


def key_refused(runtime) -> None:
    """The API refused this agent's key (deleted): log one line and stop the agent now, killing
    its scans, instead of finishing work whose result would be refused."""
    if os.getpid() != runtime.main_pid:
        # A prefork child: the main process logs the line and shuts down cold (bootsteps).
        os.kill(runtime.main_pid, KEY_REFUSED_SIGNAL)
    elif runtime.lease_manager is not None:
        runtime.lease_manager.on_auth_failure()


class JobCancelled(Exception):
    """The job was cancelled, or is no longer this agent's: stop and report nothing."""


def _run(runtime, client: PlatformClient, spec: dict, fields: str) -> str:
    job_id, attempt, token = spec["id"], spec["attempt"], spec["job_token"]
    started = time.monotonic()
    final = attempt >= int(spec.get("max_attempts") or attempt + 1)
    logger.info("job started %s", fields)
    try:
        if runtime.simulated_scan_seconds is not None:  # benchmarks and fleet tests only
            _simulate(client, spec, runtime.simulated_scan_seconds, runtime)
            findings: list[dict] = []
            summary: dict = {"engines": [], "simulated": True}
            incomplete: list | None = None
        else:
            findings, summary, incomplete = _scan(client, spec, started + spec["time_limit"],
                                                  runtime.scanner_settings, runtime)
    except JobCancelled as exc:
        if str(exc) == "cancelled":
            logger.info("job cancelled, stopped %s", fields)
        else:
            logger.info("job stopped %s: %s", fields, exc)
        return "cancelled"
    except JobError as exc:
        if exc.retry and not final:
            logger.warning("job timeout, will retry %s: %s", fields, exc)
        else:
            # The runbook's line for the last attempt: the API fails the job for good.
            logger.error("job failed permanently %s: %s", fields, exc)
        # Bound now (the name `exc` ends with the except block); no agent paths for the tenant.
        message, retry = tenant_safe(str(exc), runtime.scanner_settings), exc.retry
        _report(lambda: client.fail(job_id, attempt, token, message, retry=retry), fields, runtime)
        return "failed"
    except Exception as exc:  # a scanner bug must fail the job, not the agent
        logger.exception("job crashed %s", fields)
        message = tenant_safe(f"agent error: {exc.__class__.__name__}: {exc}", runtime.scanner_settings)
        _report(lambda: client.fail(job_id, attempt, token, message, retry=True), fields, runtime)
        return "failed"
    summary["duration_seconds"] = round(time.monotonic() - started, 3)
    if not _report(lambda: client.complete(job_id, attempt, token, findings, summary, incomplete), fields, runtime):
        return "failed"
    logger.info("job completed %s findings=%d%s", fields, len(findings),
                f" incomplete={len(incomplete)}" if incomplete else "")
    return "completed"


def tenant_safe(message: str, settings: ScannerSettings) -> str:
    """An error as the tenant may see it: the agent's own file system paths (workspace,
    OSV database, home, installation) replaced, a path inside the checkout made relative."""
    # <tmp>/exploop-<job>-xxxx/repo/app.py -> app.py; the workspace itself -> <workspace>
    message = re.sub(r"(?:/[^\s'\"/:]+)*/exploop-[^\s'\"/:]+/repo/", "", message)
    message = re.sub(r"(?:/[^\s'\"/:]+)*/exploop-[^\s'\"/:]+", "<workspace>", message)
    places = [(settings.osv_db_dir, "<OSV_DB_DIR>"), (Path(__file__).resolve().parent.parent, "<agent>"),
              (Path(sys.prefix), "<agent>"), (Path(tempfile.gettempdir()), "<tmp>"),
              (Path.home(), "<agent home>")]
    for place, label in sorted(((str(p), label) for p, label in places if p and str(p) not in ("/", ".")),
                               key=lambda item: -len(item[0])):
        # Only a path that starts there: "src/tmp/x" in a tenant's file name stays as it is.
        message = re.sub(r"(?<![\w./-])" + re.escape(place) + r"(?![\w.-])", label, message)
    return message


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


def _scan(client: PlatformClient, spec: dict, deadline: float, settings: ScannerSettings,
          runtime=None) -> tuple[list, dict, list | None]:
    capability = spec["capability"]
    module = SCANNERS.get(capability)
    if module is None:
        raise JobError(f"capability {capability!r} has no scanner on this agent")
    args = _scanner_args(capability, settings)
    started = time.monotonic()

    def still_wanted() -> None:
        """Report progress while git or a scanner runs; raises JobCancelled if cancelled."""
        _progress(client, spec, min(89, 30 + int(time.monotonic() - started)), "scanning", runtime)

    base_dir = getattr(runtime, "workspace_dir", None)
    with Workspace(spec["id"], deadline, base_dir=str(base_dir) if base_dir else None,
                   memory_limit=settings.memory_limit,
                   size_limit=settings.repo_size_limit, check=still_wanted,
                   mirrors=_mirror_cache(settings)) as workspace:
        commit = workspace.checkout(spec["repo_url"], spec["ref"], history=capability in NEEDS_HISTORY,
                                    destinations=DestinationPolicy.from_dict(spec.get("destinations")))
        checkout_seconds = round(time.monotonic() - started, 3)
        _progress(client, spec, 30, f"checked out {commit[:12]}", runtime)
        result = workspace.run_scanner(module, *args)
        _progress(client, spec, 90, "scan finished", runtime)
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
    summary = dict(result.get("summary") or {}, commit=commit, engines=result["engines"],
                   checkout_seconds=checkout_seconds)
    return findings, summary, result.get("incomplete") or None


def _mirror_cache(settings: ScannerSettings) -> MirrorCache | None:
    """The agent's mirror cache (one object per process; processes share it through locks)."""
    if settings.mirror_dir is None:
        return None
    key = str(settings.mirror_dir)
    if key not in _mirrors:
        _mirrors[key] = MirrorCache(settings.mirror_dir, settings.mirror_cache_size)
    return _mirrors[key]


def _simulate(client: PlatformClient, spec: dict, seconds: float, runtime=None) -> None:
    """A simulated scan: sleep, reporting progress (and noticing a cancel) every second."""
    deadline = time.monotonic() + seconds
    next_report = time.monotonic() + 1
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.25))
        if time.monotonic() >= next_report and time.monotonic() < deadline:
            _progress(client, spec, int(100 * (1 - left / seconds)), "simulated scan", runtime)
            next_report += 1


def _progress(client: PlatformClient, spec: dict, percent: int, message: str, runtime=None) -> None:
    try:
        client.progress(spec["id"], spec["attempt"], spec["job_token"], percent, message)
    except ApiClientError as exc:  # progress is advisory; the result is what matters
        if exc.status == 409 and exc.detail_field("status") == "cancelled":
            raise JobCancelled("cancelled") from None
        if exc.status == 401 and runtime is not None:
            key_refused(runtime)
            raise JobCancelled("the API refused this agent's key") from None
        if exc.status in (403, 409):
            # Requeued elsewhere (our lease expired, a restart) or the agent was disabled: the
            # work is no longer ours, and finishing it would only be refused.
            raise JobCancelled(f"no longer this agent's job: {exc.message}") from None
        logger.warning("progress report failed job_id=%s: %s", spec["id"], exc.message)


#: How long an agent keeps trying to deliver a result while the API is unreachable or
#: failing (an API restart, a deploy). Giving up early would strand the job as running.
REPORT_PATIENCE = 15 * 60


def _report(call, fields: str, runtime=None, patience: float = REPORT_PATIENCE) -> bool:
    """Send the result, retrying with capped backoff while the API is down or erroring;
    return whether the API accepted it."""
    deadline = time.monotonic() + patience
    n = 0
    while True:
        try:
            call()
            return True
        except ApiClientError as exc:
            if exc.status == 401 and runtime is not None:
                key_refused(runtime)
                return False
            if not isinstance(exc, ApiConnectionError) and exc.status < 500:
                logger.error("result refused %s: %s", fields, exc.message)
                return False
            reason = "failed to connect to API" if isinstance(exc, ApiConnectionError) else "API error"
            if time.monotonic() > deadline:
                logger.error("giving up reporting %s after %ds (%s); the controller's timeout will"
                             " requeue it", fields, patience, exc.message)
                return False
            logger.error("%s reporting %s: %s; retrying", reason, fields, exc.message)
            time.sleep(backoff(n, base=1, cap=10))
            n += 1
