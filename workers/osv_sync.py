"""``exploop-agent osv-sync``: download osv.dev's per-ecosystem exports into OSV_DB_DIR.

Each ecosystem's ``<base-url>/<Ecosystem>/all.zip`` is streamed to a temporary file
beside its destination, checked (a readable zip with at least one OSV JSON record) and
then renamed over ``<OSV_DB_DIR>/<Ecosystem>/all.zip``, so a scan never reads a
half-written archive and a failed download keeps the previous database. A copy that is
already current (``If-Modified-Since`` answered 304) is not downloaded again.
"""
from __future__ import annotations

import email.utils
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests

__all__ = ["sync", "sync_ecosystem", "SyncError", "DEFAULT_BASE_URL", "DEFAULT_ECOSYSTEMS"]

DEFAULT_BASE_URL = "https://osv-vulnerabilities.storage.googleapis.com"
DEFAULT_ECOSYSTEMS = ("PyPI", "npm", "Go")


class SyncError(Exception):
    """An ecosystem could not be downloaded or its archive is unusable."""


@dataclass
class SyncResult:
    ecosystem: str
    records: int
    size: int
    updated: bool


def _check_archive(path: Path, ecosystem: str) -> int:
    """Number of OSV records in the archive; raise if it is not a usable export."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".json")]
            if not members:
                raise SyncError(f"{ecosystem}: the archive holds no OSV records")
            record = json.loads(archive.read(members[0]))
            if "id" not in record or "affected" not in record and "withdrawn" not in record:
                raise SyncError(f"{ecosystem}: {members[0].filename} is not an OSV record")
            return len(members)
    except zipfile.BadZipFile:
        raise SyncError(f"{ecosystem}: the download is not a zip archive") from None
    except ValueError:
        raise SyncError(f"{ecosystem}: the archive holds invalid JSON") from None


def sync_ecosystem(session: requests.Session, base_url: str, db_dir: Path, ecosystem: str,
                   timeout: float = 60) -> SyncResult:
    """Download one ecosystem's ``all.zip`` unless the local copy is current."""
    url = f"{base_url.rstrip('/')}/{ecosystem}/all.zip"
    target = db_dir / ecosystem / "all.zip"
    headers = {}
    if target.is_file():
        headers["If-Modified-Since"] = email.utils.formatdate(target.stat().st_mtime, usegmt=True)
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise SyncError(f"{ecosystem}: cannot reach {url}: {exc.__class__.__name__}") from None
    with response:
        if response.status_code == 304:
            return SyncResult(ecosystem, _check_archive(target, ecosystem), target.stat().st_size, False)
        if response.status_code != 200:
            raise SyncError(f"{ecosystem}: {url} answered HTTP {response.status_code}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".all.zip.", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    handle.write(chunk)
            records = _check_archive(tmp, ecosystem)
            modified = response.headers.get("Last-Modified")
            if modified:
                stamp = email.utils.parsedate_to_datetime(modified).timestamp()
                os.utime(tmp, (stamp, stamp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except requests.RequestException as exc:
            tmp.unlink(missing_ok=True)
            raise SyncError(f"{ecosystem}: download interrupted: {exc.__class__.__name__}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return SyncResult(ecosystem, records, target.stat().st_size, True)


def sync(base_url: str, db_dir: Path, ecosystems: list[str],
         timeout: float = 60) -> tuple[list[SyncResult], list[str]]:
    """Sync every ecosystem; return what was synced and one error line per failure."""
    db_dir.mkdir(parents=True, exist_ok=True)
    results, errors = [], []
    with requests.Session() as session:
        session.headers["User-Agent"] = "exploop-agent osv-sync"
        for ecosystem in ecosystems:
            try:
                results.append(sync_ecosystem(session, base_url, db_dir, ecosystem, timeout))
            except SyncError as exc:
                errors.append(str(exc))
    return results, errors
