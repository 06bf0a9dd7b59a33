"""The HTTP client of the API, used by agents (``workers/``) and the admin CLI (``admin/``)."""
from __future__ import annotations

import requests

from . import __version__

__all__ = ["ApiClient", "PlatformClient", "ApiClientError", "ApiConnectionError"]


class ApiClientError(Exception):
    """The API answered with an error (``status``, ``message``, ``detail``)."""

    def __init__(self, status: int, message: str, detail=None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail

    def detail_field(self, name: str):
        """One field of the error's JSON detail (``reason``, ``status``), or None."""
        return self.detail.get(name) if isinstance(self.detail, dict) else None


class ApiConnectionError(ApiClientError):
    """The API could not be reached at all."""

    def __init__(self, url: str, reason: str):
        super().__init__(0, f"failed to connect to API {url}: {reason}")
        self.url = url


class ApiClient:
    """Bearer-token JSON client with short timeouts and one error type per failure."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = f"exploop/{__version__}"
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, *, json=None, params=None, headers=None,
                timeout: float | None = None):
        """Send one request; return the decoded JSON body (None for 204)."""
        url = self.base_url + path
        try:
            response = self.session.request(method, url, json=json, params=params, headers=headers,
                                            timeout=timeout or self.timeout)
        except requests.exceptions.RequestException as exc:
            raise ApiConnectionError(self.base_url, _reason(exc)) from None
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and "error" in body:
                raise ApiClientError(response.status_code, body["error"], body.get("detail"))
            raise ApiClientError(response.status_code, f"HTTP {response.status_code} from {url}")
        return body

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json=None, **kw):
        return self.request("POST", path, json=json if json is not None else {}, **kw)

    def put(self, path, json=None, **kw):
        return self.request("PUT", path, json=json if json is not None else {}, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)


def _reason(exc: Exception) -> str:
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS handshake failed"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection refused or unreachable"
    return exc.__class__.__name__


class PlatformClient(ApiClient):
    """The agent side of ``/platform/*``."""

    def register(self, token: str, **fields) -> dict:
        return self.post("/platform/register", {"token": token, **fields})

    def config(self) -> dict:
        return self.get("/platform/config")

    def renew_lease(self, body: dict, timeout: float | None = None) -> dict:
        return self.put("/platform/lease", body, timeout=timeout)

    def release_lease(self) -> None:
        self.delete("/platform/lease", timeout=5)

    def claim(self, job_id: str, attempt: int, handout_id: str | None = None,
              incarnation: str | None = None) -> dict:
        body: dict[str, object] = {"attempt": attempt}
        if handout_id:
            body["handout_id"] = handout_id
        if incarnation:
            body["incarnation"] = incarnation
        return self.post(f"/platform/jobs/{job_id}/claim", body)

    def poll(self, timeout: float) -> dict | None:
        """Long-poll for a job (HTTP agents); None when none came within ``timeout``."""
        return self.post("/platform/poll", {"timeout": timeout}, timeout=timeout + 15)

    # progress / complete / fail carry the scoped job token the claim returned.

    def progress(self, job_id: str, attempt: int, job_token: str, progress: int,
                 message: str | None = None) -> dict:
        body: dict[str, object] = {"attempt": attempt, "progress": progress}
        if message:
            body["message"] = message[:255]
        return self.post(f"/platform/jobs/{job_id}/progress", body, headers={"X-Job-Token": job_token})

    def complete(self, job_id: str, attempt: int, job_token: str, findings: list, summary: dict,
                 incomplete: list[dict] | None = None) -> dict:
        body = {"attempt": attempt, "findings": findings, "summary": summary}
        if incomplete:
            body["incomplete"] = incomplete
        return self.post(f"/platform/jobs/{job_id}/complete", body, timeout=60,
                         headers={"X-Job-Token": job_token})

    def fail(self, job_id: str, attempt: int, job_token: str, error: str, retry: bool = False) -> dict:
        return self.post(f"/platform/jobs/{job_id}/fail",
                         {"attempt": attempt, "error": error[:10000], "retry": retry},
                         headers={"X-Job-Token": job_token})
