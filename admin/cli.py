"""``exploop-admin``: run the platform agent fleet from a laptop, over the admin API.

kubectl's conventions: ``get`` lists (``-o wide|json|yaml``), ``describe`` shows
one object, verbs act on one object (``drain agent X``). Results go to stdout,
diagnostics to stderr; any error is one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import errno
import os
import sys
import time
from functools import cached_property
from urllib.parse import quote

import click
from click.shell_completion import CompletionItem

from exploop import __version__
from exploop.client import ApiClient, ApiClientError
from exploop.config import CAPABILITIES, ConfigError, parse_duration
from exploop.vocabulary import AGENT_STATUSES, JOB_STATUSES

from . import output
from .config import ConfigFileError, Target, resolve

__all__ = ["main", "Session", "WATCH_INTERVAL", "JOB_STATUSES", "AGENT_STATUSES"]

#: Seconds between two renderings of ``-w/--watch``.
WATCH_INTERVAL = 2.0
#: Items per request when a command walks a paged list (the API's largest page).
PAGE_SIZE = 500
#: The API validates these too; here they give usage errors and shell completion
#: without importing the server's models (tests keep the two lists equal).

_CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Session:
    """The API target and client of one invocation, resolved on first use (``--help`` needs neither)."""

    def __init__(self, api_url: str | None, token: str | None, context: str | None,
                 timeout: float = 10.0):
        self.options = (api_url, token, context)
        self.timeout = timeout
        #: What the last list could not know (the API's ``degraded``: Redis unreadable).
        self.degraded: str | None = None

    @cached_property
    def target(self) -> Target:
        return resolve(*self.options, warn=lambda message: click.echo(message, err=True))

    @cached_property
    def client(self) -> ApiClient:
        if not self.target.token:
            raise click.ClickException(
                "no admin token: pass --token, set EXPLOOP_ADMIN_TOKEN, or add a context with a"
                " token to ~/.exploop/config (the first token comes from `exploop create-admin-token`)")
        return ApiClient(self.target.api_url, self.target.token, timeout=self.timeout)

    def fetch(self, path: str, params: dict | None = None, limit: int = 0) -> tuple[list[dict], int]:
        """Walk a paged list; stop after ``limit`` items (0: all). Return (items, total)."""
        items: list[dict] = []
        page = 1
        per_page = min(limit, PAGE_SIZE) if limit else PAGE_SIZE
        self.degraded = None
        while True:
            body = self.client.get(path, params={**(params or {}), "page": page, "per_page": per_page})
            items.extend(body["items"])
            self.degraded = body.get("degraded") or self.degraded
            total = body["total"]
            if limit and len(items) >= limit:
                return items[:limit], total
            if not body["items"] or len(items) >= total:
                return items, total
            page += 1


def _one_line(exc: ApiClientError, session: Session | None) -> str:
    """The API's error as one line: its message, the invalid fields, a hint for 401."""
    message = exc.message
    if exc.status == 400 and isinstance(exc.detail, dict) and exc.detail:
        parts = []
        for name, problems in exc.detail.items():
            if isinstance(problems, (list, tuple)):
                problems = "; ".join(str(p) for p in problems)
            parts.append(f"{name}: {problems}")
        message = f"{message} ({', '.join(parts)})"
    if exc.status == 401 and session is not None and "target" in session.__dict__:
        source = session.target.token_source
        if source:
            message = f"{message} (admin token from {source})"
    return " ".join(str(message).split())


