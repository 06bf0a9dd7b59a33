"""Request and response schemas: they validate requests and generate /openapi.json."""
from __future__ import annotations

import re

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from ..config import AGENT_NAME_PATTERN, CAPABILITIES, REGION_PATTERN, parse_duration
from ..core.jobs import queue_position
from ..redaction import redact_url
from ..vocabulary import AGENT_STATUSES, JOB_STATUSES, SEVERITIES, DesiredState

#: The one capability check of every request (jobs, tokens, agents).
CAPABILITY_ERROR = f"unknown capability; valid: {', '.join(CAPABILITIES)}"


class FullMatch(validate.Regexp):
    """A pattern the whole value must match, the way OpenAPI (ECMA-262) reads it.

    Python's ``$`` also matches before a final newline, so ``re.match`` would let
    ``"name\n"`` through a pattern the document says it fails.
    """

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class JsonInteger(fields.Integer):
    """An integer in a JSON body: a JSON number without fraction, never a string or a bool.

    marshmallow would take ``"5"`` and ``true``; the document says ``integer``, and a
    client that sends a string has a bug worth telling. Bounded to the database's
    32-bit integers unless the field says less.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("validate", validate.Range(min=INT_MIN, max=INT_MAX))
        super().__init__(**kwargs)

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not value.is_integer()):
            raise self.make_error("invalid")
        return super()._validated(value)


class JsonNumber(fields.Float):
    """A number in a JSON body, never a string or a bool."""

    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._validated(value)


class JsonBoolean(fields.Boolean):
    """``true`` or ``false`` in a JSON body (not ``"yes"``, ``1`` or ``"on"``)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1


_REGION = FullMatch(REGION_PATTERN, error="lowercase letters, digits and '-'")
_REF = FullMatch(r"^(?!-)(?!.*\.\.)[^\s~^:?*\[\\\x00-\x1f\x7f]+$",
                 error="a branch, tag or commit: no leading '-', spaces, '..' or ~^:?*[\\")
_NAME = FullMatch(AGENT_NAME_PATTERN,
                  error="letters, digits, '.', '_' and '-' (max 100)")


class UTCDateTime(fields.DateTime):
    """Naive-UTC database timestamps rendered as ISO 8601 with a ``Z``."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else value.isoformat(timespec="seconds") + "Z"


class Extended:
    """An ORM object plus extra attributes (a key shown once, a derived status) to dump."""

    def __init__(self, obj, **extra):
        self._obj = obj
        self.__dict__.update(extra)

    def __getattr__(self, name):
        return getattr(self._obj, name)


def _queue_position(job):
    """Precomputed for a page (``job.page_queue_position``), else computed for this job."""
    if "page_queue_position" in vars(job):
        return job.page_queue_position
    return queue_position(job)


class Strict(Schema):
    """Answers and admin/tenant bodies: unknown fields are refused (marshmallow's default)."""


class Lenient(Schema):
    """Agent payloads: unknown fields are ignored so newer agents keep working."""

    class Meta:
        unknown = EXCLUDE


class ErrorOut(Strict):
    """Every error: a message for people and, where useful, details (fields, reasons)."""

    error = fields.String(required=True, metadata={"description": "what went wrong"})
    detail = fields.Raw(required=True, allow_none=True,
                        metadata={"description": "field messages or a reason object, or null"})


class HealthOut(Strict):
    status = fields.String(required=True, validate=validate.OneOf(("ok", "degraded")))
    database = fields.String(required=True, metadata={"description": "ok, or error: <kind>"})
    redis = fields.String(required=True, metadata={"description": "ok, or error: <kind>"})


class PageArgs(Strict):
    page = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1_000_000))
    per_page = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))


class JobListArgs(PageArgs):
    status = fields.String(validate=validate.OneOf(JOB_STATUSES))


class Page(Strict):
    page = fields.Integer()
    per_page = fields.Integer()
    total = fields.Integer()


# --- tenants ----------------------------------------------------------------

PRIORITIES = ("critical", "high", "normal", "low")


