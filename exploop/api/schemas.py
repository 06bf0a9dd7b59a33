"""Request and response schemas: they validate requests and generate /openapi.json."""
from __future__ import annotations

import re

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from ..config import CAPABILITIES, parse_duration
from ..jobs import SEVERITIES
from ..models import JOB_STATUSES
from ..security import redact_url


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


_REGION = FullMatch(r"^[a-z0-9][a-z0-9-]{0,62}$", error="lowercase letters, digits and '-'")
_REF = FullMatch(r"^(?!-)(?!.*\.\.)[^\s~^:?*\[\\\x00-\x1f\x7f]+$",
                 error="a branch, tag or commit: no leading '-', spaces, '..' or ~^:?*[\\")
_NAME = FullMatch(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
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
    from ..jobs import queue_position
    return queue_position(job)


class Strict(Schema):
    class Meta:
        ordered = True


class Lenient(Schema):
    """Agent payloads: unknown fields are ignored so newer agents keep working."""

    class Meta:
        unknown = EXCLUDE
        ordered = True


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
        CAPABILITIES, error=f"unknown capability; valid: {', '.join(CAPABILITIES)}"))
    region = fields.String(validate=_REGION)


class IdempotencyArgs(Schema):
    """Request headers of a job submission (other headers are ignored)."""

    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        validate=[validate.Length(min=1, max=255), FullMatch(r"^[\x21-\x7e]+$", error="printable ASCII")],
        metadata={"description": "makes a retried submission return the job the first one"
                                 " created (same tenant, same key; up to 255 printable ASCII"
                                 " characters, e.g. a UUID)"})


class JobOut(Strict):
    id = fields.String()
    status = fields.String()
    priority = fields.String()
    queue_position = fields.Function(lambda job: _queue_position(job), allow_none=True,
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
    agent = fields.String(attribute="agent_name", allow_none=True)
    created_at = UTCDateTime()
    queued_at = UTCDateTime(allow_none=True)
    started_at = UTCDateTime(allow_none=True)
    finished_at = UTCDateTime(allow_none=True)


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
    region = fields.String(required=True, validate=_REGION)
    capabilities = fields.List(fields.String(validate=validate.OneOf(CAPABILITIES)),
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
    broker_url = fields.String()
    visibility_timeout = fields.Integer()
    job_time_limit = fields.Integer()
    max_poll_timeout = fields.Integer(metadata={
        "description": "longest long-poll (seconds) the server allows; agents cap POLL_TIMEOUT to it"})


class LeaseIn(Lenient):
    status = fields.String(load_default="active", validate=validate.Length(max=32))
    running_jobs = fields.List(fields.String(validate=validate.Length(max=64)),
                               load_default=list, validate=validate.Length(max=1000))
    jobs_running = JsonInteger(load_default=0, validate=validate.Range(min=0, max=100000))
    max_jobs = JsonInteger(validate=validate.Range(min=1, max=1000))
    version = fields.String(validate=validate.Length(max=40))
    host = fields.String(validate=validate.Length(max=255))
    nodename = fields.String(validate=validate.Length(max=255))
    heartbeat_interval = JsonNumber(load_default=30.0, validate=validate.Range(min=0.1, max=3600))


class LeaseOut(Strict):
    agent = fields.String()
    desired_state = fields.String()
    lease_ttl = fields.Integer()


class AttemptIn(Lenient):
    attempt = JsonInteger(required=True, validate=validate.Range(min=1, max=INT_MAX))


class ClaimIn(AttemptIn):
    handout_id = fields.String(validate=validate.Length(min=1, max=64), metadata={
        "description": "the handout id POST /platform/poll returned (HTTP agents only)"})


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
    repo_url = fields.String()
    ref = fields.String()
    time_limit = fields.Integer()


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


class CompleteIn(AttemptIn):
    findings = fields.List(fields.Nested(FindingIn), load_default=list,
                           validate=validate.Length(max=100000))
    summary = fields.Dict(load_default=dict)


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
    capabilities = fields.List(fields.String(validate=validate.OneOf(CAPABILITIES)),
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
    capabilities = fields.List(fields.String(validate=validate.OneOf(CAPABILITIES)),
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
    lease_ttl = fields.Integer(allow_none=True)
    last_seen = UTCDateTime(allow_none=True)
    last_seen_seconds = fields.Integer(allow_none=True)
    version = fields.String(allow_none=True)
    host = fields.String(allow_none=True)
    nodename = fields.String(allow_none=True)
    created_at = UTCDateTime()


class AgentCreated(AgentOut):
    api_key = fields.String()


class AgentPage(Page):
    items = fields.List(fields.Nested(AgentOut))


class AgentListArgs(PageArgs):
    region = fields.String(validate=_REGION)
    capability = fields.String(validate=validate.OneOf(CAPABILITIES))
    name = fields.String(validate=validate.Length(min=1, max=100),
                         metadata={"description": "agents whose name contains this text"})
    status = fields.String(validate=validate.OneOf(("online", "offline", "draining", "disabled")))


class AdminJobOut(JobOut):
    tenant = fields.Function(lambda job: job.tenant.name)


class AdminJobPage(Page):
    items = fields.List(fields.Nested(AdminJobOut))


class AdminJobListArgs(JobListArgs):
    tenant = fields.String(validate=_NAME)
    agent = fields.String(validate=_NAME, metadata={"description": "jobs last held by this agent"})
    capability = fields.String(validate=validate.OneOf(CAPABILITIES))
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
    offline = fields.Integer()
    disabled = fields.Integer()
    unknown = fields.Integer()
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


class ClusterInfoOut(Strict):
    api = fields.String()
    version = fields.String()
    database = fields.String()
    redis = fields.String()
    agents = fields.Nested(AgentsInfo)
    capacity = fields.Nested(CapacityInfo)
    queues = fields.Dict(keys=fields.String(), values=fields.Integer(allow_none=True))
    jobs = fields.Nested(JobCounts)