class AdminGroup(click.Group):
    """The root group: turns API and config failures into one clear line, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except ApiClientError as exc:
            raise click.ClickException(_one_line(exc, ctx.obj)) from None
        except (ConfigFileError, ConfigError) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # `| head`: click exits quietly on EPIPE
                raise
            raise click.ClickException(f"{exc.__class__.__name__}: {exc}") from None
        except Exception as exc:
            if os.environ.get("EXPLOOP_ADMIN_DEBUG"):
                raise
            raise click.ClickException(
                f"unexpected error: {exc.__class__.__name__}: {exc}"
                " (set EXPLOOP_ADMIN_DEBUG=1 for a traceback)") from None


class AliasGroup(click.Group):
    """A verb group that also answers to the other number of its nouns (``get agent``)."""

    def __init__(self, *args, aliases: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases = aliases or {}

    def get_command(self, ctx, cmd_name):
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))


@click.group(name="exploop-admin", cls=AdminGroup, context_settings=_CONTEXT_SETTINGS)
@click.option("--api-url", envvar="EXPLOOP_API_URL", show_envvar=True, metavar="URL",
              help="Admin API base URL [default: from the context, else http://127.0.0.1:8080].")
@click.option("--token", envvar="EXPLOOP_ADMIN_TOKEN", show_envvar=True, metavar="TOKEN",
              help="Admin token (radmin_...) [default: from the context].")
@click.option("--context", "context_name", envvar="EXPLOOP_CONTEXT", show_envvar=True, metavar="NAME",
              help="Context of ~/.exploop/config (EXPLOOP_CONFIG) [default: its current-context].")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              metavar="SECONDS", help="Timeout of each API request.")
@click.version_option(__version__, "--version", prog_name="exploop-admin")
@click.pass_context
def main(ctx, api_url, token, context_name, timeout):
    """Operate the Exploop platform agent fleet through the admin API.

    \b
    Examples:
      exploop-admin get agents
      exploop-admin describe agent agent-us-east-1
      exploop-admin create token --max-uses=1 --expires=1h
      exploop-admin drain agent agent-us-east-1
    """
    ctx.obj = Session(api_url, token, context_name, timeout)


# --- shared options and plumbing --------------------------------------------------------

def _list_output(func):
    return click.option("-o", "--output", "output_format", type=click.Choice(output.LIST_FORMATS),
                        default="table", show_default=True,
                        help="table, wide (more columns), or one json/yaml document.")(func)


def _doc_output(func):
    return click.option("-o", "--output", "output_format", type=click.Choice(output.DOC_FORMATS),
                        default="text", show_default=True,
                        help="text, or one json/yaml document.")(func)


def _watch(func):
    return click.option("-w", "--watch", is_flag=True,
                        help=f"Render again every {WATCH_INTERVAL:g}s until Ctrl-C.")(func)


def _limit(default: int, what: str):
    def decorator(func):
        return click.option("--limit", type=click.IntRange(min=0), default=default, show_default=True,
                            help=f"Show at most this many {what} (0: all).")(func)
    return decorator


def _emit(text: str, notes: list[str]) -> None:
    if text:
        click.echo(text, nl=False)
    for note in notes:
        click.echo(note, err=True)


def _run(frame, watch: bool) -> None:
    """Print one frame; with ``--watch``, print a fresh one every WATCH_INTERVAL until Ctrl-C.

    The first frame's errors end the command; later ones are reported and the watch goes
    on, so a restarting API does not end an operator's watch.
    """
    _emit(*frame())
    if not watch:
        return
    interactive = sys.stdout.isatty()
    try:
        while True:
            time.sleep(WATCH_INTERVAL)
            try:
                text, notes = frame()
            except ApiClientError as exc:
                click.echo(f"Error: {_one_line(exc, None)}", err=True)
                continue
            if interactive:
                click.clear()
            _emit(text, notes)
    except KeyboardInterrupt:
        return


def _path(*parts) -> str:
    return "/admin/v1/" + "/".join(quote(str(p), safe="") for p in parts)


def _complete_agents(ctx: click.Context, param, incomplete: str) -> list[CompletionItem]:
    """Shell completion of agent names, asked of the API (nothing when it cannot answer)."""
    params = ctx.find_root().params
    try:
        session = Session(params.get("api_url"), params.get("token"), params.get("context_name"),
                          timeout=2.0)
        items, _ = session.fetch("/admin/v1/agents", limit=PAGE_SIZE)
    except Exception:  # completion must never break the operator's shell
        return []
    return [CompletionItem(a["name"]) for a in items if a["name"].startswith(incomplete)]


def _show_list(session: Session, kind: str, path: str, params: dict, limit: int, fmt: str,
               watch: bool) -> None:
    plural = output.KINDS[kind].plural

    def frame():
        items, total = session.fetch(path, params, limit)
        notes = [f"warning: degraded: {session.degraded}"] if session.degraded else []
        if not items and fmt in ("table", "wide"):
            return "", [f"No {plural} found."]
        if limit and total > len(items):
            notes.append(f"showing {len(items)} of {total} {plural}, newest first;"
                         " use --limit N for more, --limit 0 for all")
        return output.render_list(kind, items, total, fmt), notes

    _run(frame, watch)


def _print_doc(doc: dict, fmt: str, text: str, note: str | None = None) -> None:
    """An action's result: its line of text, or the whole object as one document."""
    click.echo(text if fmt == "text" else output.render_doc(doc, fmt), nl=fmt == "text")
    if note:
        click.echo(note, err=True)