class JobCreate(Strict):
    repo_url = fields.String(required=True, validate=validate.Length(min=1, max=2048))
    priority = fields.String(load_default="normal", validate=validate.OneOf(PRIORITIES))
    # Never starting with "-": the agent passes it to git, which would read it as an option.
    ref = fields.String(load_default="HEAD", validate=[validate.Length(min=1, max=255), _REF])
    capability = fields.String(required=True, validate=validate.OneOf(
        CAPABILITIES, error=CAPABILITY_ERROR))
    region = fields.String(validate=_REGION, metadata={
        "description": "a region the server knows (configured, or of a registered agent), else 400"
                       " `unknown region`; absent: the region whose live agents have the most free slots"})


class IdempotencyArgs(Schema):
    """Request headers of a job submission (other headers are ignored)."""

    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        validate=[validate.Length(min=1, max=255), FullMatch(r"^[\x21-\x7e]+$", error="printable ASCII")],
        metadata={"description": "makes a retried submission return the job the first one"
                                 " created (same tenant, same key; up to 255 printable ASCII"
                                 " characters, e.g. a UUID)"})


class UncheckedOut(Strict):
    path = fields.String(metadata={"description": "lockfile (repository-relative)"})
    ecosystem = fields.String(allow_none=True)
    reason = fields.String()


class JobOut(Strict):
    id = fields.String()
    status = fields.String()
    priority = fields.String()
    queue_position = fields.Function(_queue_position, allow_none=True,
                                     metadata={"description": "1-based, while pending or queued"})
    capability = fields.String()
    region = fields.String()
    # Credentials in the URL (https://user:token@host/...) go to the agent that claims the
    # job, never back out through the API: tenants' and admins' views show ***.
    repo_url = fields.Function(lambda job: redact_url(job.repo_url), metadata={"type": "string"})
    ref = fields.String()
    attempt = fields.Integer()
    max_attempts = fields.Integer()
    progress = fields.Integer()
    progress_message = fields.String(allow_none=True)
    error = fields.String(allow_none=True)
    summary = fields.Dict(allow_none=True)
    incomplete = fields.List(fields.Nested(UncheckedOut), allow_none=True, metadata={
        "description": "null when everything found was checked; else each lockfile that could not"
                       " be (its findings are missing from the report) and why"})
    agent = fields.String(attribute="agent_name", allow_none=True)
    created_at = UTCDateTime()
    queued_at = UTCDateTime(allow_none=True)
    started_at = UTCDateTime(allow_none=True)
    finished_at = UTCDateTime(allow_none=True)


class JobCreated(JobOut):
    warning = fields.String(metadata={"description": "present when no agent consumes the job's queue now"
                                                     " (none registered serves it, or none is online):"
                                                     " the job is accepted and waits"})


class JobPage(Page):
    items = fields.List(fields.Nested(JobOut))


class FindingOut(Strict):
    rule_id = fields.String()
    severity = fields.String()
    confidence = fields.String(allow_none=True)
    path = fields.String()
    start_line = fields.Integer(allow_none=True)
    end_line = fields.Integer(allow_none=True)
    message = fields.String()
    engine = fields.String()
    cwe = fields.String(allow_none=True)
    fingerprint = fields.String()
    secret_hash = fields.String(allow_none=True)
    preview = fields.String(allow_none=True)
    commit = fields.String(allow_none=True)


class FindingPage(Page):
    items = fields.List(fields.Nested(FindingOut))


# --- platform (agents) ------------------------------------------------------

class RegisterIn(Lenient):
    token = fields.String(required=True, validate=validate.Length(min=1, max=200))
    name = fields.String(validate=_NAME)
    region = fields.String(validate=_REGION, metadata={
        "description": "absent (the agent's REGION=auto): the bootstrap token's region, else the"
                       " server's only region, else 'default'; with several regions it is required"})
    capabilities = fields.List(fields.String(validate=validate.OneOf(CAPABILITIES, error=CAPABILITY_ERROR)),
                               required=True, validate=validate.Length(min=1))
    max_jobs = JsonInteger(load_default=5, validate=validate.Range(min=1, max=1000))
    version = fields.String(validate=validate.Length(max=40))
    host = fields.String(validate=validate.Length(max=255))