# --- get --------------------------------------------------------------------------------

@main.group(cls=AliasGroup, aliases={"agent": "agents", "job": "jobs", "token": "tokens",
                                     "tenant": "tenants", "admin-token": "admin-tokens",
                                     "audit-log": "audit"})
def get():
    """List agents, jobs, bootstrap tokens, tenants, admin tokens or the audit log."""


@get.command("agents")
@click.option("--region", help="Only agents of this region.")
@click.option("--status", type=click.Choice(AGENT_STATUSES), help="Only agents in this status.")
@_limit(0, "agents")
@_list_output
@_watch
@click.pass_obj
def get_agents(session, region, status, limit, output_format, watch):
    """List agents: NAME STATUS REGION JOBS LAST SEEN (wide: capabilities, lease, version, host)."""
    params = {k: v for k, v in (("region", region), ("status", status)) if v}
    _show_list(session, "agents", "/admin/v1/agents", params, limit, output_format, watch)


@get.command("jobs")
@click.option("--status", type=click.Choice(JOB_STATUSES), help="Only jobs in this status.")
@click.option("--tenant", metavar="NAME", help="Only jobs of this tenant.")
@click.option("--agent", metavar="NAME", help="Only jobs last held by this agent.")
@click.option("--since", metavar="DURATION", callback=lambda ctx, param, value: _duration(param, value),
              help="Only jobs created in this window, e.g. 24h.")
@_limit(50, "jobs")
@_list_output
@_watch
@click.pass_obj
def get_jobs(session, status, tenant, agent, since, limit, output_format, watch):
    """List jobs of every tenant, newest first."""
    params = {k: v for k, v in (("status", status), ("tenant", tenant), ("agent", agent),
                                ("since", since)) if v}
    _show_list(session, "jobs", "/admin/v1/jobs", params, limit, output_format, watch)


@get.command("tokens")
@_limit(0, "tokens")
@_list_output
@_watch
@click.pass_obj
def get_tokens(session, limit, output_format, watch):
    """List bootstrap tokens (never their values), newest first."""
    _show_list(session, "tokens", "/admin/v1/tokens", {}, limit, output_format, watch)


@get.command("tenants")
@_limit(0, "tenants")
@_list_output
@_watch
@click.pass_obj
def get_tenants(session, limit, output_format, watch):
    """List tenants."""
    _show_list(session, "tenants", "/admin/v1/tenants", {}, limit, output_format, watch)


@get.command("admin-tokens")
@_limit(0, "admin tokens")
@_list_output
@_watch
@click.pass_obj
def get_admin_tokens(session, limit, output_format, watch):
    """List admin tokens: names and roles (never their values)."""
    _show_list(session, "admin-tokens", "/admin/v1/admin-tokens", {}, limit, output_format, watch)


@get.command("audit")
@click.option("--actor", metavar="NAME", help="Only events by this admin token name.")
@click.option("--action", metavar="ACTION", help='Only this action, e.g. "drain agent".')
@click.option("--target", metavar="NAME", help="Only events about this object.")
@click.option("--since", metavar="DURATION", callback=lambda ctx, param, value: _duration(param, value),
              help="Only events in this window, e.g. 24h.")
@_limit(50, "events")
@_list_output
@_watch
@click.pass_obj
def get_audit(session, actor, action, target, since, limit, output_format, watch):
    """Show the audit log, newest first: who did what, to what, when."""
    params = {k: v for k, v in (("actor", actor), ("action", action), ("target", target),
                                ("since", since)) if v}
    _show_list(session, "audit", "/admin/v1/audit", params, limit, output_format, watch)


def _duration(param, value: str | None) -> str | None:
    """Check a duration option locally so a typo is a usage error, not a round trip."""
    if value is None:
        return None
    try:
        parse_duration(value, param.opts[-1])
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"{param.opts[-1]}: ")) from None
    return value


# --- describe / cluster-info -----------------------------------------------------------------

@main.group(cls=AliasGroup, aliases={"agents": "agent", "jobs": "job"})
def describe():
    """Show one agent or job in detail."""


@describe.command("agent")
@click.argument("name", shell_complete=_complete_agents)
@_doc_output
@_watch
@click.pass_obj
def describe_agent(session, name, output_format, watch):
    """Show an agent: status, Jobs, lease TTL, last seen, desired state, recent jobs."""
    def frame():
        view = session.client.get(_path("agents", name))
        notes = [f"warning: degraded: {view['degraded']}"] if view.get("degraded") else []
        if output_format == "text":
            return output.describe_agent(view), notes
        return output.render_doc(view, output_format), notes
    _run(frame, watch)


@describe.command("job")
@click.argument("job_id", metavar="ID")
@_doc_output
@_watch
@click.pass_obj
def describe_job(session, job_id, output_format, watch):
    """Show a job: status, attempts, agent, timings, progress, error, findings by severity."""
    def frame():
        job = session.client.get(_path("jobs", job_id))
        if output_format == "text":
            return output.describe_job(job), []
        return output.render_doc(job, output_format), []
    _run(frame, watch)


@describe.command("tenant")
@click.argument("name")
@_doc_output
@_watch
@click.pass_obj
def describe_tenant(session, name, output_format, watch):
    """Show a tenant: plan, limits and usage against them."""
    def frame():
        tenant = session.client.get(_path("tenants", name))
        if output_format == "text":
            return output.describe_tenant(tenant), []
        return output.render_doc(tenant, output_format), []
    _run(frame, watch)


@main.command("cluster-info")
@_doc_output
@_watch
@click.pass_obj
def cluster_info(session, output_format, watch):
    """Show API, database and Redis health, agents by region, capacity, queues and jobs."""
    def frame():
        info = session.client.get("/admin/v1/cluster-info")
        problems = [f"{name}: {info[name]}" for name in ("database", "redis") if info[name] != "ok"]
        notes = [f"warning: cluster degraded ({'; '.join(problems)})"] if problems else []
        if info.get("degraded"):
            notes.append(f"warning: {info['degraded']}")
        for queue in info.get("unconsumed") or []:
            notes.append(f"warning: queue {queue} has jobs waiting and no online agent consumes it")
        if output_format == "text":
            return output.describe_cluster(info, session.target.api_url), notes
        return output.render_doc(info, output_format), notes
    _run(frame, watch)


# --- create ---------------------------------------------------------------------------

@main.group(cls=AliasGroup, aliases={"bootstrap-token": "token"})
def create():
    """Create a bootstrap token, an agent, a tenant or an admin token."""


@create.command("token")
@click.option("--max-uses", type=click.IntRange(1, 100000), default=1, show_default=True,
              help="Registrations this token allows.")
@click.option("--expires", default="1h", show_default=True, metavar="DURATION",
              callback=lambda ctx, param, value: _duration(param, value),
              help="Lifetime, e.g. 30m, 1h, 7d.")
@click.option("--region", metavar="REGION", help="Only agents of this region may register with it.")
@click.option("--capabilities", metavar="LIST", callback=lambda ctx, param, value: _capabilities(ctx, param, value),
              help="Agents may register only these capabilities (or fewer), e.g. sast,sca.")
@click.option("--description", metavar="TEXT", help="What the token is for.")
@_doc_output
@click.pass_obj
def create_token(session, max_uses, expires, region, capabilities, description, output_format):
    """Create a bootstrap token for agents to register with (printed once)."""
    body = {"max_uses": max_uses, "expires": expires}
    for key, value in (("region", region), ("capabilities", capabilities), ("description", description)):
        if value:
            body[key] = value
    token = session.client.post("/admin/v1/tokens", body)
    _print_doc(token, output_format, token["token"],
               f"bootstrap token {token['id']} ({token['prefix']}...) created: max uses"
               f" {token['max_uses']}, expires {token['expires_at']}; it is shown only once")


def _capabilities(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in names if c not in CAPABILITIES]
    if unknown or not names:
        raise click.BadParameter(f"unknown capability {', '.join(unknown) or '(empty)'};"
                                 f" valid: {', '.join(CAPABILITIES)}")
    return names