class AgentIdentity(Strict):
    name = fields.String()
    region = fields.String()
    capabilities = fields.Function(lambda a: a.capability_list)
    max_jobs = fields.Integer()
    desired_state = fields.String()


class RegisterOut(AgentIdentity):
    api_key = fields.String()


class AgentConfigOut(Strict):
    agent = fields.Nested(AgentIdentity)
    broker_url = fields.String(metadata={
        "description": "the broker of the agent's region: redis://... or sentinel://h1:26379;sentinel://h2:26379"})
    broker_transport_options = fields.Dict(metadata={
        "description": "kombu transport options to consume with: visibility_timeout, global_keyprefix,"
                       " master_name (sentinel:// brokers)"})
    visibility_timeout = fields.Integer()
    broker_key_prefix = fields.String(metadata={
        "description": "kombu's global_keyprefix on the broker; agents consume with the same one"})
    job_time_limit = fields.Integer()
    max_poll_timeout = fields.Integer(metadata={
        "description": "longest long-poll (seconds) the server allows; agents cap POLL_TIMEOUT to it"})


class LostJobIn(Lenient):
    job_id = fields.String(required=True, validate=validate.Length(min=1, max=64))
    attempt = JsonInteger(required=True, validate=validate.Range(min=1, max=INT_MAX))
    reason = fields.String(validate=validate.Length(max=255))


class LeaseIn(Lenient):
    status = fields.String(load_default=DesiredState.ACTIVE, validate=validate.Length(max=32))
    running_jobs = fields.List(fields.String(validate=validate.Length(max=64)),
                               load_default=list, validate=validate.Length(max=1000))
    jobs_running = JsonInteger(load_default=0, validate=validate.Range(min=0, max=100000))
    max_jobs = JsonInteger(validate=validate.Range(min=1, max=1000))
    version = fields.String(validate=validate.Length(max=40))
    host = fields.String(validate=validate.Length(max=255))
    nodename = fields.String(validate=validate.Length(max=255))
    heartbeat_interval = JsonNumber(load_default=30.0, validate=validate.Range(min=0.1, max=3600))
    incarnation = fields.String(validate=validate.Length(min=1, max=64), metadata={
        "description": "id of this start of the agent; a new one requeues what the previous start held"})
    lost_jobs = fields.List(fields.Nested(LostJobIn), load_default=list, validate=validate.Length(max=1000),
                            metadata={"description": "jobs the agent no longer runs (a worker process died)"})


class LeaseOut(Strict):
    agent = fields.String()
    desired_state = fields.String()
    lease_ttl = fields.Integer()


class AttemptIn(Lenient):
    attempt = JsonInteger(required=True, validate=validate.Range(min=1, max=INT_MAX))


class ClaimIn(AttemptIn):
    handout_id = fields.String(validate=validate.Length(min=1, max=64), metadata={
        "description": "the handout id POST /platform/poll returned (HTTP agents only)"})
    incarnation = fields.String(validate=validate.Length(min=1, max=64), metadata={
        "description": "id of this start of the agent (as in PUT /platform/lease)"})


class PollIn(Lenient):
    timeout = fields.Float(load_default=30.0, validate=validate.Range(min=0, max=3600), metadata={
        "description": "seconds to hold the request open; capped by the server's MAX_POLL_TIMEOUT"})


class PollOut(Strict):
    job_id = fields.String()
    attempt = fields.Integer()
    handout_id = fields.String()
    claim_within = fields.Float(metadata={"description": "seconds left to claim before the job goes back"})
    queue = fields.String()


class ClaimOut(Strict):
    job_token = fields.String(metadata={"description": "scoped token for progress/complete/fail"})
    id = fields.String()
    attempt = fields.Integer()
    capability = fields.String()
    region = fields.String()
    repo_url = fields.String(metadata={"description": "with the tenant's credentials, if any: for this"
                                                      " attempt's fetch only, never to be logged"})
    ref = fields.String()
    time_limit = fields.Integer()
    max_attempts = fields.Integer()
    destinations = fields.Dict(metadata={"description": "the repository destination policy's exceptions"
                                                        " (allow, deny: hosts, *.suffix patterns, CIDRs);"
                                                        " checked again right before the fetch"})