@create.command("agent")
@click.option("--name", required=True, help="Agent name, e.g. agent-us-east-1.")
@click.option("--region", required=True, help="Region, e.g. us-east-1.")
@click.option("--capabilities", callback=_capabilities, metavar="LIST",
              help=f"Comma separated, from {','.join(CAPABILITIES)} [default: sast,sca].")
@click.option("--max-jobs", type=click.IntRange(1, 1000), help="Concurrent jobs [default: 5].")
@_doc_output
@click.pass_obj
def create_agent(session, name, region, capabilities, max_jobs, output_format):
    """Create an agent record with a pre-assigned API key (printed once)."""
    body = {"name": name, "region": region}
    if capabilities:
        body["capabilities"] = capabilities
    if max_jobs:
        body["max_jobs"] = max_jobs
    agent = session.client.post("/admin/v1/agents", body)
    _print_doc(agent, output_format, agent["api_key"],
               f"agent {agent['name']!r} created in {agent['region']} (capabilities"
               f" {','.join(agent['capabilities'])}, max jobs {agent['max_jobs']}): save this API key"
               " now (the agent's API_KEY), it is shown only once")


@create.command("tenant")
@click.argument("name")
@click.option("--plan", metavar="PLAN", help="free, starter, pro, enterprise (or a configured plan);"
                                              " default: the server's DEFAULT_PLAN.")
@_doc_output
@click.pass_obj
def create_tenant(session, name, plan, output_format):
    """Create a tenant; its API key is printed once."""
    tenant = session.client.post("/admin/v1/tenants", {"name": name, **({"plan": plan} if plan else {})})
    _print_doc(tenant, output_format, tenant["api_key"],
               f"tenant {tenant['name']!r} created: save this API key now, it is shown only once")


@create.command("admin-token")
@click.option("--name", required=True, help="Who the token is for (shown in the audit log).")
@click.option("--role", type=click.Choice(["admin", "viewer"]), default="viewer", show_default=True,
              help="viewer: read only; admin: may change things.")
@_doc_output
@click.pass_obj
def create_admin_token(session, name, role, output_format):
    """Create an admin token for another operator (printed once)."""
    token = session.client.post("/admin/v1/admin-tokens", {"name": name, "role": role})
    _print_doc(token, output_format, token["token"],
               f"admin token {token['id']} for {token['name']!r} (role {token['role']}) created;"
               " it is shown only once")


# --- agent lifecycle -------------------------------------------------------------------

@main.group(cls=AliasGroup, aliases={"agents": "agent"})
def drain():
    """Stop an agent taking new jobs (running jobs finish)."""


@drain.command("agent")
@click.argument("name", shell_complete=_complete_agents)
@_doc_output
@click.pass_obj
def drain_agent(session, name, output_format):
    """Drain an agent: it takes no new jobs; running jobs finish."""
    view = session.client.post(_path("agents", name, "drain"))
    running = view["jobs_running"]
    _print_doc(view, output_format, f"agent/{view['name']} draining: takes no new jobs"
               + (f"; {running} running job{'s' * (running != 1)} will finish" if running else ""))


@main.group(cls=AliasGroup, aliases={"agents": "agent"})
def uncordon():
    """Let a drained agent take jobs again."""


@uncordon.command("agent")
@click.argument("name", shell_complete=_complete_agents)
@_doc_output
@click.pass_obj
def uncordon_agent(session, name, output_format):
    """Uncordon an agent: it takes new jobs again."""
    view = session.client.post(_path("agents", name, "uncordon"))
    _print_doc(view, output_format, f"agent/{view['name']} uncordoned: takes new jobs")


@main.group(cls=AliasGroup, aliases={"agents": "agent"})
def disable():
    """Switch an agent off (the hard stop; `drain` is the graceful one)."""


@disable.command("agent")
@click.argument("name", shell_complete=_complete_agents)
@_doc_output
@click.pass_obj
def disable_agent(session, name, output_format):
    """Disable an agent: its lease and claims are refused, its running jobs requeued at once."""
    view = session.client.post(_path("agents", name, "disable"))
    running = view["requeued_jobs"]  # counted by the server as it requeued them
    _print_doc(view, output_format, f"agent/{view['name']} disabled: takes no jobs until enabled"
               + (f"; {running} running job{'s' * (running != 1)} requeued" if running else ""))