class ProgressIn(AttemptIn):
    progress = JsonInteger(required=True, validate=validate.Range(min=0, max=100))
    message = fields.String(validate=validate.Length(max=255))


class FindingIn(Lenient):
    rule_id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    severity = fields.String(required=True, validate=validate.OneOf(SEVERITIES))
    confidence = fields.String(validate=validate.Length(max=16))
    path = fields.String(required=True, validate=validate.Length(min=1, max=1024))
    start_line = JsonInteger(allow_none=True, validate=validate.Range(min=0, max=INT_MAX))
    end_line = JsonInteger(allow_none=True, validate=validate.Range(min=0, max=INT_MAX))
    message = fields.String(required=True, validate=validate.Length(max=10000))
    engine = fields.String(required=True, validate=validate.Length(min=1, max=64))
    cwe = fields.String(allow_none=True, validate=validate.Length(max=32))
    fingerprint = fields.String(validate=validate.Length(max=200))
    secret_hash = fields.String(allow_none=True, validate=validate.Length(max=64))
    preview = fields.String(allow_none=True, validate=validate.Length(max=64))
    commit = fields.String(allow_none=True, validate=validate.Length(max=64))


class UncheckedIn(Lenient):
    path = fields.String(required=True, validate=validate.Length(min=1, max=1024))
    ecosystem = fields.String(allow_none=True, validate=validate.Length(max=32))
    reason = fields.String(required=True, validate=validate.Length(min=1, max=2000))


class CompleteIn(AttemptIn):
    findings = fields.List(fields.Nested(FindingIn), load_default=list,
                           validate=validate.Length(max=100000))
    summary = fields.Dict(load_default=dict)
    incomplete = fields.List(fields.Nested(UncheckedIn), load_default=None, allow_none=True,
                             validate=validate.Length(max=100),
                             metadata={"description": "lockfiles the scan could not check, and why"})


class FailIn(AttemptIn):
    error = fields.String(required=True, validate=validate.Length(min=1, max=10000))
    retry = JsonBoolean(load_default=False)


class JobStateOut(Strict):
    id = fields.String()
    status = fields.String()
    attempt = fields.Integer()


# --- admin ------------------------------------------------------------------

#: Durations the API takes: a positive number below 10000 with an optional unit
#: (``30s``, ``5m``, ``24h``, ``7d``, ``250ms``). Bounded so a window or lifetime
#: always fits a date (``9999d`` is 27 years).
DURATION_PATTERN = r"^(?:[1-9][0-9]{0,3}(?:\.[0-9]{1,6})?|0\.[0-9]{0,5}[1-9])(?:ms|s|m|h|d)?$"
_DURATION = re.compile(DURATION_PATTERN)


class DurationText(fields.String):
    """A lifetime or window such as ``30m``, ``24h`` or ``7d``, validated, kept as text."""

    def __init__(self, **kwargs):
        metadata = {"pattern": DURATION_PATTERN, **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if _DURATION.fullmatch(value) is None:
            raise ValidationError(f"invalid duration {value!r} (use e.g. 30s, 5m, 1h, 7d)")
        return value


class Duration(DurationText):
    """A :class:`DurationText` loaded as seconds."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parse_duration(text, "duration")
        except ValueError as exc:  # the message names the field already: drop the prefix
            raise ValidationError(str(exc).removeprefix("duration: ")) from None


class TenantCreate(Strict):
    name = fields.String(required=True, validate=_NAME)
    plan = fields.String(validate=validate.Length(min=1, max=32))


class TenantUpdate(Strict):
    plan = fields.String(required=True, validate=validate.Length(min=1, max=32))


class TenantOut(Strict):
    id = fields.Integer()
    name = fields.String()
    plan = fields.String()
    created_at = UTCDateTime()


class TenantUsage(TenantOut):
    limits = fields.Dict()
    usage = fields.Dict()


class TenantCreated(TenantOut):
    api_key = fields.String()


class TenantPage(Page):
    items = fields.List(fields.Nested(TenantOut))


class TokenCreate(Strict):
    max_uses = JsonInteger(load_default=1, validate=validate.Range(min=1, max=100000))
    expires = DurationText(load_default="1h", metadata={"description": "lifetime such as 30m, 1h, 7d"})
    region = fields.String(validate=_REGION, metadata={"description": "only agents of this region"})
    capabilities = fields.List(fields.String(validate=validate.OneOf(CAPABILITIES, error=CAPABILITY_ERROR)),
                               validate=validate.Length(min=1),
                               metadata={"description": "agents may register only a subset of these"})
    description = fields.String(validate=validate.Length(max=255))


class TokenRevoke(Strict):
    reason = fields.String(validate=validate.Length(max=255))


class TokenOut(Strict):
    id = fields.Integer()
    prefix = fields.String()
    max_uses = fields.Integer()
    uses = fields.Integer()
    expires_at = UTCDateTime()
    revoked_at = UTCDateTime(allow_none=True)
    created_by = fields.String(allow_none=True)
    created_at = UTCDateTime()
    status = fields.String()
    region = fields.String(allow_none=True)
    capabilities = fields.Function(lambda t: [c for c in (t.capabilities or "").split(",") if c] or None,
                                   allow_none=True)
    description = fields.String(allow_none=True)
    revoked_by = fields.String(allow_none=True)
    revoke_reason = fields.String(allow_none=True)


class TokenCreated(TokenOut):
    token = fields.String()


class TokenPage(Page):
    items = fields.List(fields.Nested(TokenOut))


class AgentCreate(Strict):
    name = fields.String(required=True, validate=_NAME)
    region = fields.String(required=True, validate=_REGION)
    capabilities = fields.List(fields.String(validate=validate.OneOf(CAPABILITIES, error=CAPABILITY_ERROR)),
                               load_default=lambda: ["sast", "sca"], validate=validate.Length(min=1))
    max_jobs = JsonInteger(load_default=5, validate=validate.Range(min=1, max=1000))


class AgentOut(Strict):
    name = fields.String()
    status = fields.String()
    region = fields.String()
    capabilities = fields.List(fields.String())
    jobs_running = fields.Integer()
    max_jobs = fields.Integer()
    running_jobs = fields.List(fields.String())
    desired_state = fields.String()
    stopped_at = UTCDateTime(allow_none=True, metadata={
        "description": "when an offline agent announced its graceful stop (null: crashed or cut off)"})
    lease_ttl = fields.Integer(allow_none=True)
    last_seen = UTCDateTime(allow_none=True)
    last_seen_seconds = fields.Integer(allow_none=True)
    version = fields.String(allow_none=True)
    host = fields.String(allow_none=True)
    nodename = fields.String(allow_none=True)
    created_at = UTCDateTime()


class AgentCreated(AgentOut):
    api_key = fields.String()


class AgentDisabledOut(AgentOut):
    requeued_jobs = fields.Integer(metadata={"description": "running jobs the disable sent back to their queues"})


_DEGRADED = {"description": "present when Redis could not be read: what is unknown, and what comes"
                            " from the database instead"}


class AgentPage(Page):
    items = fields.List(fields.Nested(AgentOut))
    degraded = fields.String(metadata=_DEGRADED)


class AgentListArgs(PageArgs):
    region = fields.String(validate=_REGION)
    capability = fields.String(validate=validate.OneOf(CAPABILITIES, error=CAPABILITY_ERROR))
    name = fields.String(validate=validate.Length(min=1, max=100),
                         metadata={"description": "agents whose name contains this text"})
    status = fields.String(validate=validate.OneOf(AGENT_STATUSES))


class AdminJobOut(JobOut):
    tenant = fields.Function(lambda job: job.tenant.name)


class AdminJobPage(Page):
    items = fields.List(fields.Nested(AdminJobOut))


class AdminJobListArgs(JobListArgs):
    tenant = fields.String(validate=_NAME)
    agent = fields.String(validate=_NAME, metadata={"description": "jobs last held by this agent"})
    capability = fields.String(validate=validate.OneOf(CAPABILITIES, error=CAPABILITY_ERROR))
    region = fields.String(validate=_REGION)
    since = Duration(metadata={"description": "only jobs created in this window, e.g. 24h"})


class AgentJobOut(Strict):
    id = fields.String()
    status = fields.String()
    capability = fields.String()
    tenant = fields.Function(lambda job: job.tenant.name)
    attempt = fields.Integer()
    progress = fields.Integer()
    created_at = UTCDateTime()
    started_at = UTCDateTime(allow_none=True)
    finished_at = UTCDateTime(allow_none=True)


class AgentDetailOut(AgentOut):
    recent_jobs = fields.List(fields.Nested(AgentJobOut))
    degraded = fields.String(metadata=_DEGRADED)


class AuditEventOut(Strict):
    id = fields.Integer()
    created_at = UTCDateTime()
    actor = fields.String()
    action = fields.String()
    target = fields.String(allow_none=True)
    detail = fields.String(allow_none=True)


class AuditPage(Page):
    items = fields.List(fields.Nested(AuditEventOut))


class AuditListArgs(PageArgs):
    actor = fields.String(validate=validate.Length(max=100))
    action = fields.String(validate=validate.Length(max=64))
    target = fields.String(validate=validate.Length(max=255))
    since = Duration(metadata={"description": "only events in this window, e.g. 24h"})


class AdminTokenCreate(Strict):
    name = fields.String(required=True, validate=_NAME)
    role = fields.String(load_default="viewer", validate=validate.OneOf(("admin", "viewer")))


class AdminTokenOut(Strict):
    id = fields.Integer()
    name = fields.String()
    role = fields.String()
    status = fields.String()
    revoked_at = UTCDateTime(allow_none=True)
    created_at = UTCDateTime()


class AdminTokenCreated(AdminTokenOut):
    token = fields.String()


class AdminTokenPage(Page):
    items = fields.List(fields.Nested(AdminTokenOut))


class RegionInfo(Strict):
    online = fields.Integer()
    draining = fields.Integer()
    stopping = fields.Integer()
    offline = fields.Integer()
    disabled = fields.Integer()
    # `unknown` is a Schema attribute: the field is named otherwise, serialised as "unknown".
    unknown_status = fields.Integer(data_key="unknown", attribute="unknown")
    jobs_running = fields.Integer()
    capacity = fields.Integer()


class AgentsInfo(Strict):
    total = fields.Integer()
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer())
    by_region = fields.Dict(keys=fields.String(), values=fields.Nested(RegionInfo))


class CapacityInfo(Strict):
    used = fields.Integer()
    total = fields.Integer()


class JobCounts(Strict):
    pending = fields.Integer()
    queued = fields.Integer()
    running = fields.Integer()
    failed_24h = fields.Integer()
    completed_24h = fields.Integer()


class BrokerInfo(Strict):
    url = fields.String(metadata={"description": "the broker URL without its password"})
    regions = fields.List(fields.String())
    status = fields.String(metadata={"description": "ok, or error: <kind>"})


class ClusterInfoOut(Strict):
    api = fields.String()
    version = fields.String()
    database = fields.String()
    redis = fields.String()
    agents = fields.Nested(AgentsInfo)
    capacity = fields.Nested(CapacityInfo)
    queues = fields.Dict(keys=fields.String(), values=fields.Integer(allow_none=True),
                         metadata={"description": "messages waiting per broker queue (null: Redis unreadable)"})
    consumers = fields.Dict(keys=fields.String(), values=fields.Integer(allow_none=True),
                            metadata={"description": "online agents consuming each queue (null: unknown)"})
    unconsumed = fields.List(fields.String(), metadata={
        "description": "queues with jobs waiting (broker depth or queued job records) and no online agent"})
    brokers = fields.Dict(keys=fields.String(), values=fields.Nested(BrokerInfo), metadata={
        "description": "each broker (\"default\", or the regions REGION_BROKERS gives it): url, regions, status"})
    jobs = fields.Nested(JobCounts)
    degraded = fields.String(metadata=_DEGRADED)