@main.group(cls=AliasGroup, aliases={"agents": "agent"})
def enable():
    """Switch a disabled agent back on."""


@enable.command("agent")
@click.argument("name", shell_complete=_complete_agents)
@_doc_output
@click.pass_obj
def enable_agent(session, name, output_format):
    """Enable a disabled agent: it takes jobs again from its next lease renewal."""
    view = session.client.post(_path("agents", name, "enable"))
    _print_doc(view, output_format, f"agent/{view['name']} enabled: takes jobs from its next renewal")


@main.group(cls=AliasGroup, aliases={"agents": "agent"})
def delete():
    """Delete an agent record."""


@delete.command("agent")
@click.argument("name", shell_complete=_complete_agents)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def delete_agent(session, name, yes):
    """Delete an agent: its key stops working at once; its running jobs are requeued."""
    view = session.client.get(_path("agents", name))
    if not yes:
        running = view["jobs_running"]
        click.confirm(f"Delete agent {name!r} ({view['status']}, {running} running"
                      f" job{'s' * (running != 1)})? Its key stops working at once"
                      + ("; its running jobs are requeued" if running else ""), abort=True, err=True)
    session.client.delete(_path("agents", name))
    click.echo(f"agent/{name} deleted")


# --- tokens and jobs --------------------------------------------------------------------

@main.group(cls=AliasGroup, aliases={"tokens": "token", "admin-tokens": "admin-token"})
def revoke():
    """Revoke a bootstrap token or an admin token."""


@revoke.command("token")
@click.argument("token_id", metavar="ID", type=int)
@click.option("--reason", metavar="TEXT", help="Why (kept with the token and in the audit log).")
@_doc_output
@click.pass_obj
def revoke_token(session, token_id, reason, output_format):
    """Revoke a bootstrap token (ID from `get tokens`): registrations with it are refused."""
    token = session.client.post(_path("tokens", token_id, "revoke"), {"reason": reason} if reason else {})
    _print_doc(token, output_format, f"token/{token['id']} revoked")


@revoke.command("admin-token")
@click.argument("token_id", metavar="ID", type=int)
@_doc_output
@click.pass_obj
def revoke_admin_token(session, token_id, output_format):
    """Revoke an admin token (ID from `get admin-tokens`): it is refused from now on."""
    token = session.client.post(_path("admin-tokens", token_id, "revoke"))
    _print_doc(token, output_format, f"admin-token/{token['id']} ({token['name']}) revoked")


@main.group(cls=AliasGroup, aliases={"jobs": "job"})
def retry():
    """Give a failed or cancelled job a new attempt."""


@retry.command("job")
@click.argument("job_id", metavar="ID")
@_doc_output
@click.pass_obj
def retry_job(session, job_id, output_format):
    """Retry a failed or cancelled job as a new attempt."""
    job = session.client.post(_path("jobs", job_id, "retry"))
    _print_doc(job, output_format,
               f"job/{job['id']} retried: attempt {job['attempt']}, now {job['status']}")


@main.group(cls=AliasGroup, aliases={"tenants": "tenant"})
def update():
    """Change a tenant's plan."""


@update.command("tenant")
@click.argument("name")
@click.option("--plan", required=True, metavar="PLAN", help="The tenant's new plan.")
@_doc_output
@click.pass_obj
def update_tenant(session, name, plan, output_format):
    """Move a tenant to another plan (limits apply to the next admissions)."""
    tenant = session.client.request("PATCH", _path("tenants", name), json={"plan": plan})
    _print_doc(tenant, output_format, f"tenant/{tenant['name']} now on plan {tenant['plan']}")


@main.group(cls=AliasGroup, aliases={"jobs": "job"})
def cancel():
    """Cancel a pending, queued or running job."""


@cancel.command("job")
@click.argument("job_id", metavar="ID")
@_doc_output
@click.pass_obj
def cancel_job(session, job_id, output_format):
    """Cancel a job: a running scan is stopped on its agent."""
    job = session.client.post(_path("jobs", job_id, "cancel"))
    _print_doc(job, output_format, f"job/{job['id']} {job['status']}")
